"""The trainer's optimisation step against a hand-written dense reference, its forward against sparsify's
``SparseCoder``, and what a finished run leaves in ``metrics.jsonl`` / the saved SAE.

The reference re-implements one step from the paper / sparsify recipe with plain dense tensors: encode, top-k,
decode, FVU + ``auxk_alpha`` × AuxK on the top ``k_aux`` dead latents, remove the decoder-gradient component
parallel to each decoder row, Adam (betas 0.9 / 0.999, eps 6.25e-10, bias-corrected, written out), renormalise
decoder rows, advance the dead-latent counters, and the warm-up / linear-decay learning-rate schedule.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saesteer.sae import SAEConfig, TopKSAE, TrainConfig, epoch_order, load_sae, train
from saesteer.sae.trainer import BatchReader, open_cache
from test_train import synthetic_acts, write_cache

BETAS, EPS = (0.9, 0.999), 6.25e-10


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("acts") / "c", synthetic_acts(2400))


def _cfg(cache, out, **kw) -> TrainConfig:
    base = dict(acts=str(cache), out=str(out), k=4, num_latents=192, batch_size=200, lr=4e-3, warmup_steps=3,
                decay_frac=0.5, steps=6, auxk_alpha=0.25, dead_window=200, chunk_rows=300, buffer_chunks=2,
                init_sample=1000, checkpoint_every=1000, progress=False, threads=1, mm_dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def lr_schedule(step: int, total: int, lr: float, warmup: int, decay_frac: float) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then linear decay to 0 over the last ``decay_frac``."""
    f = min(1.0, (step + 1) / warmup)
    decay_start = total * (1 - decay_frac)
    if step >= decay_start:
        f *= (total - step) / (total - decay_start)
    return lr * f


