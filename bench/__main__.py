"""Benchmark our LoRA/QLoRA training loop against PEFT + Hugging Face Trainer, side by side.

    python -m bench                                 # `make bench`: everything, embedded Gemma 3 270M
    python -m bench --variants lora,peft-lora --steps 2
    python -m bench --model random-gemma-2-2b --device cuda   # GPU: Gemma-2-2B's shapes, length 768
    python -m bench --profile --steps 2             # `make bench-profile`: where the step time goes

Trains a fixed number of optimizer steps on the same micro-batches with (1) our LoRA, (2) our
QLoRA, (3) PEFT + Trainer LoRA and (4) PEFT + Trainer + bitsandbytes 4-bit QLoRA, each in its own
process, one after another (see bench/training.py). Warm-up steps are left out of the timing.
Then compares batched greedy generation with Hugging Face `generate` one prompt at a time
(bench/generation.py). Writes its section of the report (default bench/RESULTS.md; a CPU run
and a GPU run each keep their own section) with the machine, the date and this command. Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import machine_description, measure_matmul, why_float32
from bench.profile import bound_lines, largest_other_lines, profile_table
from bench.report import LABELS, MatmulRate, Summary, generation_summary, generation_table, target_lines, training_table
from bench.training import DEFAULT_VARIANTS, RANDOM_GEMMA2_2B, VARIANTS, BenchSettings, random_model_dir
from common import hardware
from common.files import FileError, check_writable
from common.options import COUNT, DEVICE, NON_NEGATIVE_INT
from data.dataset import DataError, load_rows
from gemma import loading
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
STUDY_A100_REFERENCE = ("The study, for comparison (Gemma-2-2B, A100 40GB, fp16, its real rows of up to 768 tokens): "
                        "LoRA 0.98 s and QLoRA 1.9 s per optimizer step of 16 sequences.")
DEFAULT_OUTPUT = ROOT / "bench" / "RESULTS.md"
PROFILED_VARIANTS = ("lora", "peft-lora")  # the pair the 2.5x target compares


def run_worker(module: str, arguments: list[str]) -> dict:
    """Run `python -m module arguments --result FILE` in a fresh process; return what it wrote."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        command = [sys.executable, "-m", module, *arguments, "--result", str(result)]
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            print(f"python -m bench: error: python -m {module} {shlex.join(arguments[:2])} failed; its output is above",
                  file=sys.stderr)
            raise SystemExit(2)
        return json.loads(result.read_text())


def hyperparameters(config: TrainConfig, dtype: str) -> str:
    """The settings every variant shares (train.py's defaults resolved for this model and device), and
    the dtype they compute in."""
    return (f"LoRA r={config.rank}, alpha {config.alpha or 2 * config.rank:g}, dropout {config.dropout} on "
            f"{config.targets.replace(',', '/')} (adapters in fp32), batch {config.batch_size} x accumulation "
            f"{config.grad_accum}, AdamW lr {config.lr} held constant, weight decay {config.weight_decay}, "
            f"clip {config.grad_clip}, " + ("no autocast (float32)" if dtype == "float32" else f"{dtype} autocast"))


def document(kind: str, command: str, settings: BenchSettings, results: list[dict], generation: dict | None,
             matmul: MatmulRate, machine: str, minutes: float) -> str:
    """This run's section of the report (kind: CPU or GPU): its figures, where and how they were taken."""
    summaries = [Summary.of(result, settings.warmup_steps) for result in results]
    parts = [
        f"## {kind} figures",
        "",
        f"Written by `{command}` on {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} "
        f"(the whole run took {minutes:.1f} min).",
        f"Machine: {machine}. Device: {settings.device}. {matmul} (measured by the same run).",
        f"Model: {settings.model}; data: {settings.dataset if settings.model != RANDOM_GEMMA2_2B else 'random ids'}, "
        f"rows up to {results[0]['max_length']} tokens, the first {settings.warmup_steps + settings.steps} optimizer "
        "steps of train.py's own schedule, the same micro-batches in the same order for every variant. "
        f"{settings.warmup_steps} warm-up step(s), then {settings.steps} timed.",
        f"Every variant: {hyperparameters(settings.train_config('lora'), matmul.dtype)}.",
        "",
        training_table(summaries, matmul),
        "",
    ]
    if settings.model == RANDOM_GEMMA2_2B:
        parts += [STUDY_A100_REFERENCE, ""]
    targets = target_lines(summaries, matmul)
    if targets:
        parts += ["Targets (issue 12; memory is the whole-run peak):", "", *targets, ""]
    if generation:
        parts += ["### Generation", "", generation_table(generation), "", generation_summary(generation), ""]
    return "\n".join(parts)


