"""TopKSAE: raw-unit API, sparse encoder/decoder against dense references, init and decoder constraints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saesteer.core import SaesteerError
from saesteer.sae import SAEConfig, TopKSAE, geometric_median, lr_for


def _sae(d=16, n=64, k=4, scale=1.0, seed=0):
    sae = TopKSAE(SAEConfig(d_in=d, num_latents=n, k=k, input_scale=scale), seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    return sae


def _dense_reference(sae, xs, dead=None, k_aux=0, tv=None):
    """Plain dense autograd version of train_forward (what the sparse kernels must equal)."""
    pre = F.relu((xs - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    vals, idx = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals)
    recon = z @ sae.W_dec + sae.b_dec
    err = xs - recon
    tv = (xs - xs.mean(0)).pow(2).sum() if tv is None else tv
    loss = err.pow(2).sum() / tv
    if dead is not None and k_aux:
        ka = min(k_aux, int(dead.sum()))
        av, ai = pre.masked_fill(~dead, float("-inf")).topk(ka, dim=-1)
        za = torch.zeros_like(pre).scatter(-1, ai, av.clamp_min(0))
        loss = loss + 0.5 * min(int(dead.sum()) / k_aux, 1.0) * ((za @ sae.W_dec) - err.detach()).pow(2).sum() / tv
    return loss, recon


def test_config_validation():
    with pytest.raises(SaesteerError, match="k must be"):
        SAEConfig(d_in=8, num_latents=16, k=16)
    with pytest.raises(SaesteerError, match="input_scale"):
        SAEConfig(d_in=8, num_latents=16, k=2, input_scale=float("nan"))
    with pytest.raises(SaesteerError, match="lacks"):
        SAEConfig.from_dict({"d_in": 3})


def test_raw_unit_api_and_leading_shapes():
    sae = _sae(scale=0.37)
    x = torch.randn(2, 3, 16) * 5
    vals, idx = sae.encode(x)
    assert vals.shape == (2, 3, 4) and idx.shape == (2, 3, 4)
    # raw-unit convention: latents = scaled-space latents / input_scale; decode = Σ a W_dec + b_dec / s
    xs = x.reshape(-1, 16) * 0.37
    pre = F.relu((xs - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    ref_vals, ref_idx = pre.topk(4, dim=-1)
    assert torch.equal(idx.reshape(-1, 4), ref_idx)
    torch.testing.assert_close(vals.reshape(-1, 4), ref_vals / 0.37)
    recon = sae(x)
    z = torch.zeros(6, 64).scatter(-1, ref_idx, ref_vals)
    torch.testing.assert_close(recon.reshape(-1, 16), (z @ sae.W_dec + sae.b_dec) / 0.37, rtol=1e-5, atol=1e-5)
    # each latent value times its unit decoder row is its raw-unit contribution
    manual = sum(vals[..., j, None] * sae.W_dec[idx[..., j]] for j in range(4)) + sae.b_dec / 0.37
    torch.testing.assert_close(recon, manual, rtol=1e-5, atol=1e-5)
    dense = sae.encode_dense(x)
    assert dense.shape == (2, 3, 64) and int((dense > 0).sum(-1).max()) <= 4
    torch.testing.assert_close(sae.pre_acts(x).gather(-1, idx), vals)
    assert sae.latent_scale == 1.0
    torch.testing.assert_close(sae.decoder_direction(5).norm(), torch.tensor(1.0))


def test_bad_inputs():
    sae = _sae()
    with pytest.raises(SaesteerError, match="d_in"):
        sae.encode(torch.randn(3, 15))
    with pytest.raises(SaesteerError, match="out of range"):
        sae.decoder_direction(64)
    with pytest.raises(SaesteerError, match="out of range"):
        sae.decode(torch.ones(1, 2), torch.tensor([[0, 99]]))


@pytest.mark.parametrize("block", [0, 7, 1000])
@pytest.mark.parametrize("aux", [None, "sparse", "dense", "dense-all-dead-selected"])
def test_sparse_training_pass_matches_dense_autograd(aux, block, monkeypatch):
    """Sparse kernels equal dense autograd; on CPU the encoder works in row blocks of any size (0: one block); AuxK
    runs on sparse entries or on dense dead columns (fewer dead latents than k_aux: all of them are selected)."""
    from saesteer.sae import model as sae_mod

    monkeypatch.setattr(sae_mod, "_CPU_BLOCK_ROWS", block)
    torch.manual_seed(1)
    sae = _sae()
    ref = _sae()
    ref.load_state_dict(sae.state_dict())
    xs = torch.randn(40, 16) * 2
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True  # 22 dead latents
    k_aux = 30 if aux == "dense-all-dead-selected" else 8
    out = sae.train_forward(xs, dead=dead if aux else None, k_aux=k_aux if aux else 0,
                            dense_aux=None if aux is None else aux != "sparse")
    loss = out["fvu"] + 0.5 * out["auxk"]
    loss.backward()
    ref_loss, _ = _dense_reference(ref, xs, dead if aux else None, k_aux if aux else 0)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    if aux:
        assert float(out["auxk"].detach()) > 0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-6)


def test_low_precision_selection_keeps_exact_values():
    torch.manual_seed(2)
    sae = _sae(d=32, n=128, k=8)
    xs = torch.randn(64, 32)
    exact = sae.train_forward(xs)
    bf = sae.train_forward(xs, mm_dtype=torch.bfloat16)
    # selection may differ on near-ties, but the loss is computed from exact fp32 values and stays close
    assert abs(float(exact["fvu"]) - float(bf["fvu"])) < 0.05 * float(exact["fvu"])
    overlap = (exact["indices"].sort(-1).values == bf["indices"].sort(-1).values).float().mean()
    assert overlap > 0.8


def test_decoder_constraints():
    sae = _sae()
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))  # untied, so "encoder untouched" below can fail
    enc_before = sae.W_enc.detach().clone()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.W_enc.grad = torch.randn_like(sae.W_enc)
    enc_grad_before = sae.W_enc.grad.clone()
    sae.remove_parallel_grads()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(64), atol=1e-5, rtol=0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(sae.W_enc.detach(), enc_before)  # encoder untouched by the decoder renormalisation
    assert torch.equal(sae.W_enc.grad, enc_grad_before)  # and its gradient by the parallel-gradient removal
    fresh = TopKSAE(SAEConfig(d_in=16, num_latents=64, k=4))
    assert torch.equal(fresh.W_enc, fresh.W_dec)  # encoder initialised as the decoder transpose


def test_init_from_sample_scale_and_median():
    sae = _sae()
    x = torch.randn(500, 16) * 7 + 3
    x[:5] = 1e4  # outliers barely move the geometric median
    sae.init_from_sample(x)
    s = sae.input_scale
    assert math.isclose(float((x * s).pow(2).sum(1).mean()), 16, rel_tol=1e-4)
    assert float((sae.b_dec / s - 3).abs().max()) < 1.5
    with pytest.raises(SaesteerError, match="NaN"):
        sae.init_from_sample(torch.full((4, 16), float("nan")))


def test_geometric_median_and_lr():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    m = geometric_median(pts, iters=200)
    assert float(m.norm()) < 1.0  # the mean would be ~(25, 25)
    assert math.isclose(lr_for(2**14), 2e-4) and math.isclose(lr_for(4 * 2**14), 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_pass_matches_cpu():
    torch.manual_seed(3)
    cpu = _sae()
    gpu = _sae().cuda()
    gpu.load_state_dict(cpu.state_dict())
    xs = torch.randn(64, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::4] = True
    a = cpu.train_forward(xs, dead=dead, k_aux=8)
    b = gpu.train_forward(xs.cuda(), dead=dead.cuda(), k_aux=8)
    (a["fvu"] + a["auxk"]).backward()
    (b["fvu"] + b["auxk"]).backward()
    torch.testing.assert_close(b["fvu"].cpu(), a["fvu"], rtol=1e-4, atol=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(gpu, name).grad.cpu(), getattr(cpu, name).grad, rtol=1e-3, atol=1e-5)


def test_encoder_backward_b_dec_closed_form_and_input_grad():
    """b_dec's encoder-side gradient is -W_enc^T grad_b_enc (no per-row input gradient); an input that requires grad
    still gets the dense autograd gradient."""
    torch.manual_seed(4)
    sae = _sae(d=24, n=96, k=6)
    ref = _sae(d=24, n=96, k=6)
    ref.load_state_dict(sae.state_dict())
    xs = (torch.randn(50, 24) * 3).requires_grad_()
    xr = xs.detach().clone().requires_grad_()
    out = sae.train_forward(xs)
    (out["fvu"] * 3).backward()
    ref_loss, _ = _dense_reference(ref, xr)
    (ref_loss * 3).backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sae.b_dec.grad, ref.b_dec.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sae.b_enc.grad, ref.b_enc.grad, rtol=1e-4, atol=1e-6)



@pytest.mark.parametrize("dense_aux", [False, True])
def test_bf16_selection_returns_exact_values_with_aux(dense_aux):
    """bf16 only picks the latents; every returned value (top-k and AuxK) is the exact fp32 pre-activation."""
    torch.manual_seed(6)
    sae = _sae(d=32, n=128, k=8)
    xs = torch.randn(48, 32)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::5] = True  # 26 dead
    out = sae.train_forward(xs, dead=dead, k_aux=6, mm_dtype=torch.bfloat16, dense_aux=dense_aux)
    exact = F.relu((xs - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    idx = out["indices"]
    assert float(out["auxk"]) > 0
    # the returned reconstruction uses exact values at the selected indices
    z = torch.zeros_like(exact).scatter(-1, idx, exact.gather(-1, idx))
    fvu = ((xs - (z @ sae.W_dec + sae.b_dec)).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())
    torch.testing.assert_close(out["fvu"], fvu, rtol=1e-5, atol=1e-6)
    out["fvu"].backward()  # gradients flow in bf16 mode too
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all()


def test_geometric_median_equals_direct_weiszfeld():
    """The matrix-vector form of the distances gives the plain Weiszfeld iterate ((p - y) materialised)."""
    g = torch.Generator().manual_seed(7)
    pts = torch.randn(3000, 24, generator=g) * 0.5 + 3
    pts[:20] *= 40
    y = pts.mean(0)
    for _ in range(25):
        w = 1.0 / (pts - y).norm(dim=1).clamp_min(1e-6)
        y = (w[:, None] * pts).sum(0) / w.sum()
    torch.testing.assert_close(geometric_median(pts, iters=25, eps=0.0), y, rtol=1e-4, atol=1e-4)
    assert float((y - pts.mean(0)).norm()) > 1.0  # the outliers pull the mean, not the median
