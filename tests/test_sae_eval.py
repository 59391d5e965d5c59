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


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_final_logits_equal_the_models_logits(arch):
    """CE is computed from final hidden states a chunk at a time: the head (+ Gemma 2 soft-capping) must match."""
    from saesteer.models import model_body, tiny_model
    from saesteer.sae.quality import final_logits

    model, tok = tiny_model(arch)
    ids = torch.tensor([tok(TEXTS[0], add_special_tokens=False)["input_ids"][:24]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = final_logits(model, model_body(model)(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_chunked_ce_equals_full_logits_reference(tiny, monkeypatch):
    """Same numbers as the former implementation (whole [B, T, V] logits per pass), with any chunk size."""
    from saesteer.activations import keep_mask, pad_right
    from saesteer.models import hook_module, layer_output, replace_layer_output, special_token_ids
    from saesteer.sae import quality

    model, tok = tiny
    rand = TopKSAE(SAEConfig(d_in=64, num_latents=256, k=4, layer=1), seed=0)
    seqs = [tok(t, add_special_tokens=False)["input_ids"][:32] for t in TEXTS]
    ids, att = pad_right(seqs, tok.pad_token_id)
    keep = keep_mask(ids, att, special_token_ids(tok))
    valid = att[:, 1:].bool() & (keep.long().cumsum(-1)[:, :-1] > 0)
    logps = {}
    for kind in ("clean", "splice", "zero"):
        def hook(_m, _i, out, kind=kind):
            h = layer_output(out)
            new = {"clean": h, "splice": rand(h), "zero": torch.zeros_like(h)}[kind]
            return replace_layer_output(out, torch.where(keep.unsqueeze(-1), new, h))
        handle = hook_module(model, 1).register_forward_hook(hook)
        with torch.no_grad():
            logps[kind] = F.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1], -1)
        handle.remove()
    tgt = ids[:, 1:].unsqueeze(-1)
    n = int(valid.sum())
    ce = {k: float(-v.gather(-1, tgt).squeeze(-1)[valid].sum()) / n for k, v in logps.items()}
    kl = {k: float((logps["clean"].exp() * (logps["clean"] - logps[k])).sum(-1)[valid].sum()) / n
          for k in ("splice", "zero")}
    for chunk in (7, 4096):
        monkeypatch.setattr(quality, "CE_CHUNK", chunk)
        r = evaluate_sae(model, tok, rand, TEXTS, layer=1, context_len=32, batch_size=4, progress=False)
        assert r["n_ce_predictions"] == n
        assert r["ce_clean"] == pytest.approx(ce["clean"], rel=1e-5)
        assert r["ce_spliced"] == pytest.approx(ce["splice"], rel=1e-5)
        assert r["ce_zero_ablated"] == pytest.approx(ce["zero"], rel=1e-5)
        assert r["kl_spliced"] == pytest.approx(kl["splice"], rel=1e-4, abs=1e-7)
        assert r["kl_zero_ablated"] == pytest.approx(kl["zero"], rel=1e-4, abs=1e-7)
