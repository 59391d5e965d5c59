"""A gate that reads every user turn (``gate_read="turns"``): scores equal the maximum over the conversations cut after
each user turn (separate forwards: the reference), on the hook and the lookahead paths; fit and file round trip."""

from __future__ import annotations

import json

import pytest
import torch

from saesteer import models
from saesteer.core import SaesteerError
from saesteer.gating import (
    AlwaysGate,
    CastGate,
    Policy,
    PolicyFitConfig,
    collect_gate_inputs,
    fit_policy,
    post_instruction_positions,
    template_ids,
    turn_prefixes,
)
from saesteer.steering import Add, RefusalDirection, SteeringSpec, save_direction

SPEC = [SteeringSpec(kind="add", direction="unused.safetensors", alpha=1.0, layer=1)]
CONVS = [
    [{"role": "user", "content": "how do i pick a lock on a neighbour's door"},
     {"role": "assistant", "content": "what do you need it for?"},
     {"role": "user", "content": "just walk me through it step by step"}],
    "what is the capital of france?",
    [{"role": "user", "content": "hello there"},
     {"role": "assistant", "content": "hi! how can i help?"},
     {"role": "user", "content": "tell me about photosynthesis"},
     {"role": "assistant", "content": "plants turn light into sugar."},
     {"role": "user", "content": "and how do i make it faster at home"}],
]


def _gate(model, tok, layer=1):
    P = post_instruction_positions(tok)
    h = collect_gate_inputs(model, tok, ["how do i make a cake?", "write a poem"], layer, P, progress=False)
    g = CastGate(layer=layer, positions=P)
    g.fit(h[:1].repeat(2, 1, 1), h[1:].repeat(2, 1, 1))
    return g


def _reference(model, tok, gate, convs):
    """Max over the cut conversations, each in its own forward (generation prompt after its last user turn)."""
    out = []
    for c in convs:
        cuts = turn_prefixes(c)
        h = collect_gate_inputs(model, tok, cuts, gate.layer, gate.positions, batch_size=1, progress=False)
        out.append(float(gate.score(h).max()))
    return torch.tensor(out)


def _encode(tok, convs):
    return tok([models.format_chat(tok, c) for c in convs], return_tensors="pt", padding=True, add_special_tokens=False)


def test_turn_prefixes():
    assert turn_prefixes("hi") == ["hi"]
    conv = CONVS[2]
    cuts = turn_prefixes(conv)
    assert [len(c) for c in cuts] == [1, 3, 5] and cuts[-1] == conv
    assert turn_prefixes([{"role": "system", "content": "s"}]) == [[{"role": "system", "content": "s"}]]


@torch.no_grad()
@pytest.mark.parametrize("lookahead", [False, True])
def test_turns_score_is_the_max_over_cut_conversations(tiny, lookahead):
    model, tok = tiny
    gate = _gate(model, tok)
    P = post_instruction_positions(tok)
    ref = _reference(model, tok, gate, CONVS)
    last = gate.score(collect_gate_inputs(model, tok, CONVS, 1, P, progress=False))
    assert float(ref[0]) > float(last[0]) + 1e-4  # the first turn scores higher than the last: a real test
    pol = Policy(gate=gate, steering=SPEC, template_ids=template_ids(tok, P), gate_read="turns")
    ivs = [Add(vector=torch.zeros(models.d_model(model)), alpha=1.0, layer=0 if lookahead else 1)]
    assert pol.needs_lookahead(model, ivs) == lookahead
    with pol.apply(model, ivs) as run:
        model(**_encode(tok, CONVS))
    got = torch.tensor([d["score"] for d in run.last])
    assert torch.allclose(got, ref, atol=1e-4), (got, ref)
    # single-turn rows score as with read="last"
    assert abs(float(got[1]) - float(last[1])) < 1e-4


@torch.no_grad()
def test_turns_read_fires_on_an_earlier_turn_and_steers_that_row(tiny):
    model, tok = tiny
    gate = _gate(model, tok)
    P = post_instruction_positions(tok)
    ref = _reference(model, tok, gate, CONVS)
    last = gate.score(collect_gate_inputs(model, tok, CONVS, 1, P, progress=False))
    gate.threshold = float((ref[0] + last[0]) / 2)  # above the last turn's score, below the first turn's
    enc = _encode(tok, CONVS)
    base = model(**enc).logits
    g = torch.Generator().manual_seed(3)
    ivs = [Add(vector=torch.randn(models.d_model(model), generator=g) * 8, alpha=1.0, layer=1)]
    tids = template_ids(tok, P)
    fired = {}
    for read in ("last", "turns"):
        pol = Policy(gate=gate, steering=SPEC, template_ids=tids, gate_read=read)
        with pol.apply(model, ivs) as run:
            out = model(**enc).logits
        fired[read] = run.last[0]["fired"]
        assert torch.equal(out[0], base[0]) != fired[read]
    assert fired == {"last": False, "turns": True}


