"""Steering hooks: the math of each intervention, positions, per-row scales, hook removal, generate with KV cache."""

from __future__ import annotations

import json

import pytest
import torch

from sae_double import make_sae
from saesteer import steering
from saesteer.core import SaesteerError
from saesteer.models import d_model, hook_module, hook_state
from saesteer.models import hooks as model_hooks
from saesteer.steering import (
    AblateDirection,
    AblateFeature,
    Add,
    Clamp,
    Scale,
    SteeringSpec,
    load_specs,
    select_rows,
    steer,
)


@pytest.fixture(scope="module")
def sae(tiny):
    model, _ = tiny
    return make_sae(d_model(model), 32, k=4, layer=1, model="tiny-llama")


def _ids(tok, texts):
    return tok(texts, return_tensors="pt", padding=True)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _capture(model, layer):
    """Register a hook that records the output of ``layer`` on every forward; returns (list, handle)."""
    seen: list[torch.Tensor] = []

    def hook(_m, _i, out):
        seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    return seen, hook_module(model, layer).register_forward_hook(hook)


def test_clamp_reencodes_to_value_and_keeps_error_term(sae):
    torch.manual_seed(1)
    s = sae.cfg.input_scale
    # features 3 and 7 strongly active (in the top-k) at every position, plus noise
    h = torch.randn(2, 5, sae.cfg.d_in) * 0.3 + (6 * sae.W_dec[3] + 7 * sae.W_dec[7]).detach() / s
    assert bool((sae.encode_dense(h)[..., [3, 7]] > 0).all())
    iv = Clamp(sae, [3, 7], [9.0, 11.0])
    iv._vecs = sae.latent_vectors(iv.features)
    iv._feat_t = torch.tensor(iv.features)
    with torch.no_grad():
        out = iv.apply(h, None)
        acts = sae.encode_dense(out)
        assert torch.allclose(acts[..., 3], torch.full((2, 5), 9.0), atol=1e-4)
        assert torch.allclose(acts[..., 7], torch.full((2, 5), 11.0), atol=1e-4)
        # the SAE error term is kept: out - recon(out) == h - recon(h)
        assert torch.allclose(out - sae(out), h - sae(h), atol=1e-4)
        # where a latent is not in the top-k, a_f = 0 and the clamp adds exactly c * u_f
        h0 = torch.randn(1, 3, sae.cfg.d_in) * 0.3 + 6 * sae.W_dec[1].detach() / s
        a12 = sae.encode_dense(h0)[..., 12]
        iv12 = Clamp(sae, [12], [4.0])
        iv12._vecs, iv12._feat_t = sae.latent_vectors([12]), torch.tensor([12])
        u = iv12._vecs[0]
        expect = h0 + (4.0 - a12).unsqueeze(-1) * u
        assert torch.allclose(iv12.apply(h0, None), expect, atol=1e-5)
        assert torch.allclose(u, sae.W_dec[12], atol=1e-5)  # one raw-unit latent adds W_dec[f] (sae.py convention)


def test_scale_and_ablate_feature_math(sae):
    torch.manual_seed(2)
    h = torch.randn(1, 6, sae.cfg.d_in) * 3
    with torch.no_grad():
        top_acts, top_idx = sae.encode(h)
    f = int(top_idx[0, 0, 0])  # active at position 0
    a = sae.encode_dense(h)[..., f]
    u = sae.latent_vectors([f])[0]
    for iv, target in ((Scale(sae, [f], factor=3.0), 3 * a), (AblateFeature(sae, [f]), torch.zeros_like(a))):
        iv._vecs, iv._feat_t = sae.latent_vectors([f]), torch.tensor([f])
        out = iv.apply(h, None)
        assert torch.allclose(out, h + (target - a).unsqueeze(-1) * u, atol=1e-5)
    assert a[0, 0] > 0


def test_hooks_removed_bit_identical_also_after_exception(tiny, sae):
    model, tok = tiny
    batch = _ids(tok, ["how do i make a cake?", "the quick brown fox"])
    base = _logits(model, batch)
    hooks = hook_state(model)
    with steer(model, [Clamp(sae, [5], [20.0]), Add(torch.ones(d_model(model)), 0.5, layer=0)]):
        steered = _logits(model, batch)
        assert len(steering.active_interventions(model)) == 2
    assert not torch.equal(base, steered)
    assert torch.equal(_logits(model, batch), base)
    assert steering.active_interventions(model) == [] and model_hooks.hook_sets(model) == []
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, Clamp(sae, [5], [20.0])):
            _logits(model, batch)
            raise RuntimeError("boom")
    assert torch.equal(_logits(model, batch), base)
    assert steering.active_interventions(model) == [] and model_hooks.hook_sets(model) == []
    assert hook_state(model) == hooks


