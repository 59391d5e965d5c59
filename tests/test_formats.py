"""SAE formats: own round trip, SAELens and sparsify export/import checked against the real libraries."""

from __future__ import annotations

import json

import pytest
import torch

from saesteer.core import SaesteerError
from saesteer.sae import (
    SAEConfig,
    TopKSAE,
    check_compatible,
    detect_format,
    export_saelens,
    export_sparsify,
    load_sae,
    save_sae,
)


@pytest.fixture()
def sae() -> TopKSAE:
    s = TopKSAE(SAEConfig(d_in=64, num_latents=256, k=8, model="tiny-llama", layer=1, hook_name="model.layers.1",
                          input_scale=0.23), seed=3)
    with torch.no_grad():
        s.b_enc.normal_(0, 0.3)
        s.b_dec.normal_(0, 1.0)
    return s


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(50, 64, generator=torch.Generator().manual_seed(1)) * 4


def _same_latents(a_vals, a_idx, b_dense, atol=1e-4):
    """Top-k (values, indices) of ours equal the non-zeros of another library's dense encoding."""
    ours = torch.zeros_like(b_dense).scatter_(-1, a_idx, a_vals)
    torch.testing.assert_close(ours, b_dense, atol=atol, rtol=1e-4)


def test_own_round_trip(sae, x, tmp_path):
    save_sae(sae, tmp_path / "s")
    assert detect_format(tmp_path / "s")[0] == "saesteer"
    back = load_sae(tmp_path / "s")
    assert back.cfg == sae.cfg
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x))


def test_saelens_export_loads_in_saelens(sae, x, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    export_saelens(sae, tmp_path / "sl")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    with torch.no_grad():
        vals, idx = sae.encode(x)
        _same_latents(vals, idx, theirs.encode(x))
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x), atol=1e-4, rtol=1e-4)
    back = load_sae(tmp_path / "sl")
    assert back.cfg.layer == 1 and back.cfg.model == "tiny-llama" and back.num_latents == 256
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x), atol=1e-4, rtol=1e-4)


def test_saelens_saved_sae_loads_in_ours(x, tmp_path):
    pytest.importorskip("sae_lens")
    from sae_lens import TopKSAE as SLTopK
    from sae_lens import TopKSAEConfig

    torch.manual_seed(0)
    for rescale, apply_b_dec in ((False, True), (True, False)):
        sl = SLTopK(TopKSAEConfig(d_in=64, d_sae=128, k=6, rescale_acts_by_decoder_norm=rescale,
                                  apply_b_dec_to_input=apply_b_dec))
        with torch.no_grad():
            for p in sl.parameters():
                p.normal_(0, 0.2)
            if not rescale:
                sl.W_dec.div_(sl.W_dec.norm(dim=1, keepdim=True))
        sl.cfg.metadata.hook_name = "model.layers.7"
        path = tmp_path / f"sl{int(rescale)}"
        sl.save_model(str(path))
        ours = load_sae(path)
        assert ours.cfg.layer == 7 and ours.k == 6
        with torch.no_grad():
            vals, idx = ours.encode(x)
            _same_latents(vals, idx, sl.encode(x))  # with rescale, their latents are ours (norm folded in)
            torch.testing.assert_close(ours(x), sl.decode(sl.encode(x)), atol=1e-4, rtol=1e-4)


def test_sparsify_round_trip_with_library(sae, x, tmp_path):
    sparsify = pytest.importorskip("sparsify")
    layer_dir = export_sparsify(sae, tmp_path / "sp")
    assert layer_dir.name == "layers.1"
    theirs = sparsify.SparseCoder.load_from_disk(layer_dir)
    with torch.no_grad():
        enc = theirs.encode(x)
        vals, idx = sae.encode(x)
        dense_theirs = torch.zeros(50, 256).scatter_(-1, enc.top_indices, enc.top_acts)
        _same_latents(vals, idx, dense_theirs)
        torch.testing.assert_close(theirs(x).sae_out, sae(x), atol=1e-4, rtol=1e-4)
    # a run folder with one layer folder is accepted too; metadata survives
    back = load_sae(tmp_path / "sp")
    assert back.cfg.model == "tiny-llama" and back.cfg.layer == 1
    # their own SAE saved by their code loads in ours and encodes the same latents
    sc = sparsify.SparseCoder(64, sparsify.SaeConfig(num_latents=192, k=5))
    with torch.no_grad():
        sc.b_dec.normal_(0, 0.5)
        sc.encoder.bias.normal_(0, 0.2)
    sc.save_to_disk(tmp_path / "theirs" / "layers.4")
    ours = load_sae(tmp_path / "theirs" / "layers.4")
    assert ours.cfg.layer == 4 and ours.num_latents == 192
    with torch.no_grad():
        enc = sc.encode(x)
        _same_latents(*ours.encode(x), torch.zeros(50, 192).scatter_(-1, enc.top_indices, enc.top_acts))
        torch.testing.assert_close(ours(x), sc(x).sae_out, atol=1e-4, rtol=1e-4)


