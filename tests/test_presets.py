"""Presets on tiny random models of each preset's architecture, with a synthetic SAE in each preset's file layout.

Per preset: the SAE resolves from a local stand-in of its hub location (``SAESTEER_PRESET_SAE_DIR`` and a fake
``huggingface_hub`` cache), ``load_sae`` reads it, the hook lands on the decoder layer the preset names (the tiny
model has ``preset.layer + 2`` layers, so the index is the real one), a clamp changes the output, and a layer / width
/ architecture mismatch is one clear error. The CLI lists the presets and fills options from one.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saesteer.cli import app, main
from saesteer.core import SaesteerError, SaesteerWarning
from saesteer.models import get_layers, hook_module, hook_state, tiny_model
from saesteer.sae import load_sae
from saesteer.steering import PRESETS, Clamp, get_preset, resolve_sae, steer
from saesteer.steering.presets import check_model, check_sae

D, N = 64, 128  # tiny residual width, synthetic SAE width (obrien2024: 8 x D, as the preset's expansion says)
PUBLIC = [n for n, p in PRESETS.items() if p.public]


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=1, keepdim=True)


def write_sae(preset, root: Path, d: int = D, layer: int | None = None) -> Path:
    """A synthetic SAE in the preset's layout; public presets go to ROOT/REPO/PATH (the hub layout)."""
    layer = preset.layer if layer is None else layer
    if not preset.public:  # obrien2024: our own Top-k SAE, k = 32, expansion 8
        from saesteer.sae import SAEConfig, TopKSAE, save_sae

        sae = TopKSAE(SAEConfig(d_in=d, num_latents=preset.expansion * d, k=preset.k, model=preset.model, layer=layer))
        return save_sae(sae, root / "obrien-sae")
    repo, path = preset.hub
    folder = root / repo / path
    folder.mkdir(parents=True, exist_ok=True)
    w = _unit(N, d, 1)
    if preset.sae_layout == "gemmascope":  # params.npz: W_enc [d, n], W_dec [n, d], b_enc, b_dec, threshold
        np.savez(folder / "params.npz", W_enc=w.t().numpy(), W_dec=w.numpy(), b_enc=np.zeros(N, np.float32),
                 b_dec=np.zeros(d, np.float32), threshold=np.full(N, 0.01, np.float32))
    else:  # dictionary_learning BatchTopKSAE: ae.pt + config.json
        assert preset.sae_layout == "dictionary_learning"
        torch.save({"encoder.weight": w.clone(), "encoder.bias": torch.zeros(N), "decoder.weight": w.t().clone(),
                    "b_dec": torch.zeros(d), "k": torch.tensor(8), "threshold": torch.tensor(0.01)},
                   folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({"trainer": {
            "dict_class": "BatchTopKSAE", "layer": layer, "lm_name": preset.model,
            "submodule_name": f"resid_post_layer_{layer}", "k": 8, "dict_size": N, "activation_dim": d}}))
    return folder


@pytest.fixture(scope="module")
def models():
    """One tiny model per preset architecture, deep enough for the preset's own layer index."""
    out = {}
    for name, p in PRESETS.items():
        m, tok = tiny_model(p.arch, layers=p.layer + 2, hidden=D)
        m.saesteer_name = p.model  # the SAEs record the preset's model; the model check compares names
        out[name] = (m, tok)
    return out


