"""ippo.demo.stats: standard errors, paired differences, steps to a target, ROC AUC."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from ippo.demo import stats


def test_binomial_se_values_and_errors():
    assert stats.binomial_se(0.5, 500) == pytest.approx(math.sqrt(0.25 / 500))
    assert stats.binomial_se(0.5, 500) <= 0.0224  # the bound: <= 2.2 points at n >= 500
    assert stats.binomial_se(0.0, 10) == 0.0 and stats.binomial_se(1.0, 10) == 0.0
    for p, n in ((0.5, 0), (1.2, 10), (-0.1, 10)):
        with pytest.raises(ValueError):
            stats.binomial_se(p, n)


def test_binomial_se_matches_simulation():
    rng = random.Random(0)
    p, n = 0.37, 400
    estimates = [sum(rng.random() < p for _ in range(n)) / n for _ in range(2000)]
    assert statistics.stdev(estimates) == pytest.approx(stats.binomial_se(p, n), rel=0.06)


def test_mean_se():
    m, se, k = stats.mean_se([1.0, 2.0, 3.0, 4.0])
    assert (m, k) == (2.5, 4) and se == pytest.approx(statistics.stdev([1, 2, 3, 4]) / 2)
    m, se, k = stats.mean_se([0.3, None, float("nan"), float("inf")])  # non-finite values are dropped
    assert (m, k) == (0.3, 1) and math.isnan(se)
    m, se, k = stats.mean_se([])
    assert math.isnan(m) and math.isnan(se) and k == 0


def test_paired_difference_cancels_shared_seed_noise():
    # Two methods share a large per-seed offset; their paired difference is exactly 0.1 on every seed.
    seed_effect = [0.1, 0.5, -0.3, 0.2]
    a = [0.6 + e for e in seed_effect]
    b = [0.5 + e for e in seed_effect]
    m, se, k = stats.paired_difference(a, b)
    assert m == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-12) and k == 4
    unpaired_se = math.hypot(stats.mean_se(a)[1], stats.mean_se(b)[1])
    assert unpaired_se > 0.1  # unpaired, the same data would look like noise
    m, se, k = stats.paired_difference([0.5, None, 0.7], [0.4, 0.3, float("nan")])  # only complete pairs
    assert (round(m, 12), k) == (0.1, 1)
    with pytest.raises(ValueError, match="pair them by seed"):
        stats.paired_difference([0.1, 0.2], [0.1])


def test_steps_to_reach():
    curve = [(0, 0.4), (5, 0.55), (10, 0.7), (15, 0.65)]
    assert stats.steps_to_reach(curve, 0.55) == 5
    assert stats.steps_to_reach(curve, 0.6) == 10
    assert stats.steps_to_reach(curve, 0.3) == 0
    assert stats.steps_to_reach(curve, 0.9) is None
    assert stats.steps_to_reach(list(reversed(curve)), 0.6) == 10  # order of the points does not matter


def test_roc_auc_known_values():
    assert stats.roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert stats.roc_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert stats.roc_auc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert stats.roc_auc([5, 5, 5, 5], [True, False, True, False]) == 0.5
    assert stats.roc_auc([2, 3, 1, 2], [True, True, False, False]) == pytest.approx(0.875)
    assert math.isnan(stats.roc_auc([1.0, 2.0], [True, True]))
    with pytest.raises(ValueError):
        stats.roc_auc([1.0], [True, False])


def test_roc_auc_matches_pairwise_definition():
    rng = random.Random(1)
    scores = [rng.randint(0, 5) for _ in range(80)]  # many ties
    labels = [rng.random() < 0.4 for _ in range(80)]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    want = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert stats.roc_auc(scores, labels) == pytest.approx(want)


def test_t_critical_values():
    assert stats.t_critical_95(1) == pytest.approx(12.706)
    assert stats.t_critical_95(2) == pytest.approx(4.303)
    assert stats.t_critical_95(4) == pytest.approx(2.776)
    assert stats.t_critical_95(100) == 1.96
    assert all(stats.t_critical_95(d) > stats.t_critical_95(d + 1) for d in range(1, 30))
    with pytest.raises(ValueError):
        stats.t_critical_95(0)


def test_t_critical_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 10, 30):
        assert stats.t_critical_95(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-3)


def test_demo_verdict_is_a_t_test_over_seeds():
    from ippo.demo.report import verdict

    assert verdict([0.03, 0.011, 3]) == "not distinguishable"  # t = 2.7 < 4.30 with 3 seeds
    assert verdict([0.03, 0.005, 3]) == "higher"  # t = 6 > 4.30
    assert verdict([-0.03, 0.005, 3]) == "lower"
    assert verdict([0.03, 0.011, 6]) == "higher"  # t = 2.7 > 2.57 with 6 seeds
    assert verdict([0.05, float("nan"), 1]) == "one seed"
    assert verdict([0.0, 0.0, 3]) == "not distinguishable"