def test_bad_files(sae, tmp_path):
    with pytest.raises(SaesteerError, match="not found"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaesteerError, match="holds no SAE"):
        load_sae(tmp_path / "empty")
    save_sae(sae, tmp_path / "t")
    w = tmp_path / "t" / "saesteer.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(SaesteerError, match="cannot read SAE weights"):
        load_sae(tmp_path / "t")
    export_saelens(sae, tmp_path / "j")
    cfg = json.loads((tmp_path / "j" / "cfg.json").read_text())
    (tmp_path / "j" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SaesteerError, match="architecture 'gated' is not supported"):
        load_sae(tmp_path / "j")
    (tmp_path / "j" / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_sae"}))
    with pytest.raises(SaesteerError, match="malformed saelens"):
        load_sae(tmp_path / "j")
    export_sparsify(sae, tmp_path / "two")
    export_sparsify(TopKSAE(SAEConfig(d_in=64, num_latents=128, k=4, layer=0)), tmp_path / "two2")
    (tmp_path / "two2" / "layers.0").rename(tmp_path / "two" / "layers.0")
    with pytest.raises(SaesteerError, match="several sparsify SAEs"):
        load_sae(tmp_path / "two")


def test_check_compatible(sae, tiny, monkeypatch):
    model, _ = tiny
    monkeypatch.setattr(model, "saesteer_name", "tiny-llama", raising=False)  # undone even if an assert fails
    check_compatible(sae, model, 1)
    with pytest.raises(SaesteerError, match="layer 1, not layer 0"):
        check_compatible(sae, model, 0)
    with pytest.raises(SaesteerError, match="out of range"):
        check_compatible(sae, model, 5)
    other = TopKSAE(SAEConfig(d_in=32, num_latents=64, k=4))
    with pytest.raises(SaesteerError, match="width 32"):
        check_compatible(other, model, 1)
    monkeypatch.setattr(model, "saesteer_name", "another-model")
    with pytest.raises(SaesteerError, match="trained on model 'tiny-llama'"):
        check_compatible(sae, model, 1)
    # a base-model SAE on the chat fine-tune of that model passes, with a warning; the other way round does not
    monkeypatch.setattr(model, "saesteer_name", "org/tiny-llama-Instruct")
    with pytest.warns(UserWarning, match="base model 'tiny-llama' .* chat fine-tune 'org/tiny-llama-Instruct'"):
        check_compatible(sae, model, 1)
    chat_sae = TopKSAE(SAEConfig(d_in=sae.d_in, num_latents=sae.num_latents, k=sae.k, layer=1, model="tiny-llama-it"))
    monkeypatch.setattr(model, "saesteer_name", "tiny-llama")
    with pytest.raises(SaesteerError, match="trained on model 'tiny-llama-it', not 'tiny-llama'"):
        check_compatible(chat_sae, model, 1)


def test_cli_export_import(sae, x, tmp_path):
    from typer.testing import CliRunner

    from saesteer.cli import app

    save_sae(sae, tmp_path / "s")
    r = CliRunner()
    res = r.invoke(app, ["sae", "export", "--to", "saelens", str(tmp_path / "s"), str(tmp_path / "sl")])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["sae", "import", str(tmp_path / "sl"), str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        torch.testing.assert_close(load_sae(tmp_path / "back")(x), sae(x), atol=1e-4, rtol=1e-4)
    res = r.invoke(app, ["sae", "info", "--json", str(tmp_path / "back")])
    assert json.loads(res.output)["num_latents"] == 256
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "saesteer", "sae", "export", "--to", "onnx", str(tmp_path / "s"),
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2 and "--to must be saelens or sparsify" in p.stderr
