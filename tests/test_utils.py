"""utils: intervals against known values, atomic writes that leave nothing behind on failure."""

from __future__ import annotations

import json
import math

import pytest

from saesteer.core import (
    SaesteerError,
    atomic_dir,
    atomic_write_json,
    diff_interval,
    rate_summary,
    read_json,
    wilson_interval,
)


def test_wilson_known_values():
    # Reference values (Wilson 1927; e.g. statsmodels proportion_confint(method="wilson")).
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_wilson_contains_the_rate_at_the_edges():
    for n in range(1, 200):
        for k in (0, n):
            lo, hi = wilson_interval(k, n)
            assert lo <= k / n <= hi


def test_rate_summary_shape():
    s = rate_summary(3, 12)
    assert s["rate"] == 0.25 and s["k"] == 3 and s["n"] == 12 and s["ci_low"] < 0.25 < s["ci_high"]


def test_diff_interval_newcombe():
    # Newcombe (1998) example: 56/70 vs 48/80 → difference 0.2, 95 % CI (0.0524, 0.3339).
    d, lo, hi = diff_interval(56, 70, 48, 80)
    assert d == pytest.approx(0.2)
    assert lo == pytest.approx(0.0524, abs=1e-3) and hi == pytest.approx(0.3339, abs=1e-3)


def test_atomic_json_roundtrip_and_no_tmp_left(tmp_path):
    p = atomic_write_json(tmp_path / "a" / "x.json", {"a": 1})
    assert read_json(p) == {"a": 1}
    assert sorted(f.name for f in p.parent.iterdir()) == ["x.json"]
    assert (p.stat().st_mode & 0o644) == 0o644


def test_atomic_json_failure_keeps_old_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"old": True}))
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert read_json(p) == {"old": True}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces(tmp_path):
    target = tmp_path / "out"
    for v in ("1", "2"):
        with atomic_dir(target) as tmp:
            (tmp / "v").write_text(v)
    assert (target / "v").read_text() == "2" and [f.name for f in tmp_path.iterdir()] == ["out"]


def test_read_json_errors(tmp_path):
    with pytest.raises(SaesteerError, match="not found"):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(SaesteerError, match="not valid JSON"):
        read_json(bad)


def test_progress_bar_rate_eta_and_quiet(capsys):
    from saesteer.core import progress_bar

    with progress_bar(4, "gen", unit="prompt", enabled=True, leave=True) as bar:
        bar.update(2, tokens=100)
        bar.describe("fvu 0.1")
        bar.update(2, tokens=50)
    err = capsys.readouterr().err
    assert "gen" in err and "4/4" in err and "prompt/s" in err and "tok/s" in err and "fvu 0.1" in err
    assert bar.tokens == 150
    with progress_bar(3, "quiet", enabled=False) as bar:
        bar.update(3, tokens=9)
    assert capsys.readouterr().err == ""
