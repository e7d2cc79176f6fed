"""--report-to: where a run's metrics go besides metrics.jsonl. With `tensorboard`, every number of every
metrics.jsonl line (losses, learning rate, gradient norm, tokens/s, peak memory, the held-out losses) is a
TensorBoard scalar of the same name at that line's step, in OUT/tensorboard. TensorBoard is optional
(requirements-tensorboard.txt; `make tensorboard` installs it and shows the runs)."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPORT_TARGETS = ("none", "tensorboard")
TENSORBOARD_FOLDER = "tensorboard"  # inside the run's folder


def report_target(text: str) -> str:
    """An argparse `type` for --report-to: a known target whose package is installed."""
    if text not in REPORT_TARGETS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(REPORT_TARGETS)}, got {text!r}")
    if text == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise argparse.ArgumentTypeError("tensorboard is not installed: make tensorboard installs it "
                                         "(or .venv/bin/pip install -r requirements-tensorboard.txt)")
    return text


@contextmanager
def reporting(target: str, out: Path, start_step: int) -> Iterator[Callable[[dict], None]]:
    """A function that reports one metrics.jsonl entry to `target` (a no-op for "none"), for as long as
    the context lasts. `start_step`: the step the run starts or resumes at."""
    if target == "none":
        yield lambda entry: None
        return
    from torch.utils.tensorboard import SummaryWriter

    # TensorBoard hides the events of earlier runs in this folder from purge_step on: when a run resumes,
    # those a killed run wrote after its checkpoint (written again now, as in metrics.jsonl); when a run
    # starts afresh, all of them.
    writer = SummaryWriter(str(out / TENSORBOARD_FOLDER), purge_step=start_step + 1 if start_step else 0)

    def report(entry: dict) -> None:
        for name, value in entry.items():
            if name != "step":
                writer.add_scalar(name, value, entry["step"])
        writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    try:
        yield report
    finally:
        writer.close()
