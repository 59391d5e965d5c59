"""Published SAEs (issue 14 §3): SAELens standard / JumpReLU / TopK / BatchTopK, Gemma Scope npz and Gemma Scope 2,
sparsify hookpoint folders and dictionary_learning checkpoints load with our code, encode / decode like the reference
library (written with the library's own code where installed, else a hand computation), and steer on the tiny model
with the error term kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saesteer.core import SaesteerError
from saesteer.sae import check_compatible, load_sae
from saesteer.sae.archs import ArchConfig, base_of, layer_from_hookpoint, make_sae, same_model
from saesteer.steering import Clamp, SteeringSpec, build_all, steer

D, N = 16, 48
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture
def x():
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.5)
            if "threshold" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.05)


def _check_interface(sae, x, ref_dense=None, ref_decode=None):
    """Our dense / sparse / per-latent encodings agree with each other and with the reference."""
    with torch.no_grad():
        dense = sae.encode_dense(x)
        if ref_dense is not None:
            torch.testing.assert_close(dense, ref_dense, **TOL)
            assert int((dense > 0).sum()) > 0 and int((dense == 0).sum()) > 0  # the activation is not trivial
        feats = [0, 7, N - 1]
        torch.testing.assert_close(sae.latent_acts(x, feats), dense[..., feats], **TOL)
        vals, idx = sae.encode(x)
        torch.testing.assert_close(torch.zeros_like(dense).scatter(-1, idx, vals), dense, **TOL)
        torch.testing.assert_close(sae.decode(vals, idx), sae.decode_dense(dense), **TOL)
        if ref_decode is not None:
            torch.testing.assert_close(sae.decode_dense(dense), ref_decode(dense), **TOL)


# --------------------------------------------------------------------------------------------- hook points
@pytest.mark.parametrize("name,layer", [
    ("blocks.3.hook_resid_post", 3), ("blocks.3.hook_resid_pre", 2), ("model.layers.4", 4), ("layers.4", 4),
    ("model.layers.4.output", 4), ("transformer.h.2", 2), ("resid_post_layer_5", 5),
    ("gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71", 20), ("resid_post/layer_7_width_16k_l0_small", 7),
    ("sae", -1), ("", -1),
])
def test_hookpoint_to_layer(name, layer):
    assert layer_from_hookpoint(name) == layer


@pytest.mark.parametrize("name", ["blocks.3.hook_mlp_out", "blocks.3.attn.hook_z", "layers.4.mlp", "blocks.0.hook_resid_pre",
                                  "gemma-scope-2b-pt-mlp/layer_3/width_16k/average_l0_5", "blocks.2.hook_resid_mid"])
def test_hookpoint_rejects_non_residual(name):
    with pytest.raises(SaesteerError, match="embeddings|not the residual stream"):
        layer_from_hookpoint(name)


def test_same_model():
    assert same_model("gemma-2-2b", "google/gemma-2-2b") and not same_model("gemma-2-2b", "google/gemma-2-2b-it")


def test_base_of():
    assert base_of("google/gemma-2-2b", "google/gemma-2-2b-it") and base_of("Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct")
    assert base_of("Qwen/Qwen2.5-7B", "qwen/qwen2.5-7b-instruct") and base_of("Mistral-7B-v0.1", "x/mistral-7b-v0.1-chat")
    # not a chat fine-tune of it: the other way round, another size, the same model, an unrelated suffix
    assert not base_of("google/gemma-2-2b-it", "google/gemma-2-2b") and not base_of("gemma-2-2b", "gemma-2-27b-it")
    assert not base_of("gemma-2-2b", "gemma-2-2b") and not base_of("gemma-2-2b", "gemma-2-2b-sft-it2")


# --------------------------------------------------------------------------------------------- SAELens
def _saelens_sae(arch, **kw):
    sl = pytest.importorskip("sae_lens")
    md = sl.saes.sae.SAEMetadata(hook_name="blocks.1.hook_resid_post", model_name="tiny-llama")
    cls, cfg_cls = {"standard": (sl.StandardSAE, sl.StandardSAEConfig), "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig),
                    "topk": (sl.TopKSAE, sl.TopKSAEConfig)}[arch]
    ref = cls(cfg_cls(d_in=D, d_sae=N, metadata=md, **kw))
    _randomise(ref)
    return ref.eval()


@pytest.mark.parametrize("arch,kw,ours", [
    ("standard", {}, "relu"), ("standard", {"apply_b_dec_to_input": False}, "relu"), ("jumprelu", {}, "jumprelu"),
    ("topk", {"k": 6}, "topk"), ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}, "topk"),
])
def test_saelens_matches_library(arch, kw, ours, x, tmp_path):
    ref = _saelens_sae(arch, **kw)
    ref.save_model(tmp_path / "sl")
    sae = load_sae(tmp_path / "sl")
    assert sae.arch == ours and sae.cfg.layer == 1 and sae.cfg.model == "tiny-llama" and sae.source == "saelens"
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    with torch.no_grad():
        ref_acts = ref.encode(x)
        _check_interface(sae, x, ref_acts, ref.decode)
        torch.testing.assert_close(sae(x), ref(x), **TOL)


def test_saelens_batchtopk_saved_by_library(x, tmp_path):
    sl = pytest.importorskip("sae_lens")
    md = sl.saes.sae.SAEMetadata(hook_name="blocks.0.hook_resid_post", model_name="tiny-llama")
    ref = sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=6, metadata=md))
    _randomise(ref)
    ref.topk_threshold.fill_(0.7)
    ref.save_inference_model(tmp_path / "bt")  # SAELens saves BatchTopK as JumpReLU with the learned threshold
    inf = sl.SAE.load_from_disk(str(tmp_path / "bt")).eval()
    sae = load_sae(tmp_path / "bt")
    assert sae.arch == "jumprelu" and sae.cfg.layer == 0
    with torch.no_grad():
        _check_interface(sae, x, inf.encode(x), inf.decode)
    # a cfg that says batchtopk with a scalar threshold loads as our BatchTopK with the same activations
    cfg = json.loads((tmp_path / "bt" / "cfg.json").read_text())
    (tmp_path / "bt" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "batchtopk", "k": 6}))
    bt = load_sae(tmp_path / "bt")
    assert bt.arch == "batchtopk" and bt.k == 6
    with torch.no_grad():
        torch.testing.assert_close(bt.encode_dense(x), sae.encode_dense(x), **TOL)


def test_saelens_rejects_unsupported(tmp_path):
    ref = _saelens_sae("standard")
    ref.save_model(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    (tmp_path / "a" / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(SaesteerError, match="normalize_activations='layer_norm' is not supported"):
        load_sae(tmp_path / "a")
    md = {**cfg["metadata"], "hook_name": "blocks.1.hook_mlp_out"}
    (tmp_path / "a" / "cfg.json").write_text(json.dumps({**cfg, "metadata": md}))
    with pytest.raises(SaesteerError, match="not the residual stream"):
        load_sae(tmp_path / "a")


# --------------------------------------------------------------------------------------------- sparsify
def test_sparsify_hookpoints_match_library(x, tmp_path):
    sp = pytest.importorskip("sparsify")
    refs = {}
    for L in (0, 1):
        ref = sp.SparseCoder(D, sp.SparseCoderConfig(num_latents=N, k=5))
        _randomise(ref, seed=L)
        ref.set_decoder_norm_to_unit_norm()
        ref.save_to_disk(tmp_path / "run" / f"layers.{L}")
        refs[L] = ref.eval()
    with pytest.raises(SaesteerError, match=r"several sparsify SAEs \(layers.0, layers.1\).*--hookpoint"):
        load_sae(tmp_path / "run")
    with pytest.raises(SaesteerError, match="no SAE for hook point 'layers.7'.*available: layers.0, layers.1"):
        load_sae(tmp_path / "run", hookpoint="layers.7")
    for L in (0, 1):
        for sae in (load_sae(tmp_path / "run", hookpoint=f"layers.{L}"), load_sae(f"{tmp_path / 'run'}:layers.{L}")):
            assert sae.cfg.layer == L and sae.source == "sparsify" and sae.k == 5
            with torch.no_grad():
                out = refs[L].encode(x.reshape(-1, D))
                ref_dense = torch.zeros(x.shape[0] * x.shape[1], N).scatter(-1, out.top_indices, out.top_acts)
                _check_interface(sae, x, ref_dense.reshape(*x.shape[:-1], N))
                vals, idx = sae.encode(x.reshape(-1, D))
                torch.testing.assert_close(sae.decode(vals, idx), refs[L].decode(out.top_acts, out.top_indices), **TOL)


# --------------------------------------------------------------------------------------------- Gemma Scope
def _gs_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D, N, generator=g) * 0.5, "W_dec": torch.randn(N, D, generator=g) * 0.5,
         "b_enc": torch.randn(N, generator=g) * 0.5, "b_dec": torch.randn(D, generator=g) * 0.5,
         "threshold": torch.rand(N, generator=g) * 0.8 + 0.05}
    return w


def _gs_reference(w, x):
    pre = x @ w["W_enc"] + w["b_enc"]  # Gemma Scope: no b_dec subtraction at the input
    acts = torch.where(pre > w["threshold"], pre, torch.zeros_like(pre)).clamp_min(0)
    return acts, lambda a: a @ w["W_dec"] + w["b_dec"]


def test_gemmascope_npz(x, tmp_path):
    w = _gs_weights()
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_5"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()})
    sae = load_sae(folder / "params.npz")
    assert (sae.arch, sae.source, sae.cfg.layer, sae.cfg.model) == ("jumprelu", "gemmascope", 1, "google/gemma-2-2b")
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and not sae.cfg.apply_b_dec_to_input
    acts, dec = _gs_reference(w, x)
    _check_interface(sae, x, acts, dec)
    # a release tree: pick the SAE by its relative folder
    assert load_sae(tmp_path / "gemma-scope-2b-pt-res", hookpoint="layer_1/width_16k/average_l0_5").cfg.layer == 1
    mlp = tmp_path / "gemma-scope-2b-pt-mlp" / "layer_1" / "width_16k" / "average_l0_5"
    mlp.mkdir(parents=True)
    np.savez(mlp / "params.npz", **{k: v.numpy() for k, v in w.items()})
    with pytest.raises(SaesteerError, match="not the residual stream"):
        load_sae(mlp)


def test_gemmascope2_safetensors(x, tmp_path):
    from safetensors.torch import save_file

    w = _gs_weights(3)
    folder = tmp_path / "resid_post" / "layer_0_width_16k_l0_small"
    folder.mkdir(parents=True)
    save_file({k.lower() if k.startswith("W_") else k: v.contiguous() for k, v in w.items()}, folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "jump_relu", "model_name": "google/gemma-3-1b-it",
                                                    "hf_hook_point_in": "model.layers.0.output"}))
    sae = load_sae(folder)
    assert (sae.arch, sae.cfg.layer, sae.cfg.model, sae.cfg.hook_name) == ("jumprelu", 0, "google/gemma-3-1b-it",
                                                                           "model.layers.0.output")
    acts, dec = _gs_reference(w, x)
    _check_interface(sae, x, acts, dec)


# --------------------------------------------------------------------------------------------- dictionary_learning
def _dl_write(folder, dict_class, sd, layer=1, lm="tiny-llama", sub="resid_post_layer_1"):
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": dict_class, "trainer_class": "BatchTopKTrainer", "activation_dim": D, "dict_size": N, "k": 6,
        "layer": layer, "lm_name": lm, "submodule_name": sub}, "buffer": {"d_submodule": D}}))


def test_dictionary_learning_batchtopk(x, tmp_path):
    g = torch.Generator().manual_seed(5)
    sd = {"encoder.weight": torch.randn(N, D, generator=g) * 0.5, "encoder.bias": torch.randn(N, generator=g) * 0.5,
          "decoder.weight": torch.randn(D, N, generator=g) * 0.5, "b_dec": torch.randn(D, generator=g) * 0.5,
          "threshold": torch.tensor(0.6), "k": torch.tensor(6, dtype=torch.int)}
    _dl_write(tmp_path / "bt" / "trainer_0", "BatchTopKSAE", sd)
    sae = load_sae(tmp_path / "bt")  # the one trainer folder below is found
    assert (sae.arch, sae.k, sae.cfg.layer, sae.source) == ("batchtopk", 6, 1, "dictionary_learning")
    assert sae.cfg.hook_name == "resid_post_layer_1"
    post = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    ref = post * (post > sd["threshold"])  # dictionary_learning BatchTopKSAE.encode(use_threshold=True)
    _check_interface(sae, x, ref, lambda a: a @ sd["decoder.weight"].T + sd["b_dec"])
    # the standard AutoEncoder (bias subtracted and added back) and a never-set threshold
    sd2 = {"encoder.weight": sd["encoder.weight"], "encoder.bias": sd["encoder.bias"],
           "decoder.weight": sd["decoder.weight"], "bias": sd["b_dec"]}
    _dl_write(tmp_path / "ae", "AutoEncoder", sd2)
    relu = load_sae(tmp_path / "ae")
    assert relu.arch == "relu"
    _check_interface(relu, x, post, lambda a: a @ sd["decoder.weight"].T + sd["b_dec"])
    _dl_write(tmp_path / "unset", "BatchTopKSAE", {**sd, "threshold": torch.tensor(-1.0)})
    with pytest.raises(SaesteerError, match="threshold was never set"):
        load_sae(tmp_path / "unset")
    _dl_write(tmp_path / "gated", "GatedAutoEncoder", sd)
    with pytest.raises(SaesteerError, match="dict_class 'GatedAutoEncoder' is not supported"):
        load_sae(tmp_path / "gated")


# --------------------------------------------------------------------------------------------- steering
def _tied(arch, d=64, n=32, layer=1, model="tiny-llama", f=3, seed=0):
    """Orthonormal tied SAE whose latent ``f`` is always active (so a clamped value re-encodes exactly)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g))
    b_enc = torch.full((n,), -0.05)
    b_enc[f] = 6.0
    w = {"W_enc": q.T.contiguous(), "W_dec": q.T.contiguous(), "b_enc": b_enc, "b_dec": torch.randn(d, generator=g) * 0.1}
    if arch in ("jumprelu", "batchtopk"):
        w["threshold"] = torch.full((n,), 0.3)
    cfg = ArchConfig(d_in=d, num_latents=n, k=4 if arch in ("topk", "batchtopk") else 0, model=model, layer=layer,
                     hook_name=f"blocks.{layer}.hook_resid_post", source="test")
    return make_sae(arch, cfg, w)


