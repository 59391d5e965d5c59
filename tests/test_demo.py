"""demo: every stage is a real CLI command whose options exist, and finished stages are skipped."""

from __future__ import annotations

import json
import re

import pytest
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
    for stage in stages:
        path, used = _options(stage.argv)
        res = runner.invoke(app, [*path, "--help"], terminal_width=400)
        assert res.exit_code == 0, (stage.name, res.output)
        known = set(re.findall(r"--[a-z0-9][a-z0-9-]*", res.output))
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
