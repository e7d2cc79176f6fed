"""The study's experiment on one recipe: LoRA r=8, 16, 32 and QLoRA r=16 trained, evaluated beside
the base model, and compared in pairs.

    python sweep.py                # or: make sweep
    python sweep.py --model google/gemma-2-2b --dataset iamtarun/python_code_instructions_18k_alpaca

Every run is train.py with its defaults and only the rank (and --qlora) changed, into the folder
`make train RANK=r` / `make qlora` would use, so the sweep and those commands share their results.
It takes hours on a CPU and may be cut off at any moment, so every step resumes:
  * a folder holding train_summary.json is a finished run and is skipped (its settings must be the
    recipe's: a folder trained otherwise is refused, never mixed in);
  * an interrupted run resumes from its last checkpoint (train.py saves every 25 steps);
  * the evaluation takes what it already generated from outputs/eval_cache.
Ctrl-C (or a plain kill) stops the running step cleanly: train.py saves a checkpoint first.

It writes, besides each run's folder:
  outputs/model_comparison.{csv,md}, outputs/rank_comparison.png   evaluate.py's table, with the
                                 training columns (trainable parameters, wall time, tokens/s, memory)
  outputs/paired_tests.md        exact McNemar tests on the items both models answered
  outputs/training_curves.png    train and held-out loss of every run on one figure
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.files import OUTPUTS, FileError, check_writable, first_line
from common.options import COUNT, DEVICE
from evaluation import paired_tests
from gemma import loading
from gemma.loading import add_model_option
from lora.adapter import TRAINING_CONFIG_NAME
from training.arguments import parse_args
from training.config import resolve_defaults
from training.run_log import plot_training_curves, read_metrics, read_summary

HERE = Path(__file__).resolve().parent
# Settings that say where or how a run was started, not what it trained, or that the run fills in from the
# others (schedule_steps: from the data, epochs and max_steps).
NOT_RECIPE = {"out", "overwrite", "device", "world_size", "compile", "gradient_checkpointing", "schedule_steps",
              "report_to"}


@dataclass(frozen=True)
class Run:
    name: str
    rank: int
    qlora: bool = False

    def train_arguments(self, outputs: Path) -> list[str]:
        return ["--rank", str(self.rank), "--out", str(outputs / self.name)] + (["--qlora"] if self.qlora else [])


# In training order: the two runs the study centres on first, so a sweep cut short has them.
RUNS = (Run("lora_r16", 16), Run("qlora_r16", 16, qlora=True), Run("lora_r8", 8), Run("lora_r32", 32))
PAIRS = (("lora_r8", "lora_r16"), ("lora_r16", "lora_r32"), ("lora_r16", "qlora_r16"))


class SweepError(RuntimeError):
    """The sweep cannot go on; the message is one line for the user."""


def recipe(run: Run, model: str, dataset: str, outputs: Path) -> dict:
    """The settings train.py will record for this run, without where it was run."""
    config = parse_args(["--model", model, "--dataset", dataset, *run.train_arguments(outputs)])
    return {key: value for key, value in dataclasses.asdict(resolve_defaults(config)).items() if key not in NOT_RECIPE}


def is_finished(run: Run, expected: dict, outputs: Path) -> bool:
    """Whether the run's folder holds a finished run of this recipe; raises SweepError for a finished
    run of another recipe."""
    folder = outputs / run.name
    if not read_summary(folder):
        return False
    try:
        recorded = json.loads((folder / TRAINING_CONFIG_NAME).read_text())
    except (OSError, ValueError) as error:
        raise SweepError(f"cannot read {folder / TRAINING_CONFIG_NAME}: {first_line(error)}") from None
    differences = [f"{key}={recorded.get(key)!r} (the sweep's: {value!r})" for key, value in expected.items()
                   if recorded.get(key) != value]
    if differences:
        raise SweepError(f"{folder} was trained with another recipe: {', '.join(differences)}; move it away and run "
                         "the sweep again")
    return True


def run_child(command: list[str]) -> None:
    """Run one step in its own process group, so that Ctrl-C reaches it once, through us: then it stops
    the way a plain kill stops it (train.py saves a checkpoint) and we wait for it."""
    print("$", " ".join(command), flush=True)
    child = subprocess.Popen(command, start_new_session=True)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGTERM)
        child.wait()
        raise
    if code != 0:
        raise SweepError(f"'{' '.join(command)}' failed (exit code {code}); its error is above")


def train_runs(args: argparse.Namespace, outputs: Path) -> None:
    for run in RUNS:
        expected = recipe(run, args.model, args.dataset, outputs)
        if is_finished(run, expected, outputs):
            print(f"{run.name}: finished earlier ({outputs / run.name / 'train_summary.json'}), skipped", flush=True)
            continue
        run_child([sys.executable, str(HERE / "train.py"), "--model", args.model, "--dataset", args.dataset,
                   *run.train_arguments(outputs), *_device_option(args)])


def _device_option(args: argparse.Namespace) -> list[str]:
    """--device for the child commands, when the sweep was given one."""
    return ["--device", args.device] if args.device else []


def evaluate_runs(args: argparse.Namespace, outputs: Path) -> None:
    in_table_order = sorted(RUNS, key=lambda run: (run.qlora, run.rank))
    options = _device_option(args) + (["--limit", str(args.limit)] if args.limit else [])
    run_child([sys.executable, str(HERE / "evaluate.py"), "--model", args.model, "--dataset", args.dataset,
               "--outputs", str(outputs), "--adapters", *[str(outputs / run.name) for run in in_table_order], *options])


def report(outputs: Path, limit: int | None) -> None:
    suffix = f"_limit{limit}" if limit else ""  # where evaluate.py put a quick look's results
    results = [paired_tests.compare(outputs / f"eval_samples{suffix}", a, b, measure)
               for a, b in PAIRS for measure in paired_tests.MEASURES]
    table = paired_tests.markdown(results)
    tests_path, curves_path = outputs / f"paired_tests{suffix}.md", outputs / "training_curves.png"
    tests_path.write_text(table, encoding="utf-8")
    print(table, end="")
    plot_training_curves({run.name: read_metrics(outputs / run.name / "metrics.jsonl") for run in RUNS}, curves_path)
    print(f"wrote {tests_path}, {curves_path}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(parser)
    parser.add_argument("--dataset", default="default",
                        help="training data (and its held-out split for the evaluation); default: the embedded corpus")
    parser.add_argument("--outputs", default=str(OUTPUTS),
                        help="where the runs' folders, the evaluation and the comparison go (default: %(default)s)")
    parser.add_argument("--device", type=DEVICE, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--limit", type=COUNT, help="evaluate only the first N held-out rows and N HumanEval problems "
                        "(a quick look; its results go beside a full sweep's, as evaluate.py --limit does)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    outputs = Path(args.outputs)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a plain kill stops like Ctrl-C
    try:
        check_writable(outputs, folder=True)
        train_runs(args, outputs)
        evaluate_runs(args, outputs)
        report(outputs, args.limit)
    except (SweepError, FileError, loading.ModelLoadError, OSError) as error:
        print(f"sweep.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep.py: interrupted; run it again to go on where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
