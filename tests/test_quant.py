"""Weight-only int8 linears (``models.quant``): the quantisation against a dense reference, the layer in both kernels
(torch's packed int8 kernel for bf16 on CPU, dequantise-then-matmul elsewhere), a whole tiny model's logits, steering
on a quantized model, and ``load_model(quantize=...)``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from saesteer.core import SaesteerError
from saesteer.models import Int4Linear, Int8Linear, quantize_model, tiny_model
from saesteer.models.quant import quantize_groups, quantize_rows


def test_quantize_rows_dense_reference():
    w = torch.randn(37, 19, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 37)[:, None]
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    ref_scale = w.abs().max(dim=1).values / 127
    assert torch.allclose(scale, ref_scale)
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # round-to-nearest: at most half a step per element


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_fp32_path_equals_dense(bias):
    lin = nn.Linear(24, 40, bias=bias)
    ql = Int8Linear(lin)
    x = torch.randn(3, 5, 24)
    ref = nn.functional.linear(x, ql.dequantized(torch.float32), lin.bias)
    assert torch.allclose(ql(x), ref, atol=1e-5)
    assert torch.allclose(ql(x), lin(x), rtol=0.05, atol=0.05)  # and close to the unquantized layer


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_int8_linear_bf16_kernel_matches_dense(rows):
    """The packed int8 kernel (bf16 activations on CPU) computes x @ (q * scale)^T + b like the dense reference."""
    lin = nn.Linear(64, 96).to(torch.bfloat16)
    ql = Int8Linear(lin)
    x = torch.randn(rows, 64).to(torch.bfloat16)
    with torch.no_grad():
        got = ql(x).float()
    ref = x.float() @ ql.dequantized(torch.float32).t() + lin.bias.float()
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.02, rel


def test_quantize_groups_dense_reference():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    q, scale, zero = quantize_groups(w, 64)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15 and scale.shape == (8, 2)
    g = w.reshape(8, 2, 64)
    assert torch.allclose(scale, (g.amax(-1) - g.amin(-1)) / 15)
    deq = ((q.float().reshape(8, 2, 64) - 8) * scale[..., None] + zero[..., None]).reshape(8, 128)
    assert bool(((deq - w).abs() <= scale.repeat_interleave(64, 1) / 2 + 1e-6).all())  # half a step per element
    with pytest.raises(SaesteerError, match="divisible by 64"):
        quantize_groups(torch.randn(4, 96), 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_linear_kernel_matches_dense(dtype, rows):
    """torch's packed CPU int4 kernel computes x @ W_deq^T + b with W_deq from :func:`quantize_groups` (independent
    dense dequantization), and the unpacked (non-CPU) path computes the same."""
    lin = nn.Linear(128, 48).to(dtype)
    ql = Int4Linear(lin)
    q, scale, zero = quantize_groups(lin.weight.float(), 64)
    deq = ((q.float().reshape(48, 2, 64) - 8) * scale[..., None] + zero[..., None]).reshape(48, 128)
    x = torch.randn(rows, 3, 128).to(dtype)
    with torch.no_grad():
        got = ql(x).float()
        ref = x.float() @ deq.to(dtype).float().t() + lin.bias.float()
        assert got.shape == (rows, 3, 48)
        tol = 1e-4 if dtype == torch.float32 else 0.02
        assert float((got - ref).norm() / ref.norm()) < tol
        assert torch.allclose(ql.dequantized(torch.float32), deq.to(dtype).float(), rtol=1e-2, atol=1e-2)
        ql.packed, ql.weight_int4 = False, q.to(torch.uint8)  # the dequantize-per-call path (other devices)
        assert float((ql(x).float() - ref).norm() / ref.norm()) < tol


def test_int4_model_keeps_head_int8():
    model, tok = tiny_model("llama", layers=2, weight_std=0.2)
    qm = copy.deepcopy(model)
    quantize_model(qm, "int4")
    assert isinstance(qm.get_output_embeddings(), Int8Linear)
    kinds = {type(m).__name__ for n, m in qm.named_modules() if ".layers." in n and type(m).__name__.startswith("Int")}
    want = {"Int4Linear"} if all(m.in_features % 64 == 0 for m in model.modules() if isinstance(m, nn.Linear)) \
        else {"Int4Linear", "Int8Linear"}
    assert kinds == want, kinds
    q8 = copy.deepcopy(model)
    quantize_model(q8, "int8")
    ids = tok(["hello there"], return_tensors="pt")
    with torch.no_grad():
        a, b, c = model(**ids).logits, qm(**ids).logits, q8(**ids).logits
    e4, e8 = float((a - b).norm() / a.norm()), float((a - c).norm() / a.norm())
    assert 0 < e8 < e4 < 0.5, (e8, e4)  # 4 bits lose more than 8, and the tiny model still computes


def test_quantize_model_tiny_logits_and_steering():
    from saesteer.models import hook_module, run_to_layer
    from saesteer.steering import Add, steer

    model, tok = tiny_model("qwen2", layers=3, weight_std=0.2)
    qm = copy.deepcopy(model)
    n = quantize_model(qm, "int8", fuse=False)
    assert n == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert not any(isinstance(m, nn.Linear) for m in qm.modules()) and qm.saesteer_quantize == "int8"
    ids = tok(["hello there", "how do i bake bread?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = model(**ids).logits, qm(**ids).logits
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.05, rel  # changed (really quantized) but close
    # steering writes the residual stream of the quantized model exactly like the float one's
    v = torch.randn(model.config.hidden_size)
    with torch.no_grad():
        base = run_to_layer(qm, ids["input_ids"], ids["attention_mask"], 1)
        got = {}

        def grab(_m, _i, o):
            got["h"] = o[0] if isinstance(o, tuple) else o

        with steer(qm, [Add(vector=v, alpha=1.0, layer=1)]):
            h = hook_module(qm, 1).register_forward_hook(grab)  # after the steering hook: sees its edit
            try:
                qm(**ids)
            finally:
                h.remove()
    assert torch.allclose(got["h"], base + v, atol=1e-5)
    assert quantize_model(copy.deepcopy(model), "none") == 0


def test_load_model_quantize(tiny_dir):
    from saesteer.models import load_model

    m, _ = load_model(str(tiny_dir), dtype="float32", quantize="int8")
    assert any(isinstance(x, Int8Linear) for x in m.modules()) and not any(isinstance(x, nn.Linear) for x in m.modules())
    with pytest.raises(SaesteerError, match="--quantize must be one of auto, none, packed, int8"):
        load_model(str(tiny_dir), quantize="int3")


def test_cli_generate_quantized(tiny_dir, capsys):
    from saesteer.cli import main

    main(["generate", "hello", "--model", str(tiny_dir), "--max-new-tokens", "4", "--quantize", "int8", "--json"])
    assert '"answer"' in capsys.readouterr().out
    with pytest.raises(SystemExit) as ei:
        main(["generate", "hello", "--model", str(tiny_dir), "--quantize", "int3"])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and err.strip() == "saesteer: error: --quantize must be one of auto, none, packed, int8, int4, int8-decode, int4-decode, got 'int3'"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projections_compute_the_separate_int8_layers(arch, dtype):
    """q/k/v and gate/up fused into one int8 layer: per-row scales make the fused weights the same numbers, so the
    model computes what the separately quantized one does (both kernels), with 4 quantized calls per layer."""
    from saesteer.models.quant import FusedLinears, FusedPart

    model, tok = tiny_model(arch, layers=2, weight_std=0.2)
    model.to(dtype)
    sep, fused = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(sep, "int8", fuse=False)
    quantize_model(fused, "int8")
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert all(isinstance(getattr(attn, n), FusedPart) for n in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(mlp.gate_proj, FusedPart) and isinstance(mlp.up_proj, FusedPart)
    assert sum(isinstance(m, FusedLinears) for m in fused.modules()) == 4  # listed once each in the module tree
    ids = tok(["hello there", "how do i bake bread?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = sep(**ids).logits.float(), fused(**ids).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(a, b, atol=tol, rtol=tol), float((a - b).abs().max())
    # a part called on another input than its siblings' computes its own output (never a stale one)
    x, y = torch.randn(3, attn.q_proj.in_features, dtype=dtype), torch.randn(3, attn.q_proj.in_features, dtype=dtype)
    sq = sep.model.layers[0].self_attn
    with torch.no_grad():
        q = attn.q_proj(x)
        k_other = attn.k_proj(y)
        assert torch.allclose(q.float(), sq.q_proj(x).float(), atol=tol, rtol=tol)
        assert torch.allclose(k_other.float(), sq.k_proj(y).float(), atol=tol, rtol=tol)
        assert torch.allclose(attn.v_proj(y).float(), sq.v_proj(y).float(), atol=tol, rtol=tol)
        for n in ("q_proj", "k_proj", "v_proj"):
            assert torch.allclose(getattr(attn, n)(x).float(), getattr(sq, n)(x).float(), atol=tol, rtol=tol)
        assert attn.q_proj.group._x is None  # every part of x's product taken: nothing held between steps


def test_int8_decode_keeps_prefill_exact_and_decodes_in_int8(monkeypatch):
    """``int8-decode``: inputs of more than DECODE_ROWS rows (prefill) go through the model's own weights — logits
    as the unquantized model's — and one-row decode steps through torch's int8 kernel."""
    from saesteer.generation import GenerationConfig, generate_rows
    from saesteer.models.quant import DECODE_ROWS

    model, tok = tiny_model("qwen2", layers=2, weight_std=0.2)
    model.to(torch.bfloat16)
    qm = copy.deepcopy(model)
    quantize_model(qm, "int8-decode")
    ids = tok(["hello there, how do i bake bread?"], return_tensors="pt")
    assert ids["input_ids"].shape[1] > DECODE_ROWS
    with torch.no_grad():
        a, b = model(**ids).logits.float(), qm(**ids).logits.float()
    assert torch.allclose(a, b, atol=2e-2, rtol=2e-2) and float((a - b).abs().max()) < 0.05
    calls, heads = [], []
    real8, real4 = torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, *r: calls.append(x.shape[0]) or real8(x, *r))
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda x, *r: heads.append(x.shape[0]) or real4(x, *r))
    outs = generate_rows(qm, tok, ["hello there"], GenerationConfig(max_new_tokens=5, batch_size=1, eos_ids=[]))
    assert len(outs[0].out_ids) == 5
    # 4 decode steps after the prefill, each: 2 layers x 4 int8 calls (qkv, o, gate/up, down); the LM head (the
    # rescored int4 head) on those and on the prefill's last position (one row)
    assert set(calls) == {1} and len(calls) == 4 * 2 * 4 and heads == [1] * 5


def test_resolve_quantize_auto():
    from saesteer.models import resolve_quantize

    assert resolve_quantize("auto", "cpu", torch.bfloat16) == "int8-decode"
    assert resolve_quantize("auto", "cpu", "bfloat16") == "int8-decode"
    assert resolve_quantize("auto", "cpu", torch.float32) == "none"
    assert resolve_quantize("auto", "cuda", torch.bfloat16) == "none"
    assert resolve_quantize(None) == "none" and resolve_quantize("int4", "cuda") == "int4"
    with pytest.raises(SaesteerError, match="--quantize must be one of"):
        resolve_quantize("int2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rescored_head_exact_on_its_candidates(dtype):
    """The tied LM head of the int8 modes: int4 logits to find the top 32, exact logits (x @ W[i], an independent
    dense product) for them — the dense argmax and top logits are reproduced; above max_rows the product is dense."""
    from saesteer.models.quant import RescoredHead

    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(128, 2048, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2048, 128, generator=g).to(dtype))
    head = RescoredHead(lin, max_rows=4)
    x = torch.randn(3, 128, generator=g).to(dtype)
    with torch.no_grad():
        got, ref = head(x).float(), (x.float() @ lin.weight.float().t())
        approx = head.int4(x).float()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    top = ref.topk(8, -1).indices
    tol = 1e-4 if dtype == torch.float32 else 0.5  # bf16 output rounding of logits of magnitude ~30
    assert torch.allclose(got.gather(-1, top), ref.gather(-1, top), atol=tol, rtol=1e-2)
    assert not torch.allclose(approx.gather(-1, top), ref.gather(-1, top), atol=tol, rtol=1e-3)  # int4 alone is off
    rest = torch.ones_like(got, dtype=torch.bool).scatter(-1, approx.topk(32, -1).indices, False)
    assert torch.equal(got[rest], approx[rest])  # outside the candidates: the int4 logits
    big = torch.randn(2, 5, 128, generator=g).to(dtype)
    with torch.no_grad():
        assert torch.equal(head(big), nn.functional.linear(big, lin.weight))


def test_quantize_model_rescores_a_kept_head_only():
    from saesteer.models.quant import RescoredHead

    tied, _ = tiny_model("llama", layers=1)  # tie_word_embeddings
    untied, _ = tiny_model("qwen2", layers=1)
    quantize_model(tied, "int8-decode")
    quantize_model(untied, "int8-decode")
    assert isinstance(tied.get_output_embeddings(), RescoredHead)
    assert tied.get_output_embeddings().dense.data_ptr() == tied.get_input_embeddings().weight.data_ptr()  # no copy
    assert isinstance(untied.get_output_embeddings(), RescoredHead)  # int8-decode keeps the dense head anyway
    untied, _ = tiny_model("qwen2", layers=1)
    quantize_model(untied, "int8")  # would have to keep a dense copy: int8 head
    assert isinstance(untied.get_output_embeddings(), Int8Linear)
    plain, _ = tiny_model("llama", layers=1)
    quantize_model(plain, "int8", rescore=False)
    assert isinstance(plain.get_output_embeddings(), Int8Linear)


def test_quantize_model_int4_layout_options():
    model, _ = tiny_model("qwen2", layers=1)
    quantize_model(model, "int4", int4_group=32, int4_names=("gate_proj", "up_proj"))
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    assert isinstance(mlp.gate_proj, Int4Linear) and mlp.gate_proj.group == 32 and isinstance(mlp.up_proj, Int4Linear)
    assert isinstance(mlp.down_proj, Int8Linear) and isinstance(attn.q_proj, Int8Linear)
    assert isinstance(model.get_output_embeddings(), Int8Linear)


def test_server_on_an_int8_decode_model_matches_direct_generation():
    """``serve`` on CPU in bf16 defaults to int8-decode: a single request is decoded through the int8 path and
    answers exactly what direct generation on the same quantized model gives; /health says so."""
    from fastapi.testclient import TestClient

    from saesteer.generation import GenerationConfig, generate
    from saesteer.serve import ServeConfig, make_app, served_models

    model, tok = tiny_model("llama", weight_std=0.15)
    model.to(torch.bfloat16)
    quantize_model(model, "int8-decode")
    msgs = [{"role": "user", "content": "how do i make a cake?"}]
    ref = generate(model, tok, [msgs], GenerationConfig(max_new_tokens=6, batch_size=1))[0]
    app = make_app(model, tok, served_models(model), ServeConfig(max_tokens_limit=40, batch_wait_ms=5))
    try:
        with TestClient(app) as c:
            assert c.get("/health").json()["weights"] == {"dtype": "bfloat16", "quantize": "int8-decode"}
            r = c.post("/v1/chat/completions", json={"model": "default", "messages": msgs, "max_tokens": 6,
                                                         "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == ref
    finally:
        app.state.engine.close()


def test_dense_path_of_a_sliced_3d_input_is_one_matmul():
    """The kept dense weight is not a Parameter: ``F.linear`` on the LM head's non-contiguous ``hidden[:, -1:]`` would
    take ``bmm`` over a copy of the weight per row (20 s for a 64-row prefill of the default model); the dense paths
    fold the input to 2-D first — same numbers as nn.Linear, and no bmm."""
    from torch.profiler import profile

    from saesteer.models.quant import RescoredHead

    lin = nn.Linear(64, 384, bias=True)
    h = torch.randn(6, 5, 64)
    x = h[:, -1:, :]  # [6, 1, 64], not contiguous
    assert not x.is_contiguous()
    for layer in (Int8Linear(lin, max_rows=4), RescoredHead(lin, max_rows=4)):
        with torch.inference_mode(), profile() as prof:
            got = layer(x)
        assert got.shape == (6, 1, 384) and torch.allclose(got, lin(x), atol=1e-5)
        assert not any(e.key == "aten::bmm" for e in prof.key_averages())


def test_int4_decode_fuses_and_decodes_in_int4(monkeypatch):
    """``int4-decode``: fused int4 groups (q/k/v, gate/up) and int4 o / down projections for one-row steps, the
    rescored head, the model's own weights for the prompt (prefill logits as the unquantized model's)."""
    from saesteer.generation import GenerationConfig, generate_rows
    from saesteer.models.quant import FusedPart, RescoredHead

    model, tok = tiny_model("qwen2", layers=2, weight_std=0.2)
    model.to(torch.bfloat16)
    qm = copy.deepcopy(model)
    quantize_model(qm, "int4-decode")
    attn = qm.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedPart) and isinstance(attn.q_proj.group.layer, Int4Linear)
    assert isinstance(attn.o_proj, Int4Linear) and attn.o_proj.max_rows is not None
    assert isinstance(qm.get_output_embeddings(), RescoredHead)
    ids = tok(["hello there, how do i bake bread?"], return_tensors="pt")
    with torch.no_grad():
        a, b = model(**ids).logits.float(), qm(**ids).logits.float()
    assert float((a - b).abs().max()) < 0.05
    calls = []
    real4 = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda x, *r: calls.append(x.shape[0]) or real4(x, *r))
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: pytest.fail("no int8 layer in int4-decode"))
    generate_rows(qm, tok, ["hello there"], GenerationConfig(max_new_tokens=5, batch_size=1, eos_ids=[]))
    # 4 steps x (2 layers x 4 int4 calls + the head) + the prefill's head on its last position
    assert set(calls) == {1} and len(calls) == 4 * (2 * 4 + 1) + 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt2"])
@pytest.mark.parametrize("mode", ["int8-decode", "int4-decode"])
def test_decode_modes_on_every_architecture(arch, mode):
    """Every tiny architecture quantizes in the -decode modes, reads a prompt like the unquantized model and
    generates through its one-row quantized path (fused q/k/v and gate/up where the names exist)."""
    from saesteer.generation import GenerationConfig, generate_rows

    model, tok = tiny_model(arch, layers=2, weight_std=0.2)
    model.to(torch.bfloat16)
    qm = copy.deepcopy(model)
    quantize_model(qm, mode)
    ids = tok(["hello there, how do i bake bread?"], return_tensors="pt")
    with torch.no_grad():
        a, b = model(**ids).logits.float(), qm(**ids).logits.float()
    assert float((a - b).abs().max()) < 0.1
    out = generate_rows(qm, tok, ["hello there"], GenerationConfig(max_new_tokens=4, batch_size=1, eos_ids=[]))
    assert len(out[0].out_ids) == 4
