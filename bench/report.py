"""Turn the workers' measurements into bench/RESULTS.md: one table, ratios to PEFT + Trainer LoRA,
the issue's targets, and how every figure is defined."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import mean

BASELINE = "peft-lora"
LABELS = {
    "lora": "(1) ours, LoRA",
    "qlora": "(2) ours, QLoRA (NF4)",
    "peft-lora": "(3) PEFT + HF Trainer, LoRA",
    "peft-qlora": "(4) PEFT + HF Trainer, bnb 4-bit QLoRA",
    "lora+compile": "(1c) ours, LoRA, compiled layers",
    "qlora+compile": "(2c) ours, QLoRA, compiled layers",
    "peft-lora+compile": "(3c) PEFT + HF Trainer, LoRA, torch_compile=True",
    "lora+ckpt": "(1g) ours, LoRA, gradient checkpointing",
    "qlora+ckpt": "(2g) ours, QLoRA, gradient checkpointing",
    "lora+nodrop": "(1d) ours, LoRA, dropout 0",
    "peft-lora+nodrop": "(3d) PEFT + HF Trainer, LoRA, dropout 0",
}
GB = 1e9


@dataclass(frozen=True)
class Summary:
    """One variant's figures over its timed steps (the warm-up steps left out)."""

    variant: str
    seconds_per_step: float
    tokens_per_s: float  # supervised (labelled) tokens
    flops_per_s: float  # useful FLOPs, see measure.useful_step_flops
    peak_training_bytes: int
    peak_run_bytes: int  # loading included
    first_loss: float  # step 1: the adapters are still zero, so every variant sees the same function
    timed_loss: float

    @classmethod
    def of(cls, result: dict, warmup_steps: int) -> Summary:
        seconds = result["step_seconds"][warmup_steps:]
        return cls(
            variant=result["variant"],
            seconds_per_step=mean(seconds),
            tokens_per_s=sum(result["supervised_tokens"][warmup_steps:]) / sum(seconds),
            flops_per_s=sum(result["useful_flops"][warmup_steps:]) / sum(seconds),
            peak_training_bytes=result["peak_training_bytes"],
            peak_run_bytes=max(result["peak_training_bytes"], result["peak_loading_bytes"]),
            first_loss=result["losses"][0],
            timed_loss=mean(result["losses"][warmup_steps:]),
        )


@dataclass(frozen=True)
class MatmulRate:
    """The throughput of square matmuls in the compute dtype: the ceiling each variant is held against."""
    flops_per_s: float
    size: int
    dtype: str  # "bfloat16", "float32", ...

    def __str__(self) -> str:
        return f"{self.dtype} matmul, {self.size}^3: {self.flops_per_s / 1e12:.3g} TFLOP/s"


def training_table(summaries: list[Summary], matmul: MatmulRate) -> str:
    base = next((s for s in summaries if s.variant == BASELINE), None)

    def ratio(value: float, reference: float | None) -> str:
        return f"{value / reference:.2f}x" if reference else "-"

    lines = [
        "| variant | s / step | supervised tokens/s | tokens/s vs (3) | peak memory, training (GB) | "
        "peak memory, whole run (GB) | whole-run memory vs (3) | loss, step 1 | loss, timed steps | "
        f"useful TFLOP/s | of {matmul.dtype} matmul |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {LABELS[s.variant]} | {s.seconds_per_step:.2f} | {s.tokens_per_s:.1f} | "
            f"{ratio(s.tokens_per_s, base and base.tokens_per_s)} | {s.peak_training_bytes / GB:.2f} | "
            f"{s.peak_run_bytes / GB:.2f} | {ratio(s.peak_run_bytes, base and base.peak_run_bytes)} | "
            f"{s.first_loss:.4f} | {s.timed_loss:.4f} | {s.flops_per_s / 1e12:.3f} | "
            f"{100 * s.flops_per_s / matmul.flops_per_s:.1f}% |"
        )
    return "\n".join(lines)


