"""Success paths of the CLI commands that had only error tests: ``compare``, ``demo`` (resume with one real stage)
and ``eval multiturn --mode crescendo`` (the tiny model as target, attacker and judge), all through ``main``."""

from __future__ import annotations

import json

import pytest
import torch

from saesteer.cli import main
from test_train import synthetic_acts, write_cache


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    model, tok = tiny
    d = tmp_path_factory.mktemp("cli_success") / "tiny-model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _policy(tmp_path, tiny_dir, name="pushed"):
    from saesteer.gating import AlwaysGate, Policy
    from saesteer.steering import RefusalDirection, SteeringSpec, save_direction

    g = torch.Generator().manual_seed(0)
    dpath = save_direction(RefusalDirection(vector=torch.randn(64, generator=g) * 4, layer=1, model=str(tiny_dir)),
                           tmp_path / "dir")
    path = tmp_path / f"{name}.json"
    Policy(gate=AlwaysGate(), steering=[SteeringSpec(kind="add", direction=str(dpath), alpha=1.0)], name=name).save(path)
    return path


def test_cli_compare_writes_its_table(tiny_dir, tmp_path, data_root, capsys):
    pol = _policy(tmp_path, tiny_dir)
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_dir), "--policies", str(pol), "--unsafe", "advbench:test",
            "--safe", "jbb-benign", "--limit", "3", "--max-new-tokens", "4", "--multiturn-limit", "2",
            "--max-turns", "2", "--capability", "mmlu", "--capability-limit", "2", "--batch-size", "4",
            "--threads", "1"]
    main([*args, "--out", str(out)])
    table = (out / "table.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert any(ln.startswith("| unsteered |") for ln in lines) and any(ln.startswith("| pushed |") for ln in lines)
    assert (out / "table.html").exists()
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    by = {(r["condition"], r["metric"]): r for r in rows}
    for cond in ("unsteered", "pushed"):
        assert by[(cond, "advbench-test")]["n"] == 3 and by[(cond, "jbb-benign")]["n"] == 3
        assert by[(cond, "mmlu")]["n"] == 2 and by[(cond, "multiturn-asr")]["n"] == 2
        assert all(0 <= r["rate"] <= 1 for (c, _), r in by.items() if c == cond and r.get("n"))
    printed = capsys.readouterr().out
    assert "| pushed |" in printed  # the table is printed too
    # a second run is resumed from the per-condition results: same table, nothing recomputed
    before = {p: p.stat().st_mtime_ns for p in (out / "conditions").rglob("items.jsonl")}
    main([*args, "--out", str(out)])
    assert (out / "table.md").read_text() == table
    assert {p: p.stat().st_mtime_ns for p in (out / "conditions").rglob("items.jsonl")} == before


def test_cli_demo_runs_the_one_unfinished_stage_and_skips_the_rest(tmp_path, tiny_dir, capsys):
    """The full demo is minutes even on the tiny model (features / sweep / gates / compare); here every stage but
    ``train`` is marked done, ``train`` really runs on a small cache, then a rerun runs nothing."""
    from saesteer.cli.demo import BUDGETS, demo_stages

    out = tmp_path / "demo"
    write_cache(out / "acts", synthetic_acts(8192, d=64, atoms=96), model=str(tiny_dir))  # >= one 4096 batch
    stages = demo_stages(str(tiny_dir), out, 1, BUDGETS["tiny"], ["--device", "cpu"])
    assert [s.name for s in stages][:2] == ["collect", "train"]
    for s in stages[2:]:
        s.done_marker.parent.mkdir(parents=True, exist_ok=True)
        if s.name != "compare":
            s.done_marker.write_text("{}")
    (out / "compare" / "table.md").write_text("| condition |\n|---|\n| marker-table |\n")
    argv = ["demo", "--model", str(tiny_dir), "--out", str(out), "--layer", "1", "--budget", "tiny", "--threads", "1"]
    main(argv)
    captured = capsys.readouterr()
    assert "collect: done already" in captured.err and "sae-eval: done already" in captured.err
    assert "$ saesteer train" in captured.err and "marker-table" in captured.out
    from saesteer.sae import load_sae

    sae = load_sae(out / "sae")
    assert sae.num_latents == 8 * 64 and sae.k == 32
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.num_latents))
    timings = json.loads((out / "demo_timings.json").read_text())
    assert timings["train"]["seconds"] > 0 and timings["train"]["peak_rss_gib"] > 0
    assert timings["collect"] == {"skipped": True} and set(timings) == {s.name for s in stages}
    # everything done now: a rerun runs nothing and keeps the trained SAE
    stamp = (out / "sae" / "saesteer.json").stat().st_mtime_ns
    main(argv)
    assert "train: done already" in capsys.readouterr().err
    assert (out / "sae" / "saesteer.json").stat().st_mtime_ns == stamp


def test_cli_multiturn_crescendo_tiny_attacker(tiny_dir, tmp_path, capsys):
    obj = tmp_path / "obj.jsonl"
    obj.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n"
                           for p, c in [("get the secret recipe", "a"), ("open the vault", "b")]))
    out = tmp_path / "cr"
    main(["eval", "multiturn", "--model", str(tiny_dir), "--mode", "crescendo", "--dataset", str(obj),
          "--limit", "2", "--max-turns", "2", "--max-new-tokens", "3", "--max-backtracks", "1",
          "--attacker", f"hf:{tiny_dir}", "--out", str(out), "--threads", "1"])
    s = json.loads((out / "summary.json").read_text())
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 2 and {it["category"] for it in items} == {"a", "b"}
    assert s["asr"]["n"] + s["n_failed"] == 2 and s["attacker"] == f"hf:{tiny_dir}"
    for it in items:  # a random attacker rarely writes parseable JSON: each objective ends as a result or a failure
        assert it["success"] in (True, False, None) and 0 <= it["turns"] <= 2 and it["backtracks"] <= 1
        assert (it["success"] is None) == bool(it.get("error")), it
    assert "crescendo ASR" in capsys.readouterr().out
