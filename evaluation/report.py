"""The evaluation's results: rates with 95% Wilson intervals, one Report per model, and the
comparison table (markdown), CSV and plot written from them."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.generation_cache import GenerationStats
from evaluation.sandbox import Outcome

Z_95 = 1.959963984540054
# CSV column -> (Report attribute, label in the plot), in the order of the CSV and the plot.
RATE_LABELS = {
    "syntax_accuracy": ("syntax", "syntax valid"),
    "held_out_pass1": ("held_out_pass", "held-out doctests"),
    "humaneval_pass1": ("humaneval_chat", "HumanEval chat"),
    "humaneval_raw_pass1": ("humaneval_raw", "HumanEval raw"),
    "ended_turn": ("ended", "ended turn"),
    "stopped_otherwise": ("stopped_otherwise", "other early stop"),
    "defines_function": ("defines", "defines function"),
}

# CSV column -> the key of train_summary.json it copies (empty for models train.py did not train).
TRAINING_COLUMNS = {
    "trainable_params": "trainable_params", "train_wall_s": "wall_s", "train_tokens_per_s": "tokens_per_s",
    "train_peak_memory_gb": "peak_memory_gb", "held_out_loss": "held_out_loss_after",
}


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval of a rate; unlike the normal approximation it stays inside
    [0, 1] and is sensible at 0 or n successes. (0, 1) when there is no sample at all."""
    if total == 0:
        return 0.0, 1.0
    rate = successes / total
    denominator = 1 + z * z / total
    centre = (rate + z * z / (2 * total)) / denominator
    half_width = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


@dataclass(frozen=True)
class Rate:
    successes: int
    total: int

    @property
    def percent(self) -> float:
        return 100 * self.successes / self.total if self.total else float("nan")

    @property
    def interval_percent(self) -> tuple[float, float]:
        low, high = wilson_interval(self.successes, self.total)
        return 100 * low, 100 * high

    def __str__(self) -> str:
        if not self.total:
            return "-"
        low, high = self.interval_percent
        return f"{self.percent:.1f} [{low:.1f}, {high:.1f}] ({self.successes}/{self.total})"


def count_passed(outcomes: Sequence[Outcome]) -> Rate:
    return Rate(sum(outcome.passed for outcome in outcomes), len(outcomes))


@dataclass
class Report:
    label: str
    adapter: str
    syntax: Rate
    bleu_mean: float
    bleu_std: float
    corpus_bleu: float
    # The answers' total length over the references' (sacrebleu's tokens): below 1 corpus BLEU's brevity
    # penalty exp(1 - 1/ratio) scales the score down, however precise the answers' n-grams are.
    corpus_length_ratio: float
    held_out_pass: Rate
    humaneval_chat: Rate
    humaneval_raw: Rate
    ended: Rate  # chat answers that ended at <end_of_turn> or end-of-sequence
    stopped_otherwise: Rate  # chat answers that stopped early at another token (an invented <start_of_turn>)
    defines: Rate  # held-out rows with an entry point whose answer parses and defines it
    generation: GenerationStats = field(default_factory=GenerationStats)
    training: dict = field(default_factory=dict)  # the adapter's train_summary.json ({} for base, reference)

    def csv_row(self) -> dict:
        # The study's columns first; the syntax rate's own entry below then only adds its interval.
        row = {"model": self.label, "syntax_accuracy": round(self.syntax.percent, 2),
               "bleu_score": round(self.bleu_mean, 2), "bleu_std": round(self.bleu_std, 2)}
        row |= {"corpus_bleu": round(self.corpus_bleu, 2), "corpus_length_ratio": round(self.corpus_length_ratio, 3),
                "adapter": self.adapter}
        for name, rate in self.rates().items():
            low, high = rate.interval_percent
            row |= {name: round(rate.percent, 2), f"{name}_ci_low": round(low, 2), f"{name}_ci_high": round(high, 2),
                    f"{name}_n": rate.total}
        row |= {"generated_tokens": self.generation.new_tokens, "generation_s": round(self.generation.seconds, 1),
                "tokens_per_s": round(self.generation.tokens_per_second, 1)}
        return row | {column: self.training.get(key) for column, key in TRAINING_COLUMNS.items()}

    def rates(self) -> dict[str, Rate]:
        """CSV column name -> rate, in the order of RATE_LABELS."""
        return {name: getattr(self, attribute) for name, (attribute, _) in RATE_LABELS.items()}