def _resid(model, ids, layer, ivs=()):
    from saesteer.models import hook_module, layer_output

    got = {}
    with steer(model, list(ivs)), torch.no_grad():  # the capture hook runs after the steering hook
        h = hook_module(model, layer).register_forward_hook(lambda m, i, o: got.__setitem__("h", layer_output(o)))
        try:
            logits = model(ids).logits
        finally:
            h.remove()
    return got["h"], logits


@pytest.fixture(scope="module")
def tiny():
    from saesteer.models import tiny_model

    return tiny_model("llama")


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk", "batchtopk"])
def test_clamp_keeps_error_term(arch, tiny):
    model, _ = tiny
    sae = _tied(arch)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    h0, logits0 = _resid(model, ids, 1)
    h1, logits1 = _resid(model, ids, 1, [Clamp(sae=sae, features=[3], values=[9.0])])
    assert not torch.allclose(logits0, logits1)
    with torch.no_grad():
        torch.testing.assert_close(sae.latent_acts(h1, [3])[..., 0], torch.full(h1.shape[:-1], 9.0), atol=1e-4, rtol=0)
        a = sae.encode_dense(h0)
        err = h0 - sae.decode_dense(a)
        a[..., 3] = 9.0
        torch.testing.assert_close(h1, sae.decode_dense(a) + err, atol=1e-5, rtol=1e-5)  # only latent 3 changed
        # clamping to the current value leaves the residual unchanged (one token: one value)
        one = ids[:, :1]
        h_one, _ = _resid(model, one, 1)
        cur = float(sae.latent_acts(h_one, [3])[0, 0, 0])
        h_same, _ = _resid(model, one, 1, [Clamp(sae=sae, features=[3], values=[cur])])
        torch.testing.assert_close(h_same, h_one, atol=1e-5, rtol=1e-5)