def target_lines(summaries: list[Summary], matmul: MatmulRate) -> list[str]:
    """The issue's targets, each with its measured value; targets whose variants were not run are skipped.
    "Our LoRA" / "our QLoRA" is the fastest of our variants of it (plain, compiled, checkpointed) with
    dropout, as PEFT's (3) has it: the dropout 0 pair is compared on its own."""
    by_name = {s.variant: s for s in summaries}
    ours = _fastest([s for s in summaries if s.variant.split("+")[0] == "lora" and s.variant != "lora+nodrop"])
    quantized = _fastest([s for s in summaries if s.variant.split("+")[0] == "qlora"])
    peft, peft_compiled, peft_quantized = (by_name.get(name) for name in (BASELINE, "peft-lora+compile", "peft-qlora"))
    checks = []
    if ours and peft:
        speedup = ours.tokens_per_s / peft.tokens_per_s
        checks.append((f"our LoRA ({LABELS[ours.variant]}) >= 2.5x the tokens/s of (3): {speedup:.2f}x", speedup >= 2.5))
    if ours and peft_compiled:
        checks.append((f"our LoRA vs (3c), PEFT + Trainer compiled too: {ours.tokens_per_s / peft_compiled.tokens_per_s:.2f}x "
                       "the tokens/s (no target: the fair peer)", None))
    ours_undropped, peft_undropped = by_name.get("lora+nodrop"), by_name.get("peft-lora+nodrop")
    if ours_undropped and peft_undropped:
        checks.append((f"(1d) vs (3d), both with LoRA dropout 0: {ours_undropped.tokens_per_s / peft_undropped.tokens_per_s:.2f}x "
                       "the tokens/s (no target: what the dropout masks cost each)", None))
    if ours:
        share = ours.flops_per_s / matmul.flops_per_s
        checks.append((f"our LoRA >= 55% of the measured {matmul.dtype} matmul rate: {100 * share:.1f}%", share >= 0.55))
    if ours and quantized:
        slowdown = quantized.seconds_per_step / ours.seconds_per_step
        checks.append((f"our QLoRA ({LABELS[quantized.variant]}) <= 1.2x our LoRA's step time: {slowdown:.2f}x",
                       slowdown <= 1.2))
    if peft_quantized:
        leanest = min((s for s in summaries if s.variant.split("+")[0] == "qlora"), key=lambda s: s.peak_run_bytes,
                      default=None)
        if leanest:
            checks.append((f"our QLoRA ({LABELS[leanest.variant]}) <= the peak memory of (4): "
                           f"{leanest.peak_run_bytes / GB:.2f} vs {peft_quantized.peak_run_bytes / GB:.2f} GB",
                           leanest.peak_run_bytes <= peft_quantized.peak_run_bytes))
    return [f"- {'met' if met else 'NOT met' if met is False else 'for comparison'}: {text}" for text, met in checks]


def _fastest(summaries: list[Summary]) -> Summary | None:
    return max(summaries, key=lambda s: s.tokens_per_s, default=None)


def generation_table(result: dict) -> str:
    rows = [("ours: generation.Generator, batches of " + str(result["batch_size"]), "batched"),
            ("Hugging Face `generate`, one prompt at a time", "single")]
    lines = ["| generation | new tokens | seconds | new tokens/s | s / prompt |", "|---|---:|---:|---:|---:|"]
    for label, key in rows:
        tokens, seconds = result[f"{key}_new_tokens"], result[f"{key}_seconds"]
        lines.append(f"| {label} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | "
                     f"{seconds / result['prompts']:.2f} |")
    return "\n".join(lines)


def generation_summary(result: dict) -> str:
    speedup = (result["batched_new_tokens"] / result["batched_seconds"]) / (
        result["single_new_tokens"] / result["single_seconds"])
    return (f"{result['prompts']} held-out prompts, greedy, at most {result['max_new_tokens']} new tokens, stopping at "
            f"`<end_of_turn>` or EOS. Batched is {speedup:.2f}x the tokens/s of one at a time; "
            f"{result['identical_completions']}/{result['prompts']} completions are identical (left padding "
            "changes the rounding, which can flip a near-tie in a greedy choice, most often in bf16).")
