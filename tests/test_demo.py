"""demo: every stage is a real CLI command whose options exist, and finished stages are skipped."""

from __future__ import annotations

import json

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from saesteer.cli import app
from saesteer.cli.demo import BUDGETS, _done, demo_stages


def _options(argv: list[str]) -> tuple[list[str], set[str]]:
    """(command path, long options used) of a stage's argv."""
    path = []
    for a in argv:
        if a.startswith("--"):
            break
        path.append(a)
    return path, {a for a in argv if a.startswith("--")}


@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_every_stage_uses_existing_commands_and_options(tmp_path, budget):
    runner = CliRunner()
    stages = demo_stages("qwen2.5-coder-0.5b-instruct", tmp_path, 12, BUDGETS[budget], ["--device", "cpu"])
    names = [s.name for s in stages]
    assert names[:4] == ["collect", "train", "sae-eval", "features"] and names[-1] == "compare"
    root = get_command(app)
    for stage in stages:
        path, used = _options(stage.argv)
        res = runner.invoke(app, [*path, "--help"], terminal_width=400)
        assert res.exit_code == 0, (stage.name, res.output)
        cmd = root
        for name in path:  # the command object itself (its help table may shorten long option names)
            cmd = cmd.commands[name]
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
        assert used <= known, (stage.name, used - known)
    compare = stages[-1].argv
    assert "gsm8k" not in compare[compare.index("--capability") + 1]  # gsm8k_limit 0 skips GSM8K, not "all"


def test_done_markers(tmp_path):
    meta = tmp_path / "meta.json"
    assert not _done(meta)
    meta.write_text(json.dumps({"complete": False}))
    assert not _done(meta)  # an interrupted collection is resumed, not skipped
    meta.write_text(json.dumps({"complete": True}))
    assert _done(meta)
    other = tmp_path / "table.md"
    other.write_text("x")
    assert _done(other)


def test_stage_runs_in_its_own_process_with_time_and_peak_rss(tmp_path, monkeypatch):
    """Each stage is a child process; demo_timings.json gets its wall time and its own peak RSS (wait4 rusage); a
    skipped stage keeps its earlier record; a failing stage stops the demo with its exit code."""
    from saesteer.cli import demo as demo_mod
    from saesteer.cli.demo import Stage, run_stage
    from saesteer.core import SaesteerError

    out = tmp_path / "run"
    (out / "compare").mkdir(parents=True)
    (out / "compare" / "table.md").write_text("| policy |\n")
    done = out / "done.txt"
    done.write_text("x")
    (out / "demo_timings.json").write_text(json.dumps({"old": {"seconds": 5.0, "peak_rss_gib": 1.5}}))
    stages = [Stage("old", ["models"], done), Stage("models", ["models"], out / "never")]
    monkeypatch.setattr(demo_mod, "demo_stages", lambda *a, **k: stages)
    res = CliRunner().invoke(app, ["demo", "--model", "tiny", "--out", str(out), "--budget", "tiny"])
    assert res.exit_code == 0, res.output
    t = json.loads((out / "demo_timings.json").read_text())
    assert t["old"] == {"seconds": 5.0, "peak_rss_gib": 1.5}
    assert t["models"]["seconds"] > 0 and 0.02 < t["models"]["peak_rss_gib"] < 4  # the child's, not the test's
    with pytest.raises(SaesteerError, match="exit code 2"):
        run_stage(["collect", "--model", str(tmp_path / "missing"), "--layer", "0", "--out", str(tmp_path / "a")])