def test_jumprelu_below_threshold_counts_as_zero(tiny):
    model, _ = tiny
    sae = _tied("jumprelu")
    with torch.no_grad():
        sae.threshold[5] = 1e6  # latent 5 is never active: its activation is 0, whatever its pre-activation
    ids = torch.tensor([[1, 5, 9, 3]])
    h0, _ = _resid(model, ids, 1)
    h1, _ = _resid(model, ids, 1, [Clamp(sae=sae, features=[5], values=[2.0])])
    torch.testing.assert_close(h1 - h0, (2.0 * sae.W_dec[5]).detach().expand_as(h0), atol=1e-5, rtol=1e-5)


def test_mismatch_is_one_clear_error(tiny):
    model, _ = tiny
    with pytest.raises(SaesteerError, match="width 32, but the model's residual stream has width 64"):
        check_compatible(_tied("relu", d=32, n=16), model, 1)
    with pytest.raises(SaesteerError, match="trained on layer 0, not layer 1"):
        check_compatible(_tied("jumprelu", layer=0), model, 1)
    with pytest.raises(SaesteerError, match="out of range"), \
            steer(model, [Clamp(sae=_tied("topk", layer=5), features=[3], values=[1.0])]):
        pass
    with pytest.raises(SaesteerError, match="trained on model 'other'"):
        check_compatible(_tied("relu", model="other"), model, 1)
    check_compatible(_tied("relu", model="someorg/tiny-llama"), model, 1)  # hub organisation ignored


