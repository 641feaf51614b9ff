"""Small statistics for RL measurements: standard errors, paired differences over seeds, ROC AUC.

Why these and nothing fancier: an RL comparison here is a handful of seeds, each scored on a few
hundred test problems. Two sources of noise matter and both get a number:

* the test set: one accuracy p measured on n problems has binomial standard error sqrt(p(1-p)/n);
* the seeds: a method's mean over k seeds has standard error stdev / sqrt(k), and two methods run
  on the same seeds (same prompts, same sampling seeds) are compared by their *paired* per-seed
  differences, which cancels the seed-to-seed variation they share.

Pure Python on floats (no numpy/scipy), NaN-tolerant where a run may lack a value.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["binomial_se", "finite", "mean_se", "paired_difference", "roc_auc", "steps_to_reach", "t_critical_95"]

# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom (then the normal 1.96):
# with k seeds a mean difference is "real" only when |mean| > t(k-1) * s.e. -- 12.7 s.e. for 2 seeds,
# 4.30 for 3, 2.78 for 5 -- because the s.e. itself is estimated from k numbers.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t_critical_95(df: int) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_critical_95: df={df} must be >= 1")
    return _T95[df - 1] if df <= len(_T95) else 1.96


def finite(xs: Sequence[float | None]) -> list[float]:
    """The values that are numbers and finite (None / NaN / Inf dropped)."""
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion ``p`` measured on ``n`` independent trials."""
    if n <= 0:
        raise ValueError(f"binomial_se: n={n} must be > 0")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_se: p={p} is not a proportion")
    return math.sqrt(p * (1.0 - p) / n)


def mean_se(xs: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, standard error of the mean, count) of the finite values; s.e. is NaN for fewer than 2."""
    v = finite(xs)
    if not v:
        return float("nan"), float("nan"), 0
    if len(v) == 1:
        return v[0], float("nan"), 1
    return statistics.fmean(v), statistics.stdev(v) / math.sqrt(len(v)), len(v)


def paired_difference(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean and standard error of ``a[i] - b[i]`` over the pairs where both are finite (same seeds)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} values vs {len(b)}: pair them by seed")
    return mean_se([x - y for x, y in zip(a, b) if finite([x]) and finite([y])])


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """First x of ``curve`` (sorted (x, value) points) whose value is >= ``target``; None if never."""
    for x, v in sorted(curve):
        if v is not None and math.isfinite(v) and v >= target:
            return x
    return None


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U / (n+ n-)).

    NaN when either class is empty. Rank-based: average ranks over tied scores.
    """
    if len(scores) != len(labels):
        raise ValueError(f"roc_auc: {len(scores)} scores vs {len(labels)} labels")
    pairs = sorted(zip(scores, labels), key=lambda x: x[0])
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j) / 2 + 1  # 1-based average rank of the tie group
        rank_sum += avg_rank * sum(1 for k in range(i, j + 1) if pairs[k][1])
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