def test_registry():
    assert "obrien2024" in PRESETS and len(PUBLIC) >= 3
    ob = get_preset("obrien2024")
    assert (ob.model, ob.arch, ob.k, ob.expansion, ob.width, ob.clamps) == (
        "microsoft/Phi-3-mini-4k-instruct", "phi3", 32, 8, 24_576, (10.0, 12.0))
    assert ob.width == ob.expansion * ob.d_model and not ob.public
    assert {PRESETS[n].arch for n in PRESETS} >= {"phi3", "gemma2", "llama", "qwen2"}
    for n in PUBLIC:
        p = PRESETS[n]
        assert p.sae_source.startswith("hf://") and p.saelens and p.sae_licence and p.model_licence
        assert 0 <= p.layer < p.n_layers
    with pytest.raises(SaesteerError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(SaesteerError, match="no public SAE"):
        _ = ob.hub


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_on_tiny_model(name, models, tmp_path, monkeypatch):
    p = PRESETS[name]
    model, tok = models[name]
    made = write_sae(p, tmp_path)
    if p.public:
        monkeypatch.setenv("SAESTEER_PRESET_SAE_DIR", str(tmp_path))
        path = resolve_sae(p)
        assert path == made
    else:
        path = made
    sae = load_sae(path)
    layer = check_model(p, model)
    assert layer == p.layer
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check_sae(p, sae, model, layer)
    # Gemma Scope 2B has no chat-model SAEs: its preset runs the base-model SAE on gemma-2-2b-it, with a warning
    base_sae = "-pt-" in p.sae_source
    assert [str(w.message) for w in seen if w.category is SaesteerWarning] == (
        [f"the SAE was trained on the base model {p.model.removesuffix('-it')!r} and is applied to its chat fine-tune "
         f"{p.model!r}: check its reconstruction on chat data (saesteer sae-eval)"] if base_sae else [])
    assert sae.d_in == D and sae.cfg.layer == p.layer
    # the hook lands on decoder layer p.layer, and only there
    assert hook_module(model, layer) is get_layers(model)[p.layer]
    ids = tok(["how do i bake a cake?"], return_tensors="pt")
    with torch.no_grad():
        base = model(**ids).logits
    before = hook_state(model)
    iv = Clamp(sae=sae, features=[3], values=[p.clamps[-1] * 4])
    with steer(model, [iv]):
        during = hook_state(model)
        with torch.no_grad():
            steered = model(**ids).logits
    changed = [k for k in during if during[k] != before[k] and k.startswith("model.layers.")]
    assert changed == [f"model.layers.{p.layer}"], changed  # (steer also hooks the body to track positions)
    assert hook_state(model) == before
    assert not torch.allclose(base, steered, atol=1e-4), "the clamp did not change the output"


@pytest.mark.parametrize("name", list(PRESETS))
def test_mismatch_is_one_error(name, models, tmp_path):
    p = PRESETS[name]
    model, _ = models[name]
    wide = load_sae(write_sae(p, tmp_path / "wide", d=D + 16))
    with pytest.raises(SaesteerError, match=f"preset {name}: .*width {D + 16}"):
        check_sae(p, wide, model, p.layer)
    sae = load_sae(write_sae(p, tmp_path / "layer"))  # hooked one layer off (e.g. a wrong --layer)
    with pytest.raises(SaesteerError, match=f"preset {name}: the SAE was trained on layer {p.layer}, not layer "
                                            f"{p.layer - 1}"):
        check_sae(p, sae, model, p.layer - 1)
    wrong_arch = "llama" if p.arch != "llama" else "qwen2"
    m2, _ = tiny_model(wrong_arch, layers=2, hidden=D)
    with pytest.raises(SaesteerError, match=f"preset {name} is for {p.arch} models"):
        check_model(p, m2)
    with pytest.raises(SaesteerError, match="out of range"):
        check_model(p, tiny_model(p.arch, layers=2, hidden=D)[0])


def _fake_hub_cache(cache: Path, repo: str) -> Path:
    """The layout huggingface_hub's cache uses: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    return snap


@pytest.mark.parametrize("name", PUBLIC)
def test_resolution_through_huggingface_hub_cache(name, tmp_path, monkeypatch):
    """No override: the real hub path resolves through huggingface_hub (offline, from its cache)."""
    import huggingface_hub.constants as hc

    p = PRESETS[name]
    monkeypatch.delenv("SAESTEER_PRESET_SAE_DIR", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    repo, path = p.hub
    snap = _fake_hub_cache(tmp_path / "hub", repo)
    # write_sae puts files under ROOT/REPO/PATH: make ROOT/REPO the snapshot
    stand_in = tmp_path / "stand-in"
    (stand_in / repo).parent.mkdir(parents=True)
    (stand_in / repo).symlink_to(snap, target_is_directory=True)
    write_sae(p, stand_in)
    got = resolve_sae(p, cache_dir=tmp_path / "hub")
    assert got == snap / path and load_sae(got).d_in == D
    with pytest.raises(SaesteerError, match=f"preset {name}: could not fetch {p.sae_source}.*SAESTEER_PRESET_SAE_DIR"):
        resolve_sae(p, cache_dir=tmp_path / "empty")


def test_override_dir_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("SAESTEER_PRESET_SAE_DIR", str(tmp_path))
    with pytest.raises(SaesteerError, match="SAESTEER_PRESET_SAE_DIR must hold google/gemma-scope-9b-it-res/layer_20"):
        resolve_sae("gemma2-9b-it-gemmascope")


# ------------------------------------------------------------------------------------------------ CLI
def _ok(args):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res.stdout


def test_cli_presets_list():
    rows = json.loads(_ok(["presets", "--json"]))
    names = [r["name"] for r in rows]
    assert names[0] == "obrien2024" and len(names) >= 4
    assert all(r["sae_licence"] and r["hook_point"] for r in rows)
    table = _ok(["presets"])
    assert "obrien2024" in table and "andyrdt" in table


@pytest.fixture(scope="module")
def qwen_env(tmp_path_factory):
    """A tiny Qwen2 saved under the preset model's name, and the preset's SAE in a local stand-in folder."""
    p = PRESETS["qwen2.5-7b-it-andyrdt"]
    root = tmp_path_factory.mktemp("preset_cli")
    m, tok = tiny_model("qwen2", layers=p.layer + 2, hidden=D)
    mdir = root / "models" / "Qwen2.5-7B-Instruct"
    m.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    write_sae(p, root / "saes")
    return {"model": str(mdir), "saes": str(root / "saes"), "root": root}


def test_cli_generate_fills_from_preset(qwen_env, monkeypatch):
    monkeypatch.setenv("SAESTEER_PRESET_SAE_DIR", qwen_env["saes"])
    base = ["generate", "--preset", "qwen2.5-7b-it-andyrdt", "--model", qwen_env["model"], "--dtype", "float32",
            "--max-new-tokens", "5", "--json", "hello there"]
    rec = json.loads(_ok([*base, "-f", "3", "--compare"]).strip().splitlines()[-1])
    st = rec["steering"][0]
    assert st["kind"] == "clamp" and st["values"] == [4.0] and st["sae"].endswith("resid_post_layer_15/trainer_1")
    rec2 = json.loads(_ok([*base, "-f", "3", "-c", "7"]).strip().splitlines()[-1])
    assert rec2["steering"][0]["values"] == [7.0]  # explicit options win
    plain = json.loads(_ok(base).strip().splitlines()[-1])
    assert plain["steering"] == []  # no --feature: the preset gives model / dtype only


def test_cli_preset_errors(qwen_env, capsys, monkeypatch):
    monkeypatch.setenv("SAESTEER_PRESET_SAE_DIR", qwen_env["saes"])
    capsys.readouterr()
    for args, msg in [
        (["generate", "--preset", "nope", "hi"], "unknown preset 'nope'"),
        (["generate", "--preset", "qwen2.5-7b-it-andyrdt", "--model", qwen_env["model"], "--layer", "3", "-f", "1",
          "hi"], "the SAE was trained on layer 15, not layer 3"),
        (["generate", "--preset", "qwen2.5-7b-it-andyrdt", "--model", qwen_env["model"], "--dtype", "float8", "hi"],
         "--dtype must be one of float32, bfloat16, float16"),
        (["train", "--preset", "qwen2.5-7b-it-andyrdt", "--acts", "x", "--out", "y"], "nothing to train"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("saesteer: error:")]
        assert e.value.code == 2 and len(lines) == 1 and msg in lines[0], err


def test_cli_collect_and_train_from_preset(tmp_path, capsys):
    """obrien2024 on a tiny Phi-3: collect at the preset's layer in bf16, train with k = 32 and expansion 8."""
    p = PRESETS["obrien2024"]
    m, tok = tiny_model("phi3", layers=p.layer + 2, hidden=D)
    mdir = tmp_path / "Phi-3-mini-4k-instruct"
    m.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog"}) + "\n"
                             for i in range(40)))
    _ok(["collect", "--preset", "obrien2024", "--model", str(mdir), "--data", str(texts), "--tokens", "300",
         "--out", str(tmp_path / "acts"), "--context-len", "16"])
    meta = json.loads((tmp_path / "acts" / "meta.json").read_text())
    assert meta["layer"] == p.layer and meta["model_dtype"] == "bfloat16"
    _ok(["train", "--preset", "obrien2024", "--acts", str(tmp_path / "acts"), "--out", str(tmp_path / "sae"),
         "--model", str(mdir), "--steps", "2", "--batch-size", "64", "--no-progress"])
    cfg = json.loads((tmp_path / "sae" / "saesteer.json").read_text())
    flat = json.dumps(cfg)
    assert '"k": 32' in flat and f'"num_latents": {8 * D}' in flat and f'"layer": {p.layer}' in flat