def test_spec_with_hookpoint_path_steers(tiny, tmp_path):
    sp = pytest.importorskip("sparsify")
    model, _ = tiny
    for L in (0, 1):
        ref = sp.SparseCoder(64, sp.SparseCoderConfig(num_latents=128, k=8))
        ref.save_to_disk(tmp_path / "run" / f"layers.{L}")
    spec = SteeringSpec(kind="clamp", sae=f"{tmp_path / 'run'}:layers.1", features=[3], values=[5.0])
    ivs = build_all([spec], model)
    assert ivs[0].layer == 1
    ids = torch.tensor([[1, 5, 9, 3]])
    assert not torch.allclose(_resid(model, ids, 1)[1], _resid(model, ids, 1, ivs)[1])


def test_inspect_and_gate_with_jumprelu(tiny):
    from saesteer.features import encode_sequences
    from saesteer.gating import SAEFeatureGate

    model, tok = tiny
    sae = _tied("jumprelu")
    seqs = encode_sequences(model, tok, sae, 1, ["hello world, how are you", "a b c"], max_norm_ratio=None)
    h, _ = _resid(model, torch.tensor([seqs[0].token_ids]), 1)
    dense = sae.encode_dense(h[0]).detach()
    v = seqs[0].valid
    torch.testing.assert_close(seqs[0].feature_acts(3)[v], dense[v, 3], atol=1e-5, rtol=1e-5)
    assert seqs[0].acts.shape[1] == int((dense[v] > 0).sum(-1).max())
    gate = SAEFeatureGate(layer=1, sae=sae)
    assert gate.latents(torch.randn(3, 2, 64)).shape == (3, 32)


