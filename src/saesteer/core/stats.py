"""Interval statistics for rates and paired differences (Wilson, Newcombe)."""

from __future__ import annotations

import math


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for ``k`` successes out of ``n`` (``(nan, nan)`` when n = 0)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval always contains p (float rounding can put centre + half a hair below p = 1)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def rate_summary(k: int, n: int) -> dict[str, float | int]:
    """``{"rate", "k", "n", "ci_low", "ci_high"}`` for a proportion, the shape every eval summary uses."""
    lo, hi = wilson_interval(k, n)
    return {"rate": (k / n) if n else float("nan"), "k": int(k), "n": int(n), "ci_low": lo, "ci_high": hi}


def diff_interval(k1: int, n1: int, k2: int, n2: int, z: float = 1.959964) -> tuple[float, float, float]:
    """Difference of two proportions p1 - p2 with Newcombe's hybrid-score 95 % interval (method 10)."""
    if n1 <= 0 or n2 <= 0:
        return (float("nan"), float("nan"), float("nan"))
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (d, lo, hi)


def auroc(pos, neg):
    """Column-wise AUROC of scores ``pos [n1, m]`` (label 1) against ``neg [n0, m]`` (label 0), ties counting 1/2
    (Mann-Whitney U from average ranks), as float64; NaN columns when a group is empty."""
    import torch
    from scipy.stats import rankdata

    n1, n0 = pos.shape[0], neg.shape[0]
    if n1 == 0 or n0 == 0:
        return torch.full((pos.shape[1],), float("nan"), dtype=torch.float64)
    x = torch.cat([pos, neg]).double().cpu().numpy()
    ranks = torch.from_numpy(rankdata(x, axis=0, method="average"))
    return (ranks[:n1].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)
