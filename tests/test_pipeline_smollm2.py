"""End to end on a real built-in model: ``collect → train → generate → policy fit → compare`` through the CLI on
SmolLM2-135M-Instruct with tiny budgets, checking every stage's artifact."""

from __future__ import annotations

import json

import pytest
import torch

from saesteer.cli import main

MODEL = "smollm2-135m-instruct"
LAYER = 8


@pytest.mark.integration
def test_collect_train_generate_policy_compare_on_smollm2(tmp_path, data_root, capsys):

    from saesteer.models import builtin_installed

    if not builtin_installed("smollm2-135m-instruct"):
        pytest.skip("built-in SmolLM2 package not installed")
    common = ["--threads", "1"]
    acts, sae_dir, pol, cmp = tmp_path / "acts", tmp_path / "sae", tmp_path / "policy.json", tmp_path / "cmp"

    main(["collect", "--model", MODEL, "--layer", str(LAYER), "--data", "wikitext2", "--tokens", "3072",
          "--context-len", "64", "--batch-size", "8", "--shard-tokens", "1024", "--out", str(acts), *common])
    meta = json.loads((acts / "meta.json").read_text())
    assert meta["complete"] and meta["n_tokens"] == 3072 and meta["d_model"] == 576 and meta["layer"] == LAYER
    assert len(meta["shards"]) == 3

    main(["train", "--acts", str(acts), "--k", "16", "--expansion", "2", "--batch-size", "512", "--epochs", "2",
          "--warmup-steps", "2", "--out", str(sae_dir), "--no-progress", *common])
    from saesteer.sae import load_sae

    sae = load_sae(sae_dir)
    assert (sae.d_in, sae.num_latents, sae.k, sae.cfg.layer) == (576, 1152, 16, LAYER)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(1152))
    summ = json.loads((sae_dir / "train_summary.json").read_text())
    assert summ["steps"] == 12 and 0 < summ["fvu"] < 1  # 6 batches x 2 epochs; it learned something
    metrics = [json.loads(x) for x in (sae_dir / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 12 and 0 <= metrics[-1]["dead_frac"] <= 1

    x = torch.stack([sae.W_dec[3] * 40, sae.W_dec[5] * 40])  # which latent is easy to clamp hard
    feat = int(sae.encode(x)[1][0, 0])
    capsys.readouterr()
    main(["generate", "--model", MODEL, "--sae", str(sae_dir), "-f", str(feat), "-c", "200", "--compare",
          "--max-new-tokens", "8", "--json", "How do I bake bread?", *common])
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["answer"] and rec["unsteered"] and rec["answer"] != rec["unsteered"]  # a large clamp changes it
    assert rec["steering"][0]["kind"] == "clamp"

    main(["policy", "fit", "--model", MODEL, "--sae", str(sae_dir), "--feature", str(feat), "--clamp", "20",
          "--gate", "probe", "--limit", "8", "--out", str(pol), *common])
    policy = json.loads(pol.read_text())
    assert policy["format"] == "saesteer-policy" and policy["gate"]["kind"] == "probe"
    assert policy["gate"]["layer"] == LAYER

    main(["compare", "--model", MODEL, "--policies", str(pol), "--unsafe", "advbench:test", "--safe",
          "jbb-benign", "--limit", "3", "--max-new-tokens", "8", "--no-multiturn", "--capability", "mmlu",
          "--capability-limit", "2", "--batch-size", "4", "--out", str(cmp), *common])
    rows = [json.loads(x) for x in (cmp / "results.jsonl").read_text().splitlines()]
    by = {(r["condition"], r["metric"]): r for r in rows}
    for cond in ("unsteered", "policy"):
        assert by[(cond, "advbench-test")]["n"] == 3 and by[(cond, "mmlu")]["n"] == 2
    assert 0 <= by[("policy", "jbb-benign")]["gate_fire_rate"] <= 1
    table = (cmp / "table.md").read_text()
    assert "| unsteered |" in table and "| policy |" in table