# --------------------------------------------------------------------------------------------- CLI
def test_cli_sae_info(tmp_path, capsys):
    from saesteer.cli import main

    w = _gs_weights()
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_5"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()})
    assert main(["sae", "info", str(folder)]) == 0
    out = capsys.readouterr().out
    for s in ("jumprelu", f"{N} latents", "blocks.1.hook_resid_post", "google/gemma-2-2b", "gemmascope"):
        assert s in out
    assert main(["sae", "info", "--json", str(tmp_path / "gemma-scope-2b-pt-res")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["architecture"], info["layer"], info["d_in"], info["num_latents"]) == ("jumprelu", 1, D, N)
    with pytest.raises(SystemExit) as e:
        main(["sae", "info", str(tmp_path / "missing")])
    assert e.value.code == 2 and "SAE not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sae", "info", str(tmp_path), "--hookpoint", "layer_9"])
    assert e.value.code == 2 and "available: gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_5" in \
        capsys.readouterr().err


def test_export_refuses_other_architectures(tmp_path):
    from saesteer.sae import export_saelens, save_sae

    with pytest.raises(SaesteerError, match="only Top-k SAEs.*this one is jumprelu"):
        export_saelens(_tied("jumprelu"), tmp_path / "o")
    with pytest.raises(SaesteerError, match="only Top-k SAEs"):
        save_sae(_tied("relu"), tmp_path / "s")