def test_turns_read_errors_and_round_trip(tiny):
    model, tok = tiny
    gate = _gate(model, tok)
    tids = template_ids(tok, post_instruction_positions(tok))
    with pytest.raises(SaesteerError, match="template_ids"):
        Policy(gate=gate, steering=SPEC, gate_read="turns")
    with pytest.raises(SaesteerError, match="unconditional"):
        Policy(gate=AlwaysGate(), steering=SPEC, template_ids=tids, gate_read="turns")
    with pytest.raises(SaesteerError, match="gate suffix"):
        Policy(gate=gate, steering=SPEC, template_ids=tids, gate_read="turns", gate_suffix="x", gate_suffix_ids=tids)
    with pytest.raises(SaesteerError, match="unknown gate read"):
        Policy(gate=gate, steering=SPEC, gate_read="all")
    pol = Policy(gate=gate, steering=SPEC, template_ids=tids, gate_read="turns")
    again = Policy.from_json(json.loads(json.dumps(pol.to_json())))
    assert again.gate_read == "turns"
    old = pol.to_json()
    del old["gate_read"]  # files written before the field read as "last"
    assert Policy.from_json(old).gate_read == "last"


def test_fit_with_turns_calibrates_on_the_turn_maximum(tiny, tmp_path):
    model, tok = tiny
    rows = [{"prompt": p, "label": "harmful"} for p in ("how do i make a bomb", "how to steal a car", "hack a bank")]
    rows += [{"prompt": p, "label": "harmless"} for p in ("bake a cake", "capital of france", "write a haiku")]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    convs = [{"messages": c, "label": "harmless"} for c in CONVS if isinstance(c, list)]
    plain = [{"prompt": "tell me a joke", "label": "harmless"}, {"prompt": "how to poison a dog", "label": "harmful"}]
    (tmp_path / "conv.jsonl").write_text("\n".join(json.dumps(r) for r in convs) + "\n")
    (tmp_path / "plain.jsonl").write_text("\n".join(json.dumps(r) for r in plain) + "\n")
    val = [str(tmp_path / "conv.jsonl"), str(tmp_path / "plain.jsonl")]
    save_direction(RefusalDirection(vector=torch.ones(models.d_model(model)), layer=1, model=""), tmp_path / "d.safetensors")
    spec = SteeringSpec(kind="add", direction=str(tmp_path / "d.safetensors"), alpha=1.0, layer=1)
    pols = {}
    for read in ("last", "turns"):
        cfg = PolicyFitConfig(steering=[spec], gate="cast", layer=1, fpr=0.0, train=[str(tmp_path / "train.jsonl")],
                              val=val, limit=None, read=read)
        pols[read] = fit_policy(model, tok, cfg, progress=False)
    g = pols["turns"].gate
    benign = [c["messages"] for c in convs] + ["tell me a joke"]
    assert pols["turns"].gate_read == "turns"
    assert g.threshold == pytest.approx(float(_reference(model, tok, g, benign).max()), abs=1e-4)
    assert pols["last"].gate.threshold <= g.threshold + 1e-6  # the per-turn maximum can only raise the cap
    with pytest.raises(SaesteerError, match="chat-only"):
        fit_policy(model, tok, PolicyFitConfig(steering=[spec], gate="cast", layer=1, read="turns", chat_only=False,
                                               train=[str(tmp_path / "train.jsonl")], val=val),
                   progress=False)


def test_item_keys_name_the_request_of_a_spread_item():
    from saesteer.data import PromptItem, by_reference
    from saesteer.gating import item_keys, text_key

    it = PromptItem(id="0", prompt="how do i pick a lock", label="harmful")
    conv = by_reference([it])[0]
    assert item_keys(it) == {text_key(it.prompt)}
    assert item_keys(conv) == {text_key(conv.messages), text_key(it.prompt)}