def test_add_changes_residual_by_exactly_alpha_v(tiny):
    model, tok = tiny
    batch = _ids(tok, ["the capital of france", "abc"])
    v = torch.randn(d_model(model))
    pre, h1 = _capture(model, 0)  # registered before the steering hook: sees the unsteered output
    try:
        with steer(model, Add(v, 2.5, layer=0)):
            post, h2 = _capture(model, 0)
            _logits(model, batch)
            h2.remove()
    finally:
        h1.remove()
    assert torch.allclose(post[0] - pre[0], (2.5 * v).expand_as(pre[0]), atol=1e-5)


def test_direction_ablation_leaves_zero_projection(tiny):
    model, tok = tiny
    batch = _ids(tok, ["how do i make a cake?"])
    r = torch.randn(d_model(model))
    rhat = r / r.norm()
    caps = []
    try:  # the shared model loses its capture hooks even when the forward fails
        with steer(model, AblateDirection(r)):  # every layer
            for L in range(2):
                caps.append(_capture(model, L))
            _logits(model, batch)
    finally:
        for _, hd in caps:
            hd.remove()
    for seen, _ in caps:
        proj = seen[0] @ rhat
        assert proj.abs().max() < 1e-4
    # one layer only: layer 0 has a non-zero projection before ablation, layer 1 ablated
    seen0, hd0 = _capture(model, 0)
    try:
        with steer(model, AblateDirection(r, layer=1)):
            seen1, hd1 = _capture(model, 1)
            try:
                _logits(model, batch)
            finally:
                hd1.remove()
    finally:
        hd0.remove()
    assert (seen0[0] @ rhat).abs().max() > 1e-3 and (seen1[0] @ rhat).abs().max() < 1e-4


@pytest.mark.parametrize("positions", ["prompt", "generated", "all"])
def test_positions_prompt_vs_generated_with_kv_cache(tiny, positions):
    model, tok = tiny
    batch = _ids(tok, ["how do i make a cake?", "hi"])
    v = torch.randn(d_model(model))
    pre, h1 = _capture(model, 1)
    try:
        with steer(model, Add(v, 1.0, layer=1), positions=positions):
            post, h2 = _capture(model, 1)
            model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=True)
            h2.remove()
    finally:
        h1.remove()
    assert len(pre) == 4  # one prefill + 3 decode steps
    for step, (a, b) in enumerate(zip(pre, post)):
        edited = (b - a).abs().max() > 1e-6
        expect = positions == "all" or (positions == "prompt") == (step == 0)
        assert edited == expect, (positions, step)
        if edited:
            assert a.shape[1] == (batch["input_ids"].shape[1] if step == 0 else 1)


def test_generate_with_kv_cache_matches_no_cache(tiny, sae):
    model, tok = tiny
    batch = _ids(tok, ["how do i make a cake?", "explain photosynthesis"])
    kw = dict(max_new_tokens=8, do_sample=False)
    plain = model.generate(**batch, **kw)
    with steer(model, Clamp(sae, [2, 9], [25.0, 15.0])):
        cached = model.generate(**batch, use_cache=True, **kw)
        uncached = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)


def test_per_row_scale_zero_leaves_row_identical(tiny, sae):
    model, tok = tiny
    batch = _ids(tok, ["how do i make a cake?", "the quick brown fox"])
    base = _logits(model, batch)
    iv = Clamp(sae, [4], [30.0])
    iv.set_row_scale(torch.tensor([0.0, 1.0]))
    with steer(model, iv):
        out = _logits(model, batch)
    assert torch.equal(out[0], base[0]) and not torch.equal(out[1], base[1])
    # half strength on row 1 differs from full strength
    iv.set_row_scale([1.0, 0.5])
    with steer(model, iv):
        half = _logits(model, batch)
    assert not torch.equal(half[1], out[1]) and not torch.equal(half[0], base[0])


def test_select_rows_shrinks_row_state(tiny, sae):
    model, tok = tiny
    iv = Clamp(sae, [4], [30.0])
    iv.set_row_scale([0.0, 1.0, 2.0])
    select_rows(model, torch.tensor([0]))  # nothing installed: no-op
    assert iv.row_scale.tolist() == [0.0, 1.0, 2.0]
    with steer(model, iv):
        select_rows(model, torch.tensor([2, 0]))
    assert iv.row_scale.tolist() == [2.0, 0.0]
    batch = _ids(tok, ["a", "b", "c"])
    with pytest.raises(SaesteerError, match="row scale has 2 rows"):
        with steer(model, iv):
            _logits(model, batch)


