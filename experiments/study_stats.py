"""Rank statistics of the search-quality studies: Kendall's tau-b and Spearman's rho (scipy.stats)
with 95% percentile-bootstrap intervals over architectures, the paired bootstrap of a tau
difference, and combining several proxy instances' scores.
"""
from __future__ import annotations

import math
from typing import Sequence


BOOTSTRAP = 2000


def rank_correlations(x: Sequence[float], y: Sequence[float], seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Kendall's tau-b and Spearman's rho with 95% percentile bootstrap intervals over the pairs."""
    import numpy as np
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    out = {}
    for name, fn in (("tau", lambda a, b: stats.kendalltau(a, b).statistic),
                     ("rho", lambda a, b: stats.spearmanr(a, b).statistic)):
        point = float(fn(x, y))
        samples = []
        for _ in range(BOOTSTRAP):
            index = rng.integers(0, len(x), len(x))
            value = fn(x[index], y[index])
            if np.isfinite(value):  # a resample of one repeated pair has no ranking
                samples.append(float(value))
        low, high = (np.percentile(samples, [2.5, 97.5]) if samples else (math.nan, math.nan))
        out[name] = (point, float(low), float(high))
    return out


def paired_tau_difference(x: Sequence[float], x_other: Sequence[float], y: Sequence[float],
                          seed: int = 0) -> tuple[float, float, float]:
    """tau(x, y) - tau(x_other, y) with a 95% percentile bootstrap interval, resampling the
    architectures (the same resample for both proxies: a paired comparison)."""
    import numpy as np
    from scipy import stats

    x, x_other, y = (np.asarray(v, dtype=float) for v in (x, x_other, y))
    rng = np.random.default_rng(seed)

    def difference(index):
        return stats.kendalltau(x[index], y[index]).statistic - stats.kendalltau(x_other[index], y[index]).statistic

    point = float(difference(np.arange(len(x))))
    samples = [v for v in (difference(rng.integers(0, len(x), len(x))) for _ in range(BOOTSTRAP)) if np.isfinite(v)]
    low, high = np.percentile(samples, [2.5, 97.5]) if samples else (math.nan, math.nan)
    return point, float(low), float(high)


def combine(per_folder: Sequence[Sequence[float]], by: str) -> list[float]:
    """One score per architecture from several proxy instances (one list per folder, higher is better):
    the mean score (``by="score"``) or the mean rank within each folder (``by="rank"``, ties averaged)."""
    import numpy as np
    from scipy import stats

    values = np.asarray(per_folder, dtype=float)
    if by == "rank":
        values = np.stack([stats.rankdata(v) for v in values])
    return [float(v) for v in values.mean(axis=0)]
