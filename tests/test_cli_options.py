"""Every command keeps its options: the option names of each command (and subcommand) equal a recorded list
(tests/data/cli_options.json — update it deliberately when a command gains or loses an option). Also: the steering
options are declared once (cli/options.py) and reach the library translator the same way from every command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.main import get_command

from saesteer.cli import app
from saesteer.cli.options import SteeringOptions, steering_options

RECORDED = Path(__file__).parent / "data" / "cli_options.json"


def option_sets(cmd, prefix: str = "") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    opts = sorted(o for p in cmd.params for o in list(getattr(p, "opts", [])) + list(getattr(p, "secondary_opts", [])))
    sub = getattr(cmd, "commands", None)
    if sub:
        for name, c in sorted(sub.items()):
            out.update(option_sets(c, f"{prefix} {name}".strip()))
        if prefix == "":
            out["(root)"] = opts
        return out
    out[prefix] = opts
    return out


def test_every_command_has_its_recorded_options():
    now = option_sets(get_command(app))
    recorded = json.loads(RECORDED.read_text())
    assert sorted(now) == sorted(recorded), "commands added or removed"
    diff = {k: (sorted(set(recorded[k]) - set(now[k])), sorted(set(now[k]) - set(recorded[k])))
            for k in now if set(now[k]) != set(recorded[k])}
    assert diff == {}, f"options (missing, new) per command: {diff}"


@pytest.mark.parametrize("name", ["reproduce_default.sh", "baselines_demo.sh", "compare_full.sh", "broken_clamps.sh"])
def test_reproduce_script_runs_existing_commands_and_options(name):
    """A dry run of the result scripts (scripts/reproduce_default.sh takes hours, so its options must not rot unseen):
    every ``$S <command> --option`` they run names a command and options that exist."""
    script = Path(__file__).parents[1] / "scripts" / name
    text = re.sub(r"\\\n\s*", " ", script.read_text())  # continuation lines joined
    recorded = json.loads(RECORDED.read_text())
    runs = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or "$S " not in line:
            continue
        rest = line.split("$S ", 1)[1]
        words = rest.split()
        cmd = " ".join(words[:2]) if " ".join(words[:2]) in recorded else words[0]
        assert cmd in recorded, f"{name} runs an unknown command: {line.strip()[:120]}"
        opts = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)
        unknown = sorted(set(opts) - set(recorded[cmd]))
        assert not unknown, f"`saesteer {cmd}` has no option {unknown} ({line.strip()[:120]})"
        runs.append(cmd)
    if name == "reproduce_default.sh":  # the headline's own commands are in baselines_demo.sh / compare_full.sh
        assert runs.count("compare") >= 3 and "eval multiturn" in runs and "scripts/headline.sh" in text
    elif name == "compare_full.sh":  # its second judge is calibrated first (once)
        assert runs == ["eval calibrate-judge", "compare"]
    elif name == "broken_clamps.sh":
        assert runs == ["eval refusal"]
    else:
        assert runs.count("policy fit") == 4 and runs.count("compare") == 1 and "direction" in runs


def test_steering_options_reach_one_translator(tmp_path, monkeypatch):
    """generate's repeated -f / -c and the evals' comma lists end as the same SteeringOptions → same specs."""
    seen = []

    @steering_options("sae", "feature", "clamp", short=True)
    def cmd(x: int = 1, steering: SteeringOptions = None):
        seen.append(steering)

    cmd(x=2, sae=None, feature=["1,2"], clamp=["3"])
    cmd(x=2, sae=None, feature=["1", "2"], clamp=["3"])
    assert seen[0].feature == ["1,2"] and seen[1].feature == ["1", "2"]
    from saesteer.gating import split_values

    assert split_values(seen[0].feature, int, "f") == split_values(seen[1].feature, int, "f") == [1, 2]
    assert split_values("1+2", int, "f") == [1, 2]  # lm-eval model_args cannot hold commas


def test_translator_errors_are_one_line(tmp_path):
    from saesteer.core import SaesteerError
    from saesteer.gating import steering_from_options

    assert steering_from_options() is None
    with pytest.raises(SaesteerError, match="need --sae"):
        steering_from_options(feature="3", clamp="1")
    with pytest.raises(SaesteerError, match="SAE not found"):
        steering_from_options(sae=tmp_path / "nope", feature="3", clamp="1")
    with pytest.raises(SaesteerError, match="must be integers"):
        steering_from_options(feature="x")
    with pytest.raises(SaesteerError, match="direction file not found"):
        steering_from_options(direction=tmp_path / "d.safetensors")


def test_unknown_steering_option_name_is_rejected():
    with pytest.raises(ValueError):
        steering_options("sae", "nope")
