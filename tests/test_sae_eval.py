"""sae-eval: an exact SAE recovers all CE, a random one does not; metrics against direct computations; CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from saesteer.core import SaesteerError
from saesteer.sae import SAEConfig, TopKSAE, evaluate_sae

TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "hello world, this is a test of the sae evaluator",
         "numbers 1 2 3 4 5 6 7 8 9 and letters a b c d e f", "short one here"]


def exact_sae(d: int = 64, layer: int = 1, scale: float = 1.0) -> TopKSAE:
    """Latents ±e_i with k = d: ReLU keeps exactly one of each pair, so the reconstruction is exact."""
    sae = TopKSAE(SAEConfig(d_in=d, num_latents=2 * d, k=d, layer=layer, input_scale=scale))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_exact_sae_recovers_everything(tiny):
    model, tok = tiny
    r = evaluate_sae(model, tok, exact_sae(scale=0.5), TEXTS, layer=1, context_len=32, batch_size=2, progress=False)
    assert r["fvu"] < 1e-8 and r["mse"] < 1e-8
    assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-4)
    assert r["kl_spliced"] == pytest.approx(0, abs=1e-5)
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert r["kl_zero_ablated"] > 1e-3
    assert 0 < r["l0"] <= 64
    hist = r["density_histogram"]
    assert sum(hist["counts"]) + hist["dead"] == 128
    assert r["dead_frac"] == pytest.approx(hist["dead"] / 128)


def test_clean_ce_matches_direct_computation(tiny):
    model, tok = tiny
    r = evaluate_sae(model, tok, exact_sae(), TEXTS[:1], layer=1, context_len=32, batch_size=1, progress=False)
    ids = torch.tensor([tok(TEXTS[0], add_special_tokens=False)["input_ids"][:32]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    # predictions from position 0 cannot see a spliced position (position 0 is never spliced)
    ce = F.cross_entropy(logits[0, 1:-1], ids[0, 2:])
    assert r["ce_clean"] == pytest.approx(float(ce), rel=1e-4)
    assert r["n_tokens"] == ids.shape[1] - 1


def test_ce_docs_limits_only_the_ce_passes(tiny):
    model, tok = tiny
    rand = TopKSAE(SAEConfig(d_in=64, num_latents=256, k=4, layer=1), seed=0)
    full = evaluate_sae(model, tok, rand, TEXTS, layer=1, context_len=32, batch_size=2, progress=False)
    part = evaluate_sae(model, tok, rand, TEXTS, layer=1, context_len=32, batch_size=2, progress=False, ce_docs=2)
    first = evaluate_sae(model, tok, rand, TEXTS[:2], layer=1, context_len=32, batch_size=2, progress=False)
    assert part["n_tokens"] == full["n_tokens"] and part["n_ce_docs"] == 2 and full["n_ce_docs"] == 4
    assert part["fvu"] == pytest.approx(full["fvu"], rel=1e-5) and part["l0"] == pytest.approx(full["l0"])
    assert part["ce_clean"] == pytest.approx(first["ce_clean"], rel=1e-5)
    assert part["ce_spliced"] == pytest.approx(first["ce_spliced"], rel=1e-5)


def test_random_sae_is_worse_and_bad_input(tiny):
    model, tok = tiny
    rand = TopKSAE(SAEConfig(d_in=64, num_latents=256, k=4, layer=1), seed=0)
    r = evaluate_sae(model, tok, rand, TEXTS, layer=1, context_len=32, batch_size=4, progress=False)
    assert r["fvu"] > 0.3 and r["ce_loss_recovered"] < 0.99 and r["kl_spliced"] > 0
    with pytest.raises(SaesteerError, match="layer 1, not layer 0"):
        evaluate_sae(model, tok, rand, TEXTS, layer=0, progress=False)
    with pytest.raises(SaesteerError, match="no held-out texts"):
        evaluate_sae(model, tok, rand, [], layer=1, progress=False)


def test_cli_sae_eval(tiny, tmp_path):
    from typer.testing import CliRunner

    from saesteer.cli import app
    from saesteer.sae import save_sae

    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    save_sae(exact_sae(), tmp_path / "sae")
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "ev" / "eval.json"
    res = CliRunner().invoke(app, ["sae-eval", "--model", str(tmp_path / "m"), "--sae", str(tmp_path / "sae"),
                                   "--data", str(data), "--out", str(out), "--context-len", "32", "--threads", "1"])
    assert res.exit_code == 0, res.output
    j = json.loads(out.read_text())
    assert j["fvu"] < 1e-8 and j["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert (tmp_path / "ev" / "eval_density.png").read_bytes()[:4] == b"\x89PNG"
    save_sae(TopKSAE(SAEConfig(d_in=32, num_latents=64, k=4, layer=1)), tmp_path / "narrow")
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "saesteer", "sae-eval", "--model", str(tmp_path / "m"), "--sae",
                        str(tmp_path / "narrow"), "--data", str(data), "--out", str(tmp_path / "x.json")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "width 32" in p.stderr and not (tmp_path / "x.json").exists()