def profile_document(kind: str, command: str, settings: BenchSettings, results: list[dict], matmul: MatmulRate,
                     machine: str, minutes: float) -> str:
    """This run's profile section (kind: "CPU profile" or "GPU profile")."""
    return "\n".join([
        f"## {kind} figures",
        "",
        f"Written by `{command}` on {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} "
        f"(the whole run took {minutes:.1f} min). Machine: {machine}. {matmul} (measured by the same run).",
        f"The same rows and settings as the figures above; {settings.warmup_steps} warm-up step(s), then "
        f"{settings.steps} step(s) under torch.profiler (bench/profile.py), which slows them down: the step "
        "times here are not the benchmark's.",
        "",
        profile_table(results),
        "",
        *bound_lines(results),
        *largest_other_lines(results),
        "",
    ])


SECTION = re.compile(r"<!-- ([\w ]+?) figures -->\n(.*?)<!-- end -->\n", re.DOTALL)


def merged_report(previous: str, kind: str, section: str) -> str:
    """The report with this run's section (CPU, CPU float32, GPU, or a profile of one) replaced and the
    other kinds' kept."""
    sections = dict(SECTION.findall(previous))
    sections[kind] = section
    body = "".join(f"<!-- {name} figures -->\n{text}<!-- end -->\n" for name, text in sorted(sections.items()))
    return f"{TITLE}\n\n{body}\n{NOTES}"


