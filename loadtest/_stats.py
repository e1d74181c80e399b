"""Exact sample statistics and distribution-free confidence bounds.

Percentiles are numpy's default (linear interpolation between closest ranks,
Hyndman-Fan type 7) over every sample, never bucketed. The confidence bounds
of a percentile are order statistics (no assumption about the distribution):
the lower bound is the largest sample X(l) with P(X(l) <= true percentile) >=
95 %, the upper bound the smallest X(u) with P(X(u) >= true percentile) >= 95 %;
with too few samples a bound does not exist (None). The mean's bounds use the
normal approximation (z = 1.645) and need 30 samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

CONFIDENCE = 0.95
Z = 1.6448536269514722  # standard normal quantile at CONFIDENCE
MEAN_MIN_SAMPLES = 30
Status = Literal["PASS", "FAIL", "INCONCLUSIVE"]


def percentile(values: Sequence[float], q: float) -> float:
    """Exact type-7 percentile, q in 0..100; +inf samples (failed requests) stay +inf, never NaN."""
    ordered = sorted(values)
    h = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(h), math.ceil(h)
    if ordered[lo] == ordered[hi] or h == lo:
        return float(ordered[lo])
    return float(ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo]))


def _binom_cdf(n: int, p: float) -> list[float]:
    """P(Bin(n, p) <= k) for k = 0..n, summed in log space so large n stays exact enough."""
    if p <= 0 or p >= 1:
        raise ValueError("p must be in (0, 1)")
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
            for k in range(n + 1)]
    cdf, total = [], 0.0
    for value in logs:
        total += math.exp(value)
        cdf.append(min(total, 1.0))
    return cdf


def percentile_bounds(sorted_values: Sequence[float], q: float) -> tuple[float | None, float | None]:
    """One-sided 95 % distribution-free bounds (lower, upper) of the q-th percentile (q in 0..100)."""
    n, p = len(sorted_values), q / 100
    if n == 0:
        return None, None
    cdf = _binom_cdf(n, p)
    # P(X(l) <= xi) = P(Bin >= l) = 1 - cdf[l-1]; the largest l that keeps it >= 95 %
    lower_rank = max((l for l in range(1, n + 1) if 1 - cdf[l - 1] >= CONFIDENCE), default=None)
    # P(X(u) >= xi) = P(Bin <= u-1) = cdf[u-1]; the smallest u that reaches 95 %
    upper_rank = min((u for u in range(1, n + 1) if cdf[u - 1] >= CONFIDENCE), default=None)
    lower = float(sorted_values[lower_rank - 1]) if lower_rank else None
    upper = float(sorted_values[upper_rank - 1]) if upper_rank else None
    return lower, upper


def support(q: float) -> int:
    """Fewest samples for which the q-th percentile is not simply the extreme sample."""
    share = min(q, 100 - q) / 100
    return math.ceil(1 / share)


@dataclass(frozen=True)
class Estimate:
    """A KPI's value from exact samples with its 95 % bounds and sample count."""

    value: float | None
    low: float | None
    high: float | None
    samples: int
    support: int  # samples needed before a miss of the point value alone counts as a failure

    @classmethod
    def of_percentile(cls, values: Sequence[float], q: float) -> "Estimate":
        ordered = sorted(values)
        if not ordered:
            return cls(None, None, None, 0, support(q))
        low, high = percentile_bounds(ordered, q)
        return cls(percentile(ordered, q), low, high, len(ordered), support(q))

    @classmethod
    def of_mean(cls, values: Sequence[float]) -> "Estimate":
        n = len(values)
        if n == 0:
            return cls(None, None, None, 0, MEAN_MIN_SAMPLES)
        mean = float(np.mean(values))
        if n < MEAN_MIN_SAMPLES:
            return cls(mean, None, None, n, MEAN_MIN_SAMPLES)
        half = Z * float(np.std(values, ddof=1)) / math.sqrt(n)
        return cls(mean, mean - half, mean + half, n, MEAN_MIN_SAMPLES)


def judge(est: Estimate, passes: Callable[[float], bool], higher_is_better: bool) -> tuple[Status | None, str]:
    """PASS only when the bound on the failing side meets the target; FAIL when the bound on the
    passing side misses it, or the value misses it with enough samples; else INCONCLUSIVE.

    Returns (None, why) when there are no samples.
    """
    if est.value is None:
        return None, "no samples"
    fail_side, pass_side = (est.low, est.high) if higher_is_better else (est.high, est.low)
    if fail_side is not None and passes(fail_side):
        return "PASS", ""
    if pass_side is not None and not passes(pass_side):
        return "FAIL", "the whole 95 % interval misses the target"
    if not passes(est.value) and est.samples >= est.support:
        return "FAIL", ""
    if fail_side is None:
        return "INCONCLUSIVE", f"{est.samples} samples cannot bound it (a 95 % bound needs more)"
    return "INCONCLUSIVE", "the 95 % interval includes the target"
