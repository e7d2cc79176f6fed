"""A training run's record: its settings (train_config.json), metrics.jsonl (one line per step and per
held-out evaluation), the loss plot, peak memory, and the summary printed and saved at the end."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from common.files import FileError
from lora.adapter import TRAINING_CONFIG_NAME

# Once the run has finished, its summary (wall time, tokens/s, peak memory, losses).
SUMMARY_NAME = "train_summary.json"


def write_settings(out: Path, settings: dict) -> None:
    (out / TRAINING_CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")


def read_summary(directory: str | Path) -> dict:
    """A finished run's summary; {} when there is none (an adapter from elsewhere, a run not finished).
    A damaged one is a FileError naming the file."""
    path = Path(directory) / SUMMARY_NAME
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FileError(f"cannot read {path}: {error}") from None
    if not isinstance(summary, dict):
        raise FileError(f"{path} is not a training summary (a JSON object)")
    return summary


def read_metrics(path: Path) -> list[dict]:
    """The entries of metrics.jsonl. A torn last line (a run killed while writing it) is dropped, with
    a word; a damaged line elsewhere is an error naming the file and the line."""
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    entries = []
    for number, line in lines:
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                raise ValueError("no step")
            entries.append(entry)
        except ValueError:
            if number != lines[-1][0]:
                raise ValueError(f"{path} line {number} is damaged; repair or delete that line to resume") from None
            print(f"{path} line {number} was cut off when the run stopped: dropped", file=sys.stderr)
    return entries


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Drop the lines a killed run wrote after its last checkpoint (they will be written again);
    returns the entries kept."""
    kept = [entry for entry in read_metrics(path) if entry["step"] <= step]
    path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))
    return kept


def record(path: Path, history: list[dict], entry: dict) -> None:
    history.append(entry)
    with path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def plot_losses(history: list[dict], path: Path) -> None:
    plot_training_curves({"": history}, path)


def plot_training_curves(runs: dict[str, list[dict]], path: Path) -> None:
    """Train loss per step (faint) and held-out loss (dots) of one or several runs on one figure,
    one colour per run; `runs` maps a run's name ("" for a lone run) to its metrics.jsonl entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4) if len(runs) == 1 else (9, 5))
    for index, (name, history) in enumerate(runs.items()):
        colour, prefix = f"C{index}", f"{name}: " if name else ""
        train = [(e["step"], e["loss"]) for e in history if "loss" in e]
        held = [(e["step"], e["held_out_loss"]) for e in history if "held_out_loss" in e]
        if train:
            axes.plot(*zip(*train), color=colour, alpha=0.35, label=f"{prefix}train (per step)")
        if held:
            axes.plot(*zip(*held), "o-", color=colour, label=f"{prefix}held-out")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per supervised token")
    axes.legend(fontsize="small" if len(runs) > 1 else None)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summarize(model: torch.nn.Module, history: list[dict], wall_s: float, peak_bytes: int, dropped: int,
              settings: dict) -> dict:
    """The run in one record; `settings` (epochs, length cap, QLoRA, processes, compute dtype,
    compiled layers...) are copied into it."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = [e for e in history if "loss" in e]
    held = [e["held_out_loss"] for e in history if "held_out_loss" in e]
    held_end = [e["held_out_end_loss"] for e in history if "held_out_end_loss" in e]
    tokens = sum(e["tokens"] for e in steps)
    seconds = sum(e["seconds"] for e in steps)
    return {
        "trainable_params": trainable, "wall_s": round(wall_s, 1), "peak_memory_gb": round(peak_bytes / 1e9, 2),
        "steps": len(steps), "final_train_loss": steps[-1]["loss"] if steps else None,
        "held_out_loss_before": held[0] if held else None, "held_out_loss_after": held[-1] if held else None,
        "held_out_end_loss_before": held_end[0] if held_end else None,
        "held_out_end_loss_after": held_end[-1] if held_end else None,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None, "rows_dropped_too_long": dropped,
        **settings,
    }


def summary_line(summary: dict) -> str:
    minutes, seconds = divmod(int(summary["wall_s"]), 60)
    before, after = summary["held_out_loss_before"], summary["held_out_loss_after"]
    held_out = (f"held-out loss {before:.4f} -> {after:.4f} | held-out <end_of_turn> loss "
                f"{summary['held_out_end_loss_before']:.4f} -> {summary['held_out_end_loss_after']:.4f}"
                if before is not None else "held-out loss not measured (no held-out rows)")
    return (f"done: trainable params {summary['trainable_params']:,} | wall {minutes}m{seconds:02d}s | "
            f"peak memory {summary['peak_memory_gb']:.1f} GB | {summary['tokens_per_s']} tokens/s | "
            f"train loss {summary['final_train_loss']:.4f} | {held_out}")
