"""Where a training step's time goes: torch.profiler over the timed steps of a variant, each operator's
self time sorted into a few kinds of work, and what that means for the fastest step possible.

`python -m bench --profile` profiles our LoRA and PEFT + Trainer side by side on the same rows and writes
the table into bench/RESULTS.md. The argument it makes: our step's matrix multiplications (decoder
linears, LoRA, the LM head at labelled positions only) and attention are the least work these rows need,
so a loop whose other work took no time at all would still need that time; PEFT's step time divided by
it is the most any loop could gain over PEFT here.
"""

from __future__ import annotations

import torch

from bench.report import BASELINE, LABELS

MICROSECONDS = 1e-6

# Kinds of work: each operator is matched by its exact name (aten operators on any device), else by a
# part of its name (GPU kernels, whose names vary by library), in this order; the rest is OTHER.
MATMULS = "matmuls (linear layers, LoRA, LM head)"
ATTENTION = "attention"
KINDS: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    (MATMULS,
     frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                "aten::_addmm_activation"}),
     ("gemm", "cutlass", "mkldnn_matmul")),
    (ATTENTION, frozenset(), ("attention", "flash")),
    ("optimizer (AdamW, clipping)", frozenset(), ("_foreach", "adam", "clip_grad")),
    ("copies and dtype casts",
     frozenset({"aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat",
                "aten::stack", "aten::index", "aten::index_select", "aten::embedding", "aten::_copy_from"}),
     ("memcpy",)),
)
OTHER = "everything else (elementwise, norms, softmax, loss, autograd bookkeeping)"
NEEDED = (MATMULS, ATTENTION)  # at our step's size, the least work these rows need


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, names, parts in KINDS:
        if name in names or any(part in lowered for part in parts):
            return kind
    return OTHER


def seconds_by_kind(operators: list[tuple[str, float]]) -> dict[str, float]:
    """(operator name, self seconds) pairs -> seconds per kind of work, every kind present."""
    totals = {kind: 0.0 for kind, *_ in KINDS} | {OTHER: 0.0}
    for name, seconds in operators:
        totals[kind_of(name)] += seconds
    return totals


def start_profiler(device: torch.device) -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


def stop_profiler(profiler: torch.profiler.profile, device: torch.device) -> list[tuple[str, float]]:
    """Stop; each operator's self time in seconds (device time on a GPU, where the kernels run)."""
    profiler.stop()
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return [(event.key, getattr(event, attribute) * MICROSECONDS) for event in profiler.key_averages()
            if getattr(event, attribute) > 0]


def profile_table(results: list[dict]) -> str:
    """Seconds per profiled step and share of the step, per kind of work, one column per variant."""
    columns = [(LABELS[r["variant"]], seconds_by_kind(r["profile"]), r["profiled_seconds"], r["profiled_steps"])
               for r in results]
    lines = ["| kind of work (operators' self time, s per step) | " + " | ".join(label for label, *_ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for kind in [kind for kind, *_ in KINDS] + [OTHER]:
        cells = [f"{totals[kind] / steps:.2f} ({100 * totals[kind] / wall:.0f}%)" for _, totals, wall, steps in columns]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append("| step time under the profiler | " + " | ".join(f"{wall / steps:.2f}" for _, _, wall, steps in columns)
                 + " |")
    return "\n".join(lines)


def largest_other(operators: list[tuple[str, float]], steps: int, count: int = 8) -> list[tuple[str, float]]:
    """The `count` operators of OTHER with the most self time, in seconds per step: where to look next."""
    other = sorted(((name, seconds / steps) for name, seconds in operators if kind_of(name) == OTHER),
                   key=lambda pair: -pair[1])
    return other[:count]


def largest_other_lines(results: list[dict]) -> list[str]:
    """One line per variant naming its largest operators in "everything else"."""
    lines = []
    for result in results:
        named = ", ".join(f"`{name}` {seconds:.2f}"
                          for name, seconds in largest_other(result["profile"], result["profiled_steps"]))
        lines.append(f"- Largest in everything else, {LABELS[result['variant']]} (s per step): {named}.")
    return lines


def bound_lines(results: list[dict]) -> list[str]:
    """What the profile implies for the fastest step on these rows, against PEFT + Trainer."""
    by_variant = {r["variant"]: r for r in results}
    ours, peft = by_variant.get("lora"), by_variant.get(BASELINE)
    if not ours or not peft:
        return []
    ours_needed, peft_needed = (sum(seconds_by_kind(r["profile"])[kind] for kind in NEEDED) / r["profiled_steps"]
                                for r in (ours, peft))
    ours_step, peft_step = (r["profiled_seconds"] / r["profiled_steps"] for r in (ours, peft))
    return [
        f"- Matmuls and attention: {ours_needed:.2f} s of our LoRA step's {ours_step:.2f} s "
        f"({100 * ours_needed / ours_step:.0f}%); {peft_needed:.2f} s of PEFT + Trainer's {peft_step:.2f} s (its LM "
        "head also runs at the unlabelled positions).",
        f"- A loop that did nothing but our matmuls and attention would be {peft_step / ours_needed:.2f}x PEFT's "
        f"speed at most (ours, profiled: {peft_step / ours_step:.2f}x); the other {ours_step - ours_needed:.2f} s of "
        "our step is where more speed would have to come from.",
    ]
