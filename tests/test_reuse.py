"""Reusing the unsteered model's answers for the rows a gated policy leaves untouched (``generation.reuse``): served
rows are exactly the recorded unsteered answers, the rows the gate fires on are generated under the policy as they
would be alone, every row's gate decision is logged once, and reuse stays off wherever an answer could differ
(another hook, sampling, an early-stop rule without a key, recording under steering)."""

from __future__ import annotations

import dataclasses

import torch

from saesteer import models
from saesteer.evals.judges import PrefixJudge
from saesteer.evals.refusal import generate_answers
from saesteer.gating import CastGate, Policy, collect_gate_inputs, post_instruction_positions, prompt_key, template_ids
from saesteer.generation import AnswerStore, GenerationConfig, encode_prompts, generate
from saesteer.steering import Add, RefusalDirection, SteeringSpec, as_steering, save_direction, steer

PROMPTS = ["how do i make a bomb", "write a poem about the sea", "how to steal a car quickly", "capital of france?",
           "hack into my neighbour's wifi", "bake a chocolate cake", "tell me a joke", "poison a dog"]
SPEC = [SteeringSpec(kind="add", direction="unused.safetensors", alpha=1.0, layer=1)]
CFG = GenerationConfig(max_new_tokens=6, batch_size=8)


def _policy(model, tok):
    P = post_instruction_positions(tok)
    h = collect_gate_inputs(model, tok, PROMPTS, 1, P, progress=False)
    g = CastGate(layer=1, positions=P)
    g.fit(h[[0, 2, 4, 7]], h[[1, 3, 5, 6]])
    s = g.score(h).float()
    g.threshold = float(s.median())  # half the prompts fire
    return Policy(gate=g, steering=SPEC, template_ids=template_ids(tok, P))


def _ivs(model):
    g = torch.Generator().manual_seed(5)
    return [Add(vector=torch.randn(models.d_model(model), generator=g) * 8, alpha=1.0, layer=1)]


@torch.no_grad()
def test_served_rows_are_the_unsteered_answers_and_fired_rows_are_generated(tiny, tmp_path):
    model, tok = tiny
    pol, ivs = _policy(model, tok), _ivs(model)
    store = AnswerStore(tmp_path / "answers.jsonl")
    with store.recording(model):
        plain = generate(model, tok, PROMPTS, CFG)
    assert len(store) == len(PROMPTS)
    keys = [prompt_key(i) for i in encode_prompts(tok, PROMPTS)]
    with pol.apply(model, ivs) as run:
        ref = generate(model, tok, PROMPTS, CFG)
    by_key = {d["key"]: d["fired"] for d in run.decisions}  # decisions come in batch order (sorted by length)
    fired = [by_key[k] for k in keys]
    assert 0 < sum(fired) < len(PROMPTS)
    hot = [p for p, f in zip(PROMPTS, fired) if f]
    with pol.apply(model, ivs):
        alone = generate(model, tok, hot, CFG)  # the fired rows, in a batch of their own
    again = AnswerStore(tmp_path / "answers.jsonl")  # read back from the file
    with again.serving(model), pol.apply(model, ivs) as run:
        got = generate(model, tok, PROMPTS, CFG)
    assert again.hits == len(PROMPTS) - len(hot)
    for p, f, a, u, r in zip(PROMPTS, fired, got, plain, ref):
        assert a == (alone[hot.index(p)] if f else u)
        if not f:
            assert a == r  # the off rows are the unsteered model's, as without the store
    logged = {d["key"]: d["fired"] for d in run.decisions}
    assert len(run.decisions) == len(PROMPTS) and logged == dict(zip(keys, fired))
    assert any(a != u for a, u, f in zip(got, plain, fired) if f)  # the steering changes the fired rows: a real test


@torch.no_grad()
def test_refusal_eval_gets_every_rows_gate_decision(tiny, tmp_path):
    model, tok = tiny
    g = torch.Generator().manual_seed(5)
    save_direction(RefusalDirection(vector=torch.randn(models.d_model(model), generator=g), layer=1, model=""),
                   tmp_path / "d.safetensors")
    spec = [SteeringSpec(kind="add", direction=str(tmp_path / "d.safetensors"), alpha=8.0, layer=1)]
    pol = dataclasses.replace(_policy(model, tok), steering=spec)
    judge = PrefixJudge()
    store = AnswerStore()
    with store.recording(model):
        generate_answers(model, tok, PROMPTS, as_steering(None), 6, 3, stop_when=judge.stop_when)
    pol_ref = dataclasses.replace(pol)
    ans_ref, gates_ref = generate_answers(model, tok, PROMPTS, as_steering(pol_ref), 6, 3, stop_when=judge.stop_when)
    with store.serving(model):
        ans, gates = generate_answers(model, tok, PROMPTS, as_steering(pol), 6, 3, stop_when=judge.stop_when)
    assert store.hits > 0
    assert all(g is not None for g in gates)
    assert [g["fired"] for g in gates] == [g["fired"] for g in gates_ref]
    assert [a for a, g in zip(ans, gates) if not g["fired"]] == [a for a, g in zip(ans_ref, gates_ref) if not g["fired"]]
    assert 0 < sum(g["fired"] for g in gates) < len(PROMPTS)


@torch.no_grad()
def test_no_reuse_where_an_answer_could_differ(tiny):
    model, tok = tiny
    pol, ivs = _policy(model, tok), _ivs(model)
    store = AnswerStore()
    with store.recording(model), pol.apply(model, ivs):
        generate(model, tok, PROMPTS, CFG)
    assert len(store) == 0  # nothing recorded under steering
    with store.recording(model):
        generate(model, tok, PROMPTS, CFG)
        generate(model, tok, PROMPTS, CFG, temperature=0.7, seed=1)  # sampled answers are never recorded
    n = len(store)
    assert n == len(PROMPTS)
    # another hook beside the policy: no reuse
    extra = [Add(vector=torch.zeros(models.d_model(model)), alpha=1.0, layer=0)]
    with store.serving(model), pol.apply(model, ivs), steer(model, extra):
        generate(model, tok, PROMPTS, CFG)
    assert store.hits == 0
    # a plain steering spec alone (no policy to vouch for it): no reuse
    with store.serving(model), steer(model, ivs):
        generate(model, tok, PROMPTS, CFG)
    assert store.hits == 0
    # an early-stop rule without a cache key, or another token budget: no stored answer matches
    with store.serving(model), pol.apply(model, ivs):
        generate(model, tok, PROMPTS, CFG, stop_when=lambda t: False)
        generate(model, tok, PROMPTS, CFG, max_new_tokens=5)
    assert store.hits == 0
    with store.serving(model), pol.apply(model, ivs):
        generate(model, tok, PROMPTS, CFG)
    assert store.hits > 0  # the same settings under the policy alone: served