def test_nested_steer_lists_interventions(tiny, sae):
    model, _ = tiny
    a, b = Clamp(sae, [1], [1.0]), Add(torch.zeros(d_model(model)), 1.0, layer=0)
    with steer(model, a):
        with steer(model, b):
            assert steering.active_interventions(model) == [a, b]
        assert steering.active_interventions(model) == [a]
    assert steering.active_interventions(model) == [] and model_hooks.hook_sets(model) == []


def test_validation_errors(tiny, sae):
    model, _ = tiny
    one = Clamp(sae, 5, 3.0)  # ARCHITECTURE.md form: one feature, one value
    assert one.features == [5] and one.values == [3.0] and one.layer == 1
    assert Clamp(sae, [5, 6], 2.0).values == [2.0, 2.0]
    with pytest.raises(SaesteerError, match="out of range"):
        Clamp(sae, [32], [1.0])
    with pytest.raises(SaesteerError, match="finite"):
        Clamp(sae, [1], [float("nan")])
    with pytest.raises(SaesteerError, match="finite"):
        Add(torch.ones(d_model(model)), float("inf"), layer=0)
    with pytest.raises(SaesteerError, match="2 features but 3"):
        Clamp(sae, [1, 2], [1.0, 2.0, 3.0])
    wide = make_sae(d_model(model) * 2, 32, k=4, layer=1, model="tiny-llama")
    with pytest.raises(SaesteerError, match="width|d_in"):
        with steer(model, Clamp(wide, [1], [1.0])):
            pass
    with pytest.raises(SaesteerError, match="layer"):
        with steer(model, Clamp(sae, [1], [1.0], layer=0)):
            pass
    other = make_sae(d_model(model), 32, k=4, layer=1, model="some-other-model")
    with pytest.raises(SaesteerError, match="model"):
        with steer(model, Clamp(other, [1], [1.0])):
            pass
    with pytest.raises(SaesteerError, match="width"):
        with steer(model, Add(torch.ones(7), 1.0, layer=0)):
            pass
    with pytest.raises(SaesteerError, match="out of range"):
        with steer(model, Add(torch.ones(d_model(model)), 1.0, layer=5)):
            pass
    with pytest.raises(SaesteerError, match="positions"):
        with steer(model, [], positions="middle"):
            pass
    with pytest.raises(SaesteerError, match="zero direction"):
        AblateDirection(torch.zeros(d_model(model)))
    assert steering.active_interventions(model) == [] and model_hooks.hook_sets(model) == []


def test_spec_roundtrip_and_errors(tmp_path):
    spec = SteeringSpec(kind="clamp", sae="runs/sae", features=[3, 4], values=[2.0, 5.0], positions="generated")
    d = json.loads(json.dumps(spec.to_dict()))
    assert SteeringSpec.from_dict(d) == spec
    p = tmp_path / "spec.json"
    p.write_text(json.dumps({"steering": [d, {"kind": "ablate_direction", "direction": "dir.safetensors"}]}))
    specs = load_specs(p)
    assert specs[0] == spec and specs[1].kind == "ablate_direction" and specs[1].layer is None
    with pytest.raises(SaesteerError, match="unknown steering kind"):
        SteeringSpec(kind="steer-harder")
    with pytest.raises(SaesteerError, match="unknown steering spec field"):
        SteeringSpec.from_dict({"kind": "clamp", "sae": "x", "features": [1], "values": [1], "colour": 1})
    with pytest.raises(SaesteerError, match="finite"):
        SteeringSpec.from_dict({"kind": "clamp", "sae": "x", "features": [1], "values": [float("nan")]})
    with pytest.raises(SaesteerError, match="needs values"):
        SteeringSpec(kind="clamp", sae="x", features=[1])
    with pytest.raises(SaesteerError, match="direction"):
        SteeringSpec(kind="ablate_direction")
    with pytest.raises(SaesteerError, match="not found"):
        load_specs(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(SaesteerError, match="not valid JSON"):
        load_specs(tmp_path / "bad.json")


def test_sae_without_layer_needs_one(tiny):
    model, _ = tiny
    sae = make_sae(d_model(model), 32, k=4, layer=-1, model="tiny-llama")
    with pytest.raises(SaesteerError, match="needs a layer"):
        with steer(model, Clamp(sae, [1], [1.0])):
            pass
    with steer(model, Clamp(sae, [1], [1.0], layer=1)) as ivs:
        assert ivs[0].layers(model) == [1]
