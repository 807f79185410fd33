"""The statistics the report uses: medians with IQR, Spearman's rho, the paired Wilcoxon test, a paired
bootstrap confidence interval of a mean.

Example:
    >>> median_iqr([1, 2, 3, 4, 5, None])
    (3.0, 2.0)
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats

MIN_WILCOXON_PAIRS = 5
SIGNIFICANCE = 0.05


def finite(values: Iterable[Any]) -> np.ndarray:
    kept = np.asarray([v for v in values if v is not None], dtype=float)
    return kept[~np.isnan(kept)]


def median(values: Iterable[Any]) -> float | None:
    kept = finite(values)
    return float(np.median(kept)) if kept.size else None


def median_iqr(values: Iterable[float | None]) -> tuple[float, float]:
    """Median and interquartile range (q75 - q25), ignoring ``None`` and NaN; NaNs when nothing is left.

    >>> median_iqr([1, 2, 3, 4, 5, None])
    (3.0, 2.0)
    """
    kept = finite(values)
    if not kept.size:
        return math.nan, math.nan
    q25, median, q75 = np.percentile(kept, [25, 50, 75])
    return float(median), float(q75 - q25)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho, or ``None`` when under 3 points or either side is constant.

    >>> spearman([1, 2, 3, 4], [8, 6, 4, 2])
    -1.0
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.spearmanr(x, y).statistic)


def wilcoxon_p(differences: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; ``None`` under 5 pairs or all zero.

    >>> wilcoxon_p([-0.01] * 5)
    0.0625
    """
    differences = finite(differences)
    if differences.size < MIN_WILCOXON_PAIRS or not np.any(differences):
        return None
    return float(stats.wilcoxon(differences).pvalue)


def bootstrap_mean_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences: resample the pairs (concepts) with replacement,
    ``resamples`` times, with a fixed seed (the same data give the same interval). NaNs when under 2 values.

    >>> low, high = bootstrap_mean_ci([0.01, -0.02, 0.0, 0.03, -0.01, 0.02])
    >>> round(low, 4), round(high, 4)
    (-0.0083, 0.0183)
    """
    kept = finite(values)
    if kept.size < 2:
        return math.nan, math.nan
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (got {confidence})")
    rng = np.random.default_rng(seed)
    means = kept[rng.integers(0, kept.size, size=(resamples, kept.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    present = set(names)
    return [name for name in order if name in present] + sorted(present - set(order))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def difference(value: float | None, reference: float | None) -> float | None:
    return value - reference if value is not None and reference is not None else None


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