TITLE = "# Training benchmark: our loop vs PEFT + Hugging Face Trainer"
NOTES = """## How to read this

- Variants: """ + "; ".join(f"{label} = `{name}`" for name, label in LABELS.items()) + """.
  (1) and (2) run training/'s `prepare_model` and `optimizer_step` (accumulation, clip, AdamW), the
  same code as `make train`, without its evaluation and checkpoints. (3) loads the same weights in the same dtype
  with the same attention implementation, wraps them with `peft.get_peft_model`, and trains with
  `transformers.Trainer` (`bf16=True` where we compute in bf16, `DataCollatorForSeq2Seq`, sequential sampler, AdamW
  torch). (4) loads the model with `BitsAndBytesConfig` (NF4, double quantization, compute in our dtype) and runs
  `peft.prepare_model_for_kbit_training` with its defaults, as the study did: that switches on
  gradient checkpointing and casts the non-quantized weights (embeddings, norms) to fp32.
  `+compile` rows: ours with `train.py --compile` (each decoder layer `torch.compile`d, LoRA inside;
  the first, untimed step pays the compilation; its dropout draws the eager masks), PEFT with
  `TrainingArguments(torch_compile=True)`;
  `+ckpt` rows: ours with `--gradient-checkpointing` (non-reentrant, every decoder layer); `+nodrop` rows (1d)
  and (3d): ours and PEFT with LoRA dropout 0 (`train.py --dropout 0`), which shows what drawing the dropout
  masks costs each; the 2.5x target compares (3) with our variants that keep the dropout.
- Profile sections (`python -m bench --profile`, `make bench-profile`): torch.profiler over the timed steps
  of our LoRA and PEFT + Trainer, each operator's self time (CPU time on the CPU, kernel time on a GPU)
  sorted by bench/profile.py into matmuls, attention, optimizer, copies and casts, and the rest. Our matmuls
  and attention are the least work these rows need (PEFT's LM head also runs at unlabelled positions), so
  PEFT's step time over our matmul + attention time is the most any loop could gain over PEFT here.
- GPU figures come from `python -m bench --model random-gemma-2-2b --device cuda` (every variant, Gemma-2-2B's
  shapes with random weights, rows of 768 tokens); `../shared/gpu/README.md` is the recipe for a lent H200.
- Tokens/s counts supervised tokens (those with a label: the answers), the same count for every variant.
- Peak memory: resident set size on the CPU (ru_maxrss), `torch.cuda.max_memory_allocated` on CUDA.
  "Training" is the peak during the optimizer steps (reset after loading); "whole run" includes
  loading, e.g. our QLoRA reads the float32 weights before quantizing them.
- Loss: per supervised token over each optimizer step's whole window. At step 1 the LoRA B matrices
  are zero, so (1) and (3) compute the same function and agree to bf16 rounding; (2) and (4) differ
  a little (both NF4, but (4) runs norms and embeddings in fp32 and gets its NF4 codes through
  transformers' loading path, ours from the float32 weights). Later steps also differ by LoRA
  initialization and dropout draws: within noise.
- Useful FLOPs per step (bench/measure.py `useful_step_flops`), the same count for every variant:
  frozen decoder linears 2N forward + 2N input gradient per non-pad token (no weight gradient for
  frozen weights: not 6N); LoRA 6 x its weights per token; causal attention scores and sums, 3x the
  forward; the 262k-wide LM head 2Vh forward + 2Vh input gradient per supervised token only. Work on
  padding, logits at unlabelled positions and gradient-checkpointing recomputation are not counted.
  "Of ... matmul" divides by the square-matmul throughput measured above, in the dtype training computes in
  (bf16 on GPUs and on CPUs with AVX-512 BF16 or AMX; float32 on other CPUs, which emulate bf16 slowly).
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchSettings()
    parser.add_argument("--steps", type=COUNT, default=defaults.steps, help="timed optimizer steps (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=NON_NEGATIVE_INT, default=defaults.warmup_steps,
                        help="untimed optimizer steps first (default: %(default)s)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated, from " + ", ".join(VARIANTS) + " (default on the CPU: "
                             + ",".join(DEFAULT_VARIANTS["cpu"]) + "; on a GPU: all)")
    parser.add_argument("--model", default=defaults.model,
                        help=f"'embedded' (Gemma 3 270M, default), a model folder or Hugging Face id, or "
                             f"'{RANDOM_GEMMA2_2B}' (random weights with Gemma-2-2B's shapes and random rows of "
                             "768 tokens, for GPUs)")
    parser.add_argument("--dataset", default=defaults.dataset,
                        help="rows to train on, as train.py's --dataset (default: the embedded corpus)")
    parser.add_argument("--max-length", type=COUNT, default=None,
                        help="drop longer rows (default: train.py's for this model and device)")
    parser.add_argument("--device", type=DEVICE, default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--generate-prompts", type=NON_NEGATIVE_INT, default=16,
                        help="held-out prompts for the generation comparison; 0 skips it (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=COUNT, default=128, help="generation limit (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="report file (default: bench/RESULTS.md)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the figures: where each variant's step time goes (torch.profiler), by "
                             f"kind of work; default variants {','.join(PROFILED_VARIANTS)}, no generation")
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = ",".join(PROFILED_VARIANTS if args.profile else DEFAULT_VARIANTS[hardware.pick_device(args.device).type])
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    try:  # a bad output path, model or dataset is refused here, before any slow work and not in every worker
        check_writable(args.output)
        if args.model != RANDOM_GEMMA2_2B:
            loading.resolve_model_path(args.model)
            load_rows(args.dataset)
    except (FileError, loading.ModelLoadError, DataError) as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    device = hardware.pick_device(args.device)
    settings = BenchSettings(model=args.model, dataset=args.dataset, device=str(device), steps=args.steps,
                             warmup_steps=args.warmup_steps, max_length=args.max_length, profile=args.profile)
    matmul_size = 8192 if device.type == "cuda" else 2048  # 2048 is already past the CPU's plateau
    matmul = measure_matmul(device, matmul_size, hardware.pick_compute_dtype(device))
    machine = machine_description(device)
    float32_cpu = device.type == "cpu" and matmul.dtype == "float32"  # a CPU without native bf16
    if float32_cpu:
        machine += ". " + why_float32(device)
    print(f"{machine}\n{matmul}", flush=True)
    if args.model == RANDOM_GEMMA2_2B:
        random_model_dir()  # written once here, not by each worker
    settings_json = json.dumps(dataclasses.asdict(settings))
    results = []
    for variant in args.variants.split(","):
        print(f"--- {LABELS[variant]}", flush=True)
        results.append(run_worker("bench.training", ["--variant", variant, "--settings", settings_json]))
    generation = None
    if args.generate_prompts > 0 and args.model != RANDOM_GEMMA2_2B and not args.profile:  # the random model has no tokenizer
        print("--- generation", flush=True)
        generation = run_worker("bench.generation", ["--settings", settings_json, "--prompts", str(args.generate_prompts),
                                                     "--max-new-tokens", str(args.max_new_tokens)])
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    kind = "GPU" if device.type == "cuda" else "CPU"
    if float32_cpu:  # its own section beside a bf16 CPU's
        kind += " float32"
    minutes = (time.time() - started) / 60
    if args.profile:
        kind += " profile"
        section = profile_document(kind, command, settings, results, matmul, machine, minutes)
    else:
        section = document(kind, command, settings, results, generation, matmul, machine, minutes)
    previous = args.output.read_text() if args.output.exists() else ""
    args.output.write_text(merged_report(previous, kind, section))
    print(section)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
