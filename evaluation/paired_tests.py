"""Paired comparisons of two models that answered the same items: the exact McNemar test.

Two models scored on the same 218 held-out rows (or the same 164 HumanEval problems) are not two
independent samples: most items are passed by both or failed by both, and only the discordant ones
(passed by one model only) say which model is better. Under "no difference" each discordant item is
a fair coin, so with b items won by A and c by B the two-sided exact p-value is

    p = min(1, 2 * P(X <= min(b, c))),   X ~ Binomial(b + c, 1/2).

The per-item outcomes come from evaluate.py's eval_samples/<model>.jsonl files.

    python -m evaluation.paired_tests lora_r16 qlora_r16 [--samples outputs/eval_samples]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from common.files import FileError, read_jsonl

SIGNIFICANCE = 0.05
# What is compared -> (how its items' task names end or start, the per-item field that holds the outcome).
MEASURES = {
    "syntax valid": ("held_out/", "valid"),
    "HumanEval chat pass@1": ("/chat", "passed"),
}


def exact_mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs (1.0 when there are none)."""
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedResult:
    measure: str
    model_a: str
    model_b: str
    a_passed: int
    b_passed: int
    items: int
    only_a: int  # items model A passed and model B failed
    only_b: int

    @property
    def p_value(self) -> float:
        return exact_mcnemar_p(self.only_a, self.only_b)

    def in_words(self) -> str:
        if self.p_value >= SIGNIFICANCE:
            return f"no significant difference (p = {self.p_value:.3g})"
        better, worse = (self.model_a, self.model_b) if self.only_a > self.only_b else (self.model_b, self.model_a)
        return f"{better} is better than {worse} (p = {self.p_value:.3g})"


def item_outcomes(samples_path: Path, measure: str) -> dict[str, bool]:
    """Task name -> passed, for one measure, from an eval_samples file."""
    marker, field = MEASURES[measure]
    outcomes = {}
    for where, record in read_jsonl(samples_path, "evaluation samples"):
        task = record.get("task", "") if isinstance(record, dict) else ""
        if task.startswith(marker) if marker.endswith("/") else task.endswith(marker):
            if not isinstance(record.get(field), bool):
                raise FileError(f"{where}: {task} has no true/false '{field}'")
            outcomes[task] = record[field]
    return outcomes


def compare(samples_dir: Path, model_a: str, model_b: str, measure: str) -> PairedResult:
    """McNemar's comparison of two models on the items both answered; they must be the same items."""
    a = item_outcomes(samples_dir / f"{model_a}.jsonl", measure)
    b = item_outcomes(samples_dir / f"{model_b}.jsonl", measure)
    if a.keys() != b.keys() or not a:
        raise FileError(f"{model_a} and {model_b} were not scored on the same {measure} items "
                         f"({len(a)} and {len(b)} items in {samples_dir}): evaluate them in one run")
    return PairedResult(measure, model_a, model_b, sum(a.values()), sum(b.values()), len(a),
                        sum(a[task] and not b[task] for task in a), sum(b[task] and not a[task] for task in a))


def markdown(results: list[PairedResult]) -> str:
    lines = ["| measure | A | B | A passed | B passed | only A | only B | exact McNemar p | in words |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        lines.append(f"| {result.measure} | {result.model_a} | {result.model_b} | {result.a_passed}/{result.items} | "
                     f"{result.b_passed}/{result.items} | {result.only_a} | {result.only_b} | {result.p_value:.3g} | "
                     f"{result.in_words()} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_a", help="a model's label in the evaluation (base, or an adapter folder's name)")
    parser.add_argument("model_b", help="the other model's label")
    parser.add_argument("--samples", default="outputs/eval_samples",
                        help="evaluate.py's per-sample folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        results = [compare(Path(args.samples), args.model_a, args.model_b, measure) for measure in MEASURES]
    except FileError as error:
        print(f"paired_tests.py: error: {error}", file=sys.stderr)
        return 2
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