def markdown_table(reports: Sequence[Report]) -> str:
    header = ("| model | syntax valid % [95% CI] | defines the function % | BLEU mean ± std | corpus BLEU (length ratio) | "
              "HumanEval pass@1 chat | HumanEval pass@1 raw | held-out doctest pass@1 | ended turn % | other early stop % | "
              "generated tok/s |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for report in reports:
        speed = f"{report.generation.tokens_per_second:.0f}" if report.generation.seconds else "-"
        lines.append(f"| {report.label} | {report.syntax} | {report.defines} | {report.bleu_mean:.2f} ± {report.bleu_std:.2f} | "
                     f"{report.corpus_bleu:.2f} ({report.corpus_length_ratio:.2f}) | {report.humaneval_chat} | {report.humaneval_raw} | "
                     f"{report.held_out_pass} | {report.ended} | {report.stopped_otherwise} | {speed} |")
    trained = [report for report in reports if report.training]
    if trained:
        lines += ["", "| model | trainable params | training wall time | training tokens/s | peak memory | "
                      "held-out loss before -> after |", "|---|---|---|---|---|---|"]
        lines += [_training_row(report.label, report.training) for report in trained]
    return "\n".join(lines) + "\n"


def _training_row(label: str, summary: dict) -> str:
    minutes, seconds = divmod(round(summary.get("wall_s") or 0), 60)
    return (f"| {label} | {summary.get('trainable_params', 0):,} | {minutes}m{seconds:02d}s | "
            f"{summary.get('tokens_per_s')} | {summary.get('peak_memory_gb')} GB | "
            f"{_loss(summary, 'held_out_loss_before')} -> {_loss(summary, 'held_out_loss_after')} |")


def _loss(summary: dict, key: str) -> str:
    value = summary.get(key)
    return "-" if value is None else f"{value:.4f}"


def write_csv(path: Path, reports: Sequence[Report]) -> None:
    rows = [report.csv_row() for report in reports]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, reports: Sequence[Report]) -> None:
    """Rates with their 95% intervals on the left, BLEU on the right, one bar colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates_axis, bleu_axis) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(reports)
    labels = [label for _, label in RATE_LABELS.values()]
    for offset, report in enumerate(reports):
        rates = list(report.rates().values())
        heights = [rate.percent if rate.total else 0 for rate in rates]
        errors = [[max(0.0, rate.percent - rate.interval_percent[0]) if rate.total else 0 for rate in rates],
                  [max(0.0, rate.interval_percent[1] - rate.percent) if rate.total else 0 for rate in rates]]
        positions = [index + offset * width for index in range(len(rates))]
        rates_axis.bar(positions, heights, width, yerr=errors, capsize=3, label=report.label)
        bleu_axis.bar([offset * width, 1 + offset * width], [report.bleu_mean, report.corpus_bleu], width,
                      yerr=[report.bleu_std, 0], capsize=3, label=report.label)
    center = 0.4 - width / 2
    rates_axis.set_xticks([index + center for index in range(len(labels))], labels)
    rates_axis.set_ylabel("% (95% Wilson interval)")
    rates_axis.set_ylim(0, 105)
    rates_axis.legend()
    bleu_axis.set_xticks([center, 1 + center], ["sentence BLEU\n(mean ± std)", "corpus BLEU"])
    bleu_axis.set_ylabel("BLEU")
    figure.suptitle("Base model and adapters")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
