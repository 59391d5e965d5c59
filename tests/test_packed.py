"""bf16 linears reordered once for oneDNN (``models.packed``): the same numbers as ``F.linear`` (the dense reference),
whole tiny models in ``--quantize packed``, the kept weights of the -decode modes, and the checks that refuse what
cannot be packed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from saesteer.core import SaesteerError
from saesteer.models import PackedLinear, packing_supported, quantize_model, tiny_model
from saesteer.models import packed as packed_mod

pytestmark = pytest.mark.skipif(not packing_supported(), reason="this torch / CPU cannot pack bf16 weights for oneDNN")

ARCHS = ["llama", "qwen2", "mistral", "gemma", "gemma2", "phi3"]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96)])
def test_packed_linear_equals_f_linear(bias, shape):
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(96, 200, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(200, 96, generator=g))
    x = torch.randn(*shape, generator=g).bfloat16()
    got = PackedLinear(lin)(x)
    ref = F.linear(x, lin.weight, lin.bias)
    assert got.shape == ref.shape and got.dtype == torch.bfloat16
    assert torch.equal(got, ref)  # bit-identical, not merely close


def test_packed_linear_needs_bf16_on_cpu():
    with pytest.raises(SaesteerError, match="bfloat16"):
        PackedLinear(nn.Linear(8, 8))


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_model_same_logits_and_tokens(arch):
    """A tiny model in ``packed`` mode: bit-identical prompt logits (fused q/k/v and gate/up included) and the same
    greedy tokens through the decode loop (one-row steps use the rescored head's exact candidates)."""
    from saesteer.generation import GenerationConfig, generate_rows
    from saesteer.models.quant import FusedPart, RescoredHead

    model, tok = tiny_model(arch, layers=2, weight_std=0.2)
    model.to(torch.bfloat16)
    pm = copy.deepcopy(model)
    n = quantize_model(pm, "packed")
    assert n > 0 and pm.saesteer_quantize == "packed"
    assert not any(isinstance(m, nn.Linear) for m in pm.modules())
    assert isinstance(pm.get_output_embeddings(), RescoredHead)
    if arch != "phi3":  # Phi-3's projections come fused already
        assert isinstance(pm.model.layers[0].self_attn.q_proj, FusedPart)
    ids = tok(["hello there, how do i bake bread?", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, pm(**ids).logits)
    cfg = GenerationConfig(max_new_tokens=6, batch_size=1, eos_ids=[])
    a = generate_rows(model, tok, ["hello there"], cfg)[0].out_ids
    b = generate_rows(pm, tok, ["hello there"], cfg)[0].out_ids
    assert a == b and len(a) == 6


def test_packed_refuses_float32_without_touching_the_model():
    model, _ = tiny_model("llama", layers=1)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(SaesteerError, match="bfloat16 model on CPU"):
        quantize_model(model, "packed")
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing half-packed


def test_int8_decode_keeps_its_dense_weights_packed():
    """The -decode modes serve prompts and batches from the kept weights: packed, so a prompt's logits are the
    unquantized model's bit for bit."""
    from saesteer.models import Int8Linear

    model, tok = tiny_model("qwen2", layers=2, weight_std=0.2)
    model.to(torch.bfloat16)
    qm = copy.deepcopy(model)
    quantize_model(qm, "int8-decode")
    down = qm.model.layers[0].mlp.down_proj
    assert isinstance(down, Int8Linear) and isinstance(down.dense_packed, PackedLinear) and down.dense is None
    ids = tok(["hello there, how do i bake bread?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, qm(**ids).logits)


def test_without_onednn_packing_the_decode_modes_keep_plain_weights(monkeypatch):
    """Where this torch cannot pack (checked once by ``packing_supported``), int8-decode keeps the plain weight and
    ``packed`` is refused with one clear error."""
    from saesteer.models import Int8Linear

    monkeypatch.setattr(packed_mod, "packing_supported", lambda: False)
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    layer = Int8Linear(lin, max_rows=4)
    assert layer.dense_packed is None and layer.dense is not None
    x = torch.randn(9, 64).bfloat16()
    assert torch.allclose(layer(x).float(), lin(x).float(), atol=1e-2)
    from saesteer.models import quant

    monkeypatch.setattr(quant, "packing_supported", lambda: False)
    model, _ = tiny_model("llama", layers=1)
    model.to(torch.bfloat16)
    with pytest.raises(SaesteerError, match="oneDNN"):
        quantize_model(model, "packed")


def test_packing_supported_checks_the_running_torch(monkeypatch):
    packed_mod.packing_supported.cache_clear()
    try:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        assert packed_mod.packing_supported() is False
    finally:
        packed_mod.packing_supported.cache_clear()
    monkeypatch.undo()
    assert packed_mod.packing_supported() is True


def test_cli_generate_packed(tiny_dir, capsys):
    """``generate --quantize packed`` answers as the unpacked bf16 model; on a float32 model it is one clear error."""
    import json

    from saesteer.cli import main

    args = ["generate", "hello there", "--model", str(tiny_dir), "--max-new-tokens", "5", "--dtype", "bfloat16", "--json"]
    main(args)
    ref = json.loads(capsys.readouterr().out)
    main(args + ["--quantize", "packed"])
    got = json.loads(capsys.readouterr().out)
    assert got == ref
    with pytest.raises(SystemExit) as ei:
        main(["generate", "hello", "--model", str(tiny_dir), "--dtype", "float32", "--quantize", "packed"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bar
    assert ei.value.code == 2 and err == ("saesteer: error: --quantize packed needs a bfloat16 model on CPU "
                                          "(use --dtype bfloat16)")