def reference_run(cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], list[dict], torch.Tensor]:
    """``cfg.steps`` dense reference steps from the trainer's initialisation on the trainer's batches."""
    cache = open_cache(cfg.acts)
    d, n_lat = cache.d_model, cfg.num_latents
    k_aux = cfg.k_aux if cfg.k_aux is not None else d // 2
    reader = BatchReader(cache, cfg.chunk_rows, 2 * cfg.buffer_chunks)
    init = TopKSAE(SAEConfig(d_in=d, num_latents=n_lat, k=cfg.k), seed=cfg.seed)
    init.init_from_sample(reader.rows(np.sort(epoch_order(cache.lens, cfg.chunk_rows, cfg.buffer_chunks, cfg.seed,
                                                          -1)[:cfg.init_sample])))
    s = init.input_scale
    p = {k: v.detach().clone().double() for k, v in init.state_dict().items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    since = torch.zeros(n_lat, dtype=torch.long)
    bpe = cache.n_tokens // cfg.batch_size
    log = []
    for step in range(cfg.steps):
        epoch, b = divmod(step, bpe)
        order = epoch_order(cache.lens, cfg.chunk_rows, cfg.buffer_chunks, cfg.seed, epoch)
        xs = reader.rows(order[b * cfg.batch_size:(b + 1) * cfg.batch_size]).double() * s
        w = {k: t.clone().requires_grad_() for k, t in p.items()}
        tv = (xs - xs.mean(0)).pow(2).sum()
        pre = F.relu((xs - w["b_dec"]) @ w["W_enc"].T + w["b_enc"])  # dense pre-activations
        vals, idx = pre.topk(cfg.k, dim=-1)
        z = torch.zeros_like(pre).scatter(1, idx, vals)
        err = xs - (z @ w["W_dec"] + w["b_dec"])
        fvu = err.pow(2).sum() / tv
        dead = since >= cfg.dead_window
        n_dead = int(dead.sum())
        auxk = torch.zeros((), dtype=torch.float64)
        if n_dead and k_aux:
            ka = min(k_aux, n_dead)
            a_vals, a_idx = pre.masked_fill(~dead, -math.inf).topk(ka, dim=-1)
            e_hat = torch.zeros_like(pre).scatter(1, a_idx, a_vals.clamp_min(0)) @ w["W_dec"]  # no bias
            auxk = min(n_dead / k_aux, 1.0) * (e_hat - err.detach()).pow(2).sum() / tv
        (fvu + cfg.auxk_alpha * auxk).backward()
        g = {k: t.grad for k, t in w.items()}
        g["W_dec"] = g["W_dec"] - (g["W_dec"] * p["W_dec"]).sum(1, keepdim=True) * p["W_dec"]
        lr = lr_schedule(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.decay_frac)
        t = step + 1
        for k in p:  # Adam, written out
            m[k] = BETAS[0] * m[k] + (1 - BETAS[0]) * g[k]
            v2[k] = BETAS[1] * v2[k] + (1 - BETAS[1]) * g[k] ** 2
            p[k] = p[k] - lr * (m[k] / (1 - BETAS[0] ** t)) / ((v2[k] / (1 - BETAS[1] ** t)).sqrt() + EPS)
        p["W_dec"] = p["W_dec"] / p["W_dec"].norm(dim=1, keepdim=True)
        since += cfg.batch_size
        since[idx.reshape(-1).unique()] = 0
        log.append({"step": t, "fvu": float(fvu.detach()), "auxk": float(auxk.detach()), "dead_frac": n_dead / n_lat, "lr": lr,
                    "l0": float((vals > 0).sum(-1).double().mean()), "n_dead": n_dead})
    return p, log, since


@pytest.mark.parametrize("k_aux", [None, 40])  # None: d_model // 2 = 8 (dense AuxK columns); 40: sparse AuxK entries
def test_trainer_steps_equal_the_dense_reference(cache, tmp_path, k_aux):
    cfg = _cfg(cache, tmp_path / "sae", k_aux=k_aux)
    ref, log, since = reference_run(cfg)
    assert all(r["n_dead"] > 0 for r in log[1:]), log  # AuxK really takes part after the first step
    assert log[0]["n_dead"] == 0 and log[0]["auxk"] == 0
    sae = train(cfg)
    for name, want in ref.items():
        torch.testing.assert_close(getattr(sae, name).detach().double(), want, rtol=2e-4, atol=2e-5, msg=name)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(cfg.num_latents))
    state = torch.load(tmp_path / "sae" / "checkpoints" / "state.pt", weights_only=True)
    assert torch.equal(state["since_fired"], since)  # dead-window bookkeeping
    assert state["step"] == cfg.steps
    (last,) = [json.loads(x) for x in (tmp_path / "sae" / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    want = log[-1]
    assert last["step"] == cfg.steps and last["dead_frac"] == pytest.approx(want["dead_frac"])
    assert last["lr"] == pytest.approx(want["lr"]) and last["l0"] == pytest.approx(want["l0"])
    assert last["fvu"] == pytest.approx(want["fvu"], rel=1e-4) and last["auxk"] == pytest.approx(want["auxk"], rel=1e-4)
    assert last["auxk"] > 0


def test_lr_schedule_matches_the_reference():
    from saesteer.sae.trainer import _lr_factor

    for total, warm, frac in [(10, 3, 0.5), (100, 10, 0.2), (7, 1, 0.0), (5, 20, 0.2)]:
        got = [_lr_factor(s, total, warm, frac) for s in range(total)]
        assert got == pytest.approx([lr_schedule(s, total, 1.0, warm, frac) for s in range(total)])
        assert got[-1] > 0  # the last step still learns


def test_train_forward_equals_sparsify_forward():
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    d, n, k = 16, 96, 4
    sae = TopKSAE(SAEConfig(d_in=d, num_latents=n, k=k), seed=3)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(n, d))
        sae.b_enc.copy_(0.1 * torch.randn(n))
        sae.b_dec.copy_(0.5 * torch.randn(d))
    sc = sparsify.SparseCoder(d, sparsify.SaeConfig(num_latents=n, k=k))
    with torch.no_grad():
        sc.encoder.weight.copy_(sae.W_enc)
        sc.encoder.bias.copy_(sae.b_enc)
        sc.W_dec.copy_(sae.W_dec)
        sc.b_dec.copy_(sae.b_dec)
    xs = torch.randn(64, d) * 2
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::4] = True  # 24 dead latents; sparsify's k_aux is d // 2
    for dense_aux in (True, False):
        ours = sae.train_forward(xs, dead=dead, k_aux=d // 2, dense_aux=dense_aux)
        theirs = sc(xs, dead_mask=dead)
        torch.testing.assert_close(ours["fvu"], theirs.fvu, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours["auxk"], theirs.auxk_loss, rtol=1e-5, atol=1e-7)
        assert torch.equal(ours["indices"].sort(-1).values, theirs.latent_indices.sort(-1).values)
        # gradients. FVU: all parameters agree. FVU + AuxK: sparsify's fused encoder drops the gradient of its
        # pre-activations, so its AuxK term trains only the decoder; ours also reaches the dead latents' encoder rows
        # (as in Gao et al.). Both agree on the decoder and on every live latent's encoder row.
        pairs = [(sae.W_enc, sc.encoder.weight), (sae.b_enc, sc.encoder.bias), (sae.W_dec, sc.W_dec),
                 (sae.b_dec, sc.b_dec)]
        for mix in (0.0, 0.25):
            for mod in (sae, sc):
                mod.zero_grad(set_to_none=True)
            o = sae.train_forward(xs, dead=dead, k_aux=d // 2, dense_aux=dense_aux)
            t = sc(xs, dead_mask=dead)
            (o["fvu"] + mix * o["auxk"]).backward()
            (t.fvu + mix * t.auxk_loss).backward()
            if mix == 0:
                for a, b in pairs:
                    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
                continue
            torch.testing.assert_close(sae.W_dec.grad, sc.W_dec.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(sae.W_enc.grad[~dead], sc.encoder.weight.grad[~dead], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(sae.b_enc.grad[~dead], sc.encoder.bias.grad[~dead], rtol=1e-4, atol=1e-6)
            assert not torch.allclose(sae.W_enc.grad[dead], sc.encoder.weight.grad[dead], atol=1e-4)
    # raw-unit encode / forward on the same weights (input_scale 1)
    vals, idx = sae.encode(xs)
    out = sc.encode(xs)
    order = out.top_indices.argsort(-1)
    torch.testing.assert_close(vals.gather(-1, idx.argsort(-1)), out.top_acts.gather(-1, order))
    torch.testing.assert_close(sae(xs), sc(xs).sae_out, rtol=1e-5, atol=1e-5)


def test_finished_run_metrics_and_unit_decoder(cache, tmp_path):
    cfg = _cfg(cache, tmp_path / "sae", num_latents=256, steps=30, warmup_steps=5, decay_frac=0.2,
               dead_window=400, lr=3e-3)
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "sae" / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    for r in rows:
        assert set(r) >= {"step", "epoch", "fvu", "l0", "dead_frac", "auxk", "lr"}
        assert 0 <= r["dead_frac"] <= 1 and 0 < r["fvu"] < 2 and r["l0"] == pytest.approx(cfg.k)
        assert r["lr"] == pytest.approx(lr_schedule(r["step"] - 1, 30, cfg.lr, 5, 0.2))
        assert (r["auxk"] > 0) == (r["dead_frac"] > 0)
    assert any(r["dead_frac"] > 0 for r in rows)  # 256 latents, k=4, 200-token batches: some die
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    sae = load_sae(tmp_path / "sae")
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256))
    summ = json.loads((tmp_path / "sae" / "train_summary.json").read_text())
    assert summ["steps"] == 30 and summ["tokens"] == 30 * cfg.batch_size and 0 <= summ["dead_frac_final"] <= 1
