"""Paired statistics vs independent references: exact McNemar (scipy's binomial test, statsmodels' mcnemar) and
Newcombe's paired square-and-add interval (the worked value of Fagerland, Lydersen & Laake's "Statistical Analysis
of Contingency Tables", ch. 8, Cavo et al. 2012 table, as pinned in the R package contingencytables' tests)."""

from __future__ import annotations

import math

import pytest

from saesteer.core import SaesteerError, mcnemar_exact, paired_diff_interval, paired_summary


@pytest.mark.parametrize("b,c", [(6, 16), (0, 5), (5, 0), (3, 3), (1, 0), (40, 61), (0, 0), (250, 200)])
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    from scipy.stats import binomtest

    ref = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_mcnemar_exact_matches_statsmodels():
    sm = pytest.importorskip("statsmodels.stats.contingency_tables")
    for a, b, c, d in [(59, 6, 16, 80), (10, 2, 9, 5), (0, 1, 7, 3)]:
        assert mcnemar_exact(b, c) == pytest.approx(sm.mcnemar([[a, b], [c, d]], exact=True).pvalue, rel=1e-9)


def test_newcombe_paired_worked_example():
    # Cavo et al. (2012): 59 / 6 / 16 / 80 -> estimate -0.0621, 95 % CI -0.1186 to -0.0046 (Newcombe square-and-add)
    d, lo, hi = paired_diff_interval(59, 6, 16, 80)
    assert round(d, 4) == -0.0621 and round(lo, 4) == -0.1186 and round(hi, 4) == -0.0046


def test_newcombe_paired_properties():
    # swapping the two conditions mirrors the interval
    d, lo, hi = paired_diff_interval(59, 6, 16, 80)
    d2, lo2, hi2 = paired_diff_interval(59, 16, 6, 80)
    assert (d2, lo2, hi2) == pytest.approx((-d, -hi, -lo))
    # identical outcomes: difference 0, an interval around it that shrinks with n
    w = [paired_diff_interval(k, 0, 0, k)[2] - paired_diff_interval(k, 0, 0, k)[1] for k in (10, 100)]
    assert paired_diff_interval(10, 0, 0, 10)[0] == 0 and w[1] < w[0]
    # bounded in [-1, 1]; empty input is nan
    assert paired_diff_interval(0, 20, 0, 0)[2] <= 1.0 and paired_diff_interval(0, 0, 20, 0)[1] >= -1.0
    assert all(math.isnan(v) for v in paired_diff_interval(0, 0, 0, 0))


def test_paired_summary_cells():
    x = [True] * 59 + [True] * 6 + [False] * 16 + [False] * 80
    y = [True] * 59 + [False] * 6 + [True] * 16 + [False] * 80
    s = paired_summary(x, y)
    assert (s["a"], s["b"], s["c"], s["d"], s["n"]) == (59, 6, 16, 80, 161)
    assert s["diff"] == pytest.approx(-10 / 161) and s["mcnemar_p"] == pytest.approx(mcnemar_exact(6, 16))
    with pytest.raises(SaesteerError):
        paired_summary([True], [True, False])


def test_standardise_fit_matches_sklearn_standard_scaler():
    """Population std, and a constant column scaled by 1 (it standardises to 0), as scikit-learn's StandardScaler."""
    import torch
    from sklearn.preprocessing import StandardScaler

    from saesteer.core import standardise_fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5, 1.0], dtype=torch.float64)
    x[:, 3] = 7.0  # constant
    mean, scale = standardise_fit(x)
    ref = StandardScaler().fit(x.numpy())
    assert torch.allclose(mean, torch.from_numpy(ref.mean_)) and torch.allclose(scale, torch.from_numpy(ref.scale_))
    assert scale[3] == 1.0 and torch.allclose((x - mean) / scale, torch.from_numpy(ref.transform(x.numpy())))
    # a column below eps counts as constant; above it keeps its own scale
    y = torch.stack([torch.arange(4.0) * 1e-7, torch.arange(4.0)], 1)
    assert standardise_fit(y)[1][0] == 1.0 and standardise_fit(y, eps=1e-9)[1][0] < 1e-6