def test_dictionary_learning_topk_and_jumprelu(x, tmp_path):
    g = torch.Generator().manual_seed(7)
    enc, b, dec, bd = (torch.randn(N, D, generator=g) * 0.5, torch.randn(N, generator=g) * 0.5,
                       torch.randn(D, N, generator=g) * 0.5, torch.randn(D, generator=g) * 0.5)
    sd = {"encoder.weight": enc, "encoder.bias": b, "decoder.weight": dec, "b_dec": bd,
          "threshold": torch.tensor(-1.0), "k": torch.tensor(5, dtype=torch.int)}
    _dl_write(tmp_path / "tk", "AutoEncoderTopK", sd, sub="")
    sae = load_sae(tmp_path / "tk")
    assert (sae.arch, sae.k, sae.cfg.layer, sae.cfg.hook_name) == ("topk", 5, 1, "resid_post_layer_1")
    post = torch.relu((x - bd) @ enc.T + b)
    top = post.topk(5, dim=-1)  # dictionary_learning AutoEncoderTopK.encode
    ref = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    _check_interface(sae, x, ref, lambda a: a @ dec.T + bd)
    th = torch.rand(N, generator=g) * 0.8 + 0.05
    jr = {"W_enc": enc.T.contiguous(), "b_enc": b, "W_dec": dec.T.contiguous(), "b_dec": bd, "threshold": th}
    _dl_write(tmp_path / "jr", "JumpReluAutoEncoder", jr, sub="resid_post_layer_0", layer=0)
    sae = load_sae(tmp_path / "jr")
    pre = x @ enc.T + b  # JumpReluAutoEncoder: apply_b_dec_to_input is False by default
    assert sae.arch == "jumprelu" and sae.cfg.layer == 0
    _check_interface(sae, x, torch.relu(pre * (pre > th)), lambda a: a @ dec.T + bd)


def test_saelens_old_style_config(x, tmp_path):
    ref = _saelens_sae("jumprelu")
    ref.save_model(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "cfg.json").read_text())
    cfg.pop("metadata")
    cfg.update(hook_name="blocks.2.hook_resid_pre", hook_layer=2, model_name="gemma-2-2b")
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path / "old")
    assert (sae.cfg.layer, sae.cfg.model, sae.cfg.hook_name) == (1, "gemma-2-2b", "blocks.2.hook_resid_pre")
    with torch.no_grad():
        _check_interface(sae, x, ref.encode(x), ref.decode)
