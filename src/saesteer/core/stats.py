"""Interval statistics for rates and differences (Wilson, Newcombe), and paired tests on the same items (exact
McNemar, Newcombe's paired interval)."""

from __future__ import annotations

import math
from typing import Sequence

from .errors import ensure


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


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs ``b`` (yes → no) and ``c`` (no → yes): the binomial
    test of ``b`` in ``b + c`` trials at 1/2, i.e. ``min(1, 2 P(X <= min(b, c)))`` (1.0 when there is no discordant
    pair). Exact integer arithmetic, so any n works."""
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(int(b), int(c)) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_diff_interval(a: int, b: int, c: int, d: int, z: float = 1.959964) -> tuple[float, float, float]:
    """Paired difference ``p1 - p2 = (b - c) / n`` with Newcombe's square-and-add interval for paired data (Newcombe
    1998, Stat Med 17:2635, method 10: Wilson intervals of both margins, combined with their correlation phi, phi
    shrunk by n/2 toward 0 when positive). Cells: ``a`` both yes, ``b`` yes in 1 only, ``c`` yes in 2 only, ``d``
    both no."""
    n = a + b + c + d
    if n <= 0:
        return (float("nan"), float("nan"), float("nan"))
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if margins > 0:
        cross = a * d - b * c
        phi = (cross - n / 2) / math.sqrt(margins) if cross > n / 2 else (cross / math.sqrt(margins) if cross < 0 else 0.0)
    dl1, du1, dl2, du2 = p1 - l1, u1 - p1, p2 - l2, u2 - p2
    diff = p1 - p2
    lo = diff - math.sqrt(max(0.0, dl1**2 - 2 * phi * dl1 * du2 + du2**2))
    hi = diff + math.sqrt(max(0.0, du1**2 - 2 * phi * du1 * dl2 + dl2**2))
    return (diff, max(-1.0, lo), min(1.0, hi))


def paired_summary(x: Sequence[bool], y: Sequence[bool]) -> dict[str, float | int]:
    """Paired comparison of two binary outcomes on the same items (``x[i]``, ``y[i]``): the 2x2 cells, the
    difference rate(x) - rate(y) with its Newcombe paired 95 % interval, and the exact McNemar p-value."""
    ensure(len(x) == len(y), f"paired outcomes of different lengths: {len(x)} and {len(y)}")
    a = sum(1 for u, v in zip(x, y) if u and v)
    b = sum(1 for u, v in zip(x, y) if u and not v)
    c = sum(1 for u, v in zip(x, y) if v and not u)
    diff, lo, hi = paired_diff_interval(a, b, c, len(x) - a - b - c)
    return {"n": len(x), "a": a, "b": b, "c": c, "d": len(x) - a - b - c, "diff": diff, "ci_low": lo, "ci_high": hi,
            "mcnemar_p": mcnemar_exact(b, c)}


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


def standardise_fit(x, eps: float = 1e-6):
    """Column means and population standard deviations of a 2-D tensor ``x`` ``[n, m]``, for ``(x - mean) / scale``;
    a scale ≤ ``eps`` (a constant column) becomes 1, so that column standardises to 0 instead of dividing by ~0.
    The gates and the probe judge both standardise their features with it."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, std.masked_fill(std <= eps, 1.0)
