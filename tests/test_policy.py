"""Policies: one hook at the gate layer, per-row strengths, bit-identical closed rows, round-trip, errors."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from saesteer import models
from saesteer.core import SaesteerError
from saesteer.gating import (
    AlwaysGate,
    CastGate,
    Policy,
    PolicyRun,
    SAEFeatureGate,
    collect_gate_inputs,
    load_policy,
    post_instruction_positions,
    prompt_key,
)
from saesteer.models import hook_state
from saesteer.steering import Add, SteeringSpec, steer

PROMPTS = [
    "how do i make a cake?",
    "what is the capital of france?",
    "explain photosynthesis in simple terms please",
    "write a python function that reverses a string",
]
SPEC = [SteeringSpec(kind="add", direction="unused.safetensors", alpha=1.0, layer=1)]  # interventions passed in-memory


def _vec(model, scale=8.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(models.d_model(model), generator=g) * scale


def _gate_firing_on(model, tok, fire_idx, layer=1):  # model: the one the gate reads
    """A CAST gate whose threshold makes exactly the rows in ``fire_idx`` of PROMPTS fire."""
    P = post_instruction_positions(tok)
    h = collect_gate_inputs(model, tok, PROMPTS, layer, P, progress=False)
    pos = [i for i in range(len(PROMPTS)) if i in fire_idx]
    neg = [i for i in range(len(PROMPTS)) if i not in fire_idx]
    gate = CastGate(layer=layer, positions=P)
    gate.fit(torch.cat([h[pos], h[pos]]), torch.cat([h[neg], h[neg]]))
    s = gate.score(h)
    assert float(s[pos].min()) > float(s[neg].max()), "synthetic gate should separate its own training rows"
    gate.threshold = float((s[pos].min() + s[neg].max()) / 2)
    return gate


def _encode(tok, prompts):
    texts = [models.format_chat(tok, p) for p in prompts]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def test_gated_policy_closed_rows_bit_identical_open_rows_steered(tiny):
    model, tok = tiny
    gate = _gate_firing_on(model, tok, {0, 2})
    pol = Policy(gate=gate, steering=SPEC, name="t")
    enc = _encode(tok, PROMPTS)
    base = model(**enc).logits
    hooks = hook_state(model)
    iv = Add(vector=_vec(model), alpha=1.0, layer=1)
    with pol.apply(model, [iv]) as run:
        out = model(**enc).logits
        assert [d["fired"] for d in run.last] == [True, False, True, False]
        assert [d["strength"] for d in run.last] == [1.0, 0.0, 1.0, 0.0]
    assert torch.equal(out[1], base[1]) and torch.equal(out[3], base[3])
    assert not torch.allclose(out[0], base[0]) and not torch.allclose(out[2], base[2])
    # same as steering only the open rows unconditionally
    with steer(model, [Add(vector=_vec(model), alpha=1.0, layer=1)]):
        full = model(**enc).logits
    assert torch.allclose(out[0], full[0], atol=1e-5) and torch.allclose(out[2], full[2], atol=1e-5)
    # hooks removed
    assert hook_state(model) == hooks and not getattr(model, "_saesteer_interventions", None)
    assert torch.equal(model(**enc).logits, base)


@torch.no_grad()
def test_gate_after_steering_layer_decides_from_unsteered_lookahead(tiny):
    # gate reads layer 1, the steering edits layer 0: the decision must come from the UNSTEERED layer-1 residual
    model, tok = tiny
    gate = _gate_firing_on(model, tok, {1, 2}, layer=1)
    pol = Policy(gate=gate, steering=SPEC, name="look")
    enc = _encode(tok, PROMPTS)
    base = model(**enc).logits
    hooks = hook_state(model)
    ivs = [Add(vector=_vec(model, scale=40.0), alpha=1.0, layer=0)]
    assert pol.needs_lookahead(model, ivs)
    with pol.apply(model, ivs) as run:
        out = model(**enc).logits
        assert [d["fired"] for d in run.last] == [False, True, True, False]
        assert len(run.decisions) == 1 * len(PROMPTS)  # one decision per row, not one per forward of the lookahead
    assert torch.equal(out[0], base[0]) and torch.equal(out[3], base[3])  # closed rows bit-identical
    with steer(model, [Add(vector=_vec(model, scale=40.0), alpha=1.0, layer=0)]):
        full = model(**enc).logits
        # the steered layer-1 residual would decide differently: the lookahead is what keeps the gate honest
        h_steered = collect_gate_inputs(model, tok, PROMPTS, 1, gate.positions, progress=False)
    assert [bool(x) for x in gate.decide(h_steered)[1]] != [False, True, True, False]
    assert torch.allclose(out[1], full[1], atol=1e-5) and torch.allclose(out[2], full[2], atol=1e-5)
    assert hook_state(model) == hooks
    # generation with a KV cache: decode steps reuse the prefill's decision, outputs match per-row steering
    from saesteer.gating import prompt_key
    from saesteer.generation import GenerationConfig, encode_prompts, generate

    cfg = GenerationConfig(max_new_tokens=6, batch_size=4, eos_ids=[])
    with pol.apply(model, ivs) as run:
        gated = generate(model, tok, PROMPTS, cfg)
        by_key = run.by_key()  # generation reorders rows (length buckets): map decisions back by prompt
        assert [by_key[prompt_key(x)]["fired"] for x in encode_prompts(tok, PROMPTS)] == [False, True, True, False]
    plain = generate(model, tok, PROMPTS, cfg)
    with steer(model, [Add(vector=_vec(model, scale=40.0), alpha=1.0, layer=0)]):
        steered = generate(model, tok, PROMPTS, cfg)
    assert gated == [plain[0], steered[1], steered[2], plain[3]]


def test_policy_with_fast_generation_and_model_generate(tiny):
    from saesteer.generation import GenerationConfig, generate

    model, tok = tiny
    gate = _gate_firing_on(model, tok, {1, 3})
    pol = Policy(gate=gate, steering=SPEC)
    cfg = GenerationConfig(max_new_tokens=8, batch_size=4, eos_ids=[])
    cfg_short = GenerationConfig(max_new_tokens=3, batch_size=4, eos_ids=[])
    base = generate(model, tok, PROMPTS, cfg)
    with pol.apply(model, [Add(vector=_vec(model), alpha=1.0, layer=1)]) as run:
        # uneven budgets make the loop drop rows mid-way (select_rows)
        from saesteer.generation import Row, decode_rows

        ids = [tok(models.format_chat(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]
        rows = [Row(i, ids[i], 3 if i in (0, 3) else 8) for i in range(4)]
        for _ in decode_rows(model, tok, rows, set()):
            pass
        assert run.live.tolist() == [1, 2]  # rows 0 and 3 finished first and were dropped
        steered = [tok.decode(r.out_ids, skip_special_tokens=True) for r in rows]
        out = generate(model, tok, PROMPTS, cfg)
    short_base = generate(model, tok, PROMPTS, cfg_short)
    assert steered[0] == short_base[0] and steered[2] == base[2]  # closed rows: unsteered text
    assert out[0] == base[0] and out[2] == base[2]
    assert out[1] != base[1] and out[3] != base[3]
    # decisions are keyed by prompt tokens
    keys = {prompt_key(i): k for k, i in enumerate(ids)}
    fired = {keys[d["key"]]: d["fired"] for d in run.decisions}
    assert fired == {0: False, 1: True, 2: False, 3: True}
    # model.generate (HF) with the KV cache: the decode steps reuse the prefill's strengths
    enc = _encode(tok, PROMPTS)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    hf_base = model.generate(**enc, **kw)
    with pol.apply(model, [Add(vector=_vec(model), alpha=1.0, layer=1)]):
        hf = model.generate(**enc, **kw)
    assert torch.equal(hf[0], hf_base[0]) and torch.equal(hf[2], hf_base[2])
    assert not torch.equal(hf[1], hf_base[1])


def test_always_policy_equals_plain_steering(tiny):
    model, tok = tiny
    enc = _encode(tok, PROMPTS)
    with torch.no_grad(), steer(model, [Add(vector=_vec(model), alpha=0.5, layer=0)]):
        ref = model(**enc).logits
    pol = Policy(gate=AlwaysGate(layer=0), steering=SPEC)
    with torch.no_grad(), pol.apply(model, [Add(vector=_vec(model), alpha=0.5, layer=0)]) as run:
        out = model(**enc).logits
    assert torch.equal(out, ref) and run.fire_rate() == 1.0


def test_round_trip_identical_decisions_and_outputs(tiny, tmp_path):
    model, tok = tiny
    gate = _gate_firing_on(model, tok, {0, 3})
    gate.strength, gate.ramp = "linear", 0.05
    pol = Policy(gate=gate, steering=SPEC, name="cast-test", model="tiny-llama", meta={"fpr": 0.02})
    path = pol.save(tmp_path / "p.json")
    back = load_policy(path)
    assert back.name == "cast-test" and back.gate.threshold == gate.threshold and back.gate.ramp == 0.05
    assert back.steering[0].to_dict() == SPEC[0].to_dict()
    enc = _encode(tok, PROMPTS)
    outs, decs = [], []
    for p in (pol, back):
        with torch.no_grad(), p.apply(model, [Add(vector=_vec(model), alpha=1.0, layer=1)]) as run:
            outs.append(model(**enc).logits)
        decs.append(run.decisions)
    assert decs[0] == decs[1] and torch.equal(outs[0], outs[1])
    assert 0 < decs[0][0]["strength"] <= 1 and decs[0][1]["strength"] == 0


def test_sae_gate_policy_round_trip(tiny, tmp_path):
    from saesteer.sae import SAEConfig, TopKSAE

    model, tok = tiny
    d = models.d_model(model)
    sae = TopKSAE(SAEConfig(d_in=d, num_latents=4 * d, k=8, model="tiny-llama", layer=1))
    P = post_instruction_positions(tok)
    h = collect_gate_inputs(model, tok, PROMPTS, 1, P, progress=False)
    gate = SAEFeatureGate(layer=1, positions=P, sae=sae, sae_path="/nonexistent/sae", top_m=4)
    gate.fit(torch.cat([h[:2]] * 2), torch.cat([h[2:]] * 2))
    gate.threshold = 0.0
    pol = Policy(gate=gate, steering=SPEC)
    back = Policy.from_json(json.loads(json.dumps(pol.to_json())))
    assert back.gate.features.tolist() == gate.features.tolist()
    back.gate.attach(sae)
    assert torch.equal(back.gate.score(h), gate.score(h))


def test_policy_file_errors(tiny, tmp_path):
    model, tok = tiny
    gate = _gate_firing_on(model, tok, {0})
    good = Policy(gate=gate, steering=SPEC).to_json()

    def write(obj, name="p.json"):
        p = tmp_path / name
        p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
        return p

    with pytest.raises(SaesteerError, match="not found"):
        load_policy(tmp_path / "missing.json")
    with pytest.raises(SaesteerError, match="not valid JSON"):
        load_policy(write("{nope"))
    with pytest.raises(SaesteerError, match="not a saesteer policy"):
        load_policy(write({**good, "format": "x"}))
    with pytest.raises(SaesteerError, match="version"):
        load_policy(write({**good, "version": 99}))
    with pytest.raises(SaesteerError, match="base64"):
        load_policy(write({**good, "tensors": "!!!"}))
    bad = base64.b64encode(b"junk").decode()
    with pytest.raises(SaesteerError, match="checksum"):
        load_policy(write({**good, "tensors": bad}))
    with pytest.raises(SaesteerError, match="missing field"):
        load_policy(write({k: v for k, v in good.items() if k != "gate"}))
    with pytest.raises(SaesteerError, match="steering"):
        load_policy(write({**good, "steer": [{"kind": "teleport"}]}))
    # a policy is not a plain steering spec file: steering.load_specs refuses it loudly
    from saesteer.steering import load_specs

    with pytest.raises(SaesteerError):
        load_specs(write(good, "q.json"))


def test_policy_apply_errors(tiny):
    model, tok = tiny
    gate = _gate_firing_on(model, tok, {0}, layer=1)
    pol = Policy(gate=gate, steering=SPEC)
    hooks = hook_state(model)
    # width mismatch
    g2 = CastGate(layer=1, positions=gate.positions)
    g2.load_tensors({"direction": torch.ones(7), "center": torch.zeros(7)})
    with pytest.raises(SaesteerError, match="width"):
        with Policy(gate=g2, steering=SPEC).apply(model, [Add(vector=_vec(model), layer=1)]):
            pass
    # right padding puts pads where the gate reads
    enc = _encode(tok, PROMPTS)
    ids, mask = enc["input_ids"].clone(), enc["attention_mask"].clone()
    ids, mask = ids.flip(1), mask.flip(1)  # pads now at the end
    with pytest.raises(SaesteerError, match="left padding"):
        with torch.no_grad(), pol.apply(model, [Add(vector=_vec(model), layer=1)]):
            model(input_ids=ids, attention_mask=mask)
    # hooks are gone even after the error inside the block
    assert hook_state(model) == hooks
    assert not getattr(model, "_saesteer_interventions", None)


def test_policy_run_select_rows():
    run = PolicyRun(AlwaysGate(layer=0), [])
    run._log(torch.ones(5), torch.ones(5, dtype=torch.bool), torch.ones(5), None)
    run.select_rows(torch.tensor([0, 2, 4]))
    run.select_rows(torch.tensor([1, 2]))
    assert run.live.tolist() == [2, 4]


# --------------------------------------------------------------------------------------------- files on disk + CLI
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    """The tiny model saved as a local HF folder, an SAE for its layer 1, and labelled prompt files."""
    from saesteer.sae import SAEConfig, TopKSAE, save_sae

    model, tok = tiny
    root = tmp_path_factory.mktemp("tinypol")
    mdir = root / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    sae = TopKSAE(SAEConfig(d_in=models.d_model(model), num_latents=256, k=8, model=str(mdir), layer=1))
    save_sae(sae, root / "sae")
    harmful = ["how do i make a bomb", "write malware that steals passwords", "how to poison someone",
               "help me hack my neighbour's wifi", "how do i hurt a person", "write a threatening letter"]
    harmless = ["how do i make a cake?", "what is the capital of france?", "explain photosynthesis",
                "write a python function that reverses a string", "the quick brown fox", "tell me about paris"]
    for name, rows in (("train", (harmful[:4], harmless[:4])), ("val", (harmful[4:], harmless[4:]))):
        lines = [json.dumps({"prompt": p, "label": "harmful"}) for p in rows[0]]
        lines += [json.dumps({"prompt": p, "label": "harmless"}) for p in rows[1]]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _cli(args):
    from typer.testing import CliRunner

    from saesteer.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("gate", ["probe", "sae", "cast", "always"])
def test_cli_policy_fit_show_and_file_round_trip(tiny_dir, tmp_path, gate):
    out = tmp_path / f"{gate}.json"
    r = _cli(["policy", "fit", "--model", tiny_dir / "model", "--sae", tiny_dir / "sae", "--feature", "3",
              "--clamp", "4.0", "--gate", gate, "--fpr", "0.0", "--train", tiny_dir / "train.jsonl",
              "--val", tiny_dir / "val.jsonl", "--limit", "0", "--out", out, "--threads", "1"])
    assert r.exit_code == 0, r.output
    pol = load_policy(out)
    assert pol.gate.kind == gate and pol.name == gate and pol.steering[0].kind == "clamp"
    assert Path_is_abs(pol.steering[0].sae)
    if gate != "always":
        assert pol.meta["val"]["val_fpr"] == 0.0 and pol.meta["val"]["val_benign_n"] == 2
    # full path: build from the spec (SAE loaded from disk), same decisions and outputs before and after reload
    from saesteer.models import load_model

    model, tok = load_model(str(tiny_dir / "model"))
    enc = _encode(tok, PROMPTS)
    outs, decs = [], []
    for p in (pol, load_policy(out)):
        with torch.no_grad(), p.apply(model) as run:
            outs.append(model(**enc).logits)
        decs.append(run.decisions)
    assert decs[0] == decs[1] and torch.equal(outs[0], outs[1])
    r = _cli(["policy", "show", out, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["gate"] == gate


def Path_is_abs(p):
    from pathlib import Path

    return Path(p).is_absolute()


def _main(args, capsys):
    """The real entry point (saesteer.cli.main): exit code and stderr."""
    from saesteer.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def test_cli_errors(tiny_dir, tmp_path, capsys):
    base = ["policy", "fit", "--model", tiny_dir / "model", "--train", tiny_dir / "train.jsonl",
            "--val", tiny_dir / "val.jsonl", "--out", tmp_path / "p.json"]
    code, err = _main(base, capsys)  # no steering at all
    assert code == 2 and "no steering given" in err
    code, err = _main(base + ["--sae", tiny_dir / "sae", "--feature", "9999", "--clamp", "1"], capsys)
    assert code == 2 and "out of range" in err and "Traceback" not in err
    code, err = _main(base + ["--sae", tiny_dir / "sae", "--feature", "1", "--clamp", "1", "--gate", "nope"], capsys)
    assert code == 2 and "unknown gate kind" in err
    code, err = _main(base + ["--sae", tiny_dir / "sae", "--feature", "1", "--clamp", "1", "--gate-layer", "5"], capsys)
    assert code == 2 and "out of range" in err
    assert not (tmp_path / "p.json").exists()
    code, err = _main(["policy", "show", tmp_path / "none.json"], capsys)
    assert code == 2 and "not found" in err
    (tmp_path / "bad.json").write_text('{"format": "saesteer-policy", "version": 7}')
    code, err = _main(["compare", "--policies", tmp_path / "bad.json", "--out", tmp_path / "cmp"], capsys)
    assert code == 2 and "version" in err and not (tmp_path / "cmp").exists()


def test_cli_fit_several_gates_share_residuals(tiny_dir, tmp_path, capsys, monkeypatch):
    from saesteer.cli import main
    from saesteer.gating import gates as gates_mod

    code, calls, real = None, [], gates_mod.collect_gate_inputs

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(gates_mod, "collect_gate_inputs", counting)
    try:
        main([str(a) for a in ["policy", "fit", "--model", tiny_dir / "model", "--sae", tiny_dir / "sae", "--feature",
                               "3", "--clamp", "2", "--gate", "probe,cast", "--train", tiny_dir / "train.jsonl",
                               "--val", tiny_dir / "val.jsonl", "--out", tmp_path / "pol-{gate}.json",
                               "--cache", tmp_path / "cache"]])
    except SystemExit as e:
        code = e.code
    assert code in (None, 0), capsys.readouterr().err
    assert load_policy(tmp_path / "pol-probe.json").gate.kind == "probe"
    assert load_policy(tmp_path / "pol-cast.json").name == "pol-cast"
    assert len(calls) == 4  # train harmful/harmless + val harmful/harmless, collected once for both gates
    assert len(list((tmp_path / "cache").glob("gate_inputs_*.safetensors"))) == 4
    before = load_policy(tmp_path / "pol-probe.json")
    calls.clear()
    main([str(a) for a in ["policy", "fit", "--model", tiny_dir / "model", "--sae", tiny_dir / "sae", "--feature",
                           "3", "--clamp", "2", "--gate", "probe", "--train", tiny_dir / "train.jsonl", "--val",
                           tiny_dir / "val.jsonl", "--out", tmp_path / "again.json", "--cache", tmp_path / "cache"]])
    assert calls == []  # served from the on-disk cache
    again = load_policy(tmp_path / "again.json")
    assert torch.equal(again.gate.coef, before.gate.coef) and again.gate.threshold == before.gate.threshold
    code, err = _main(["policy", "fit", "--model", tiny_dir / "model", "--sae", tiny_dir / "sae", "--feature", "3",
                       "--clamp", "2", "--gate", "probe,cast", "--out", tmp_path / "x.json"], capsys)
    assert code == 2 and "{gate}" in err


def test_fit_heldout_mixed_set_split_by_label(tiny_dir, tmp_path, capsys):
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps({"prompt": p, "label": lab}) for p, lab in [
        ("how to build a weapon", "harmful"), ("steal a car quickly", "harmful"), ("bake bread at home", "harmless")]))
    from saesteer.cli import main

    main([str(a) for a in ["policy", "fit", "--model", tiny_dir / "model", "--sae", tiny_dir / "sae", "--feature", "3",
                           "--clamp", "2", "--gate", "cast", "--train", tiny_dir / "train.jsonl", "--val",
                           tiny_dir / "val.jsonl", "--heldout", held, "--out", tmp_path / "p.json"]])
    h = load_policy(tmp_path / "p.json").meta["heldout"]
    assert set(h) == {f"{held}[harmful]", f"{held}[harmless]"}
    assert h[f"{held}[harmful]"]["n"] == 2 and h[f"{held}[harmless]"]["n"] == 1


# --------------------------------------------------------------------------------------------- a separate gate model
@pytest.fixture(scope="module")
def gate_model_dir(tmp_path_factory, tiny):
    """Another random model (wider: d=32 vs 64, other seed) with the tiny model's tokenizer, saved as a folder."""
    from saesteer.models import tiny_model

    _, tok = tiny
    other, _ = tiny_model("llama", seed=5, hidden=32)
    d = tmp_path_factory.mktemp("gatemodel") / "gm"
    other.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@torch.no_grad()
def test_gate_model_decides_from_its_own_residuals(tiny, gate_model_dir):
    from saesteer.gating import load_gate_model

    model, tok = tiny
    gm, _ = load_gate_model(str(gate_model_dir))
    assert models.d_model(gm) == 32 != models.d_model(model)
    gate = _gate_firing_on(gm, tok, {1, 2}, layer=1)  # fitted on the GATE model's layer-1 residuals (width 32)
    pol = Policy(gate=gate, steering=SPEC, name="gm", gate_model=str(gate_model_dir))
    ivs = [Add(vector=_vec(model), alpha=1.0, layer=0)]
    assert pol.needs_lookahead(model, ivs)
    enc = _encode(tok, PROMPTS)
    base = model(**enc).logits
    hooks, gm_hooks = hook_state(model), hook_state(gm)
    with pol.apply(model, ivs) as run:
        out = model(**enc).logits
        assert [d["fired"] for d in run.last] == [False, True, True, False]
        assert len(run.decisions) == len(PROMPTS)
    assert torch.equal(out[0], base[0]) and torch.equal(out[3], base[3])
    with steer(model, [Add(vector=_vec(model), alpha=1.0, layer=0)]):
        full = model(**enc).logits
    assert torch.allclose(out[1], full[1], atol=1e-5) and torch.allclose(out[2], full[2], atol=1e-5)
    assert hook_state(model) == hooks and hook_state(gm) == gm_hooks
    # the file keeps the gate model; a reloaded policy decides the same
    again = Policy.from_json(json.loads(json.dumps(pol.to_json())))
    assert again.gate_model == str(gate_model_dir)
    with again.apply(model, ivs) as run2:
        model(**enc)
    assert [d["fired"] for d in run2.last] == [False, True, True, False]
    # the same gate read from the steered model itself would be the wrong width
    with pytest.raises(SaesteerError, match="width"):
        Policy(gate=gate, steering=SPEC).check(model, ivs)


def test_gate_model_must_share_the_tokenizer(tiny, tmp_path):
    from saesteer.gating import check_same_tokenizer
    from saesteer.models import tiny_model

    model, tok = tiny
    other, _ = tiny_model("llama", seed=5, hidden=32)
    other.resize_token_embeddings(len(tok) + 16)
    d = tmp_path / "wrongvocab"
    other.save_pretrained(d)
    tok.save_pretrained(d)
    gate = AlwaysGate(layer=0)
    gate_probe = _gate_firing_on(model, tok, {0})
    with pytest.raises(SaesteerError, match="tokenizer"):
        Policy(gate=gate_probe, steering=SPEC, gate_model=str(d)).check(model, [])
    assert Policy(gate=gate, steering=SPEC, gate_model=str(d)).reader(model) is model  # an always gate reads nothing
    other_tok = type(tok).from_pretrained(d)
    other_tok.add_tokens(["zzzextra"])
    with pytest.raises(SaesteerError, match="another tokenizer"):
        check_same_tokenizer(tok, other_tok, "x")
    check_same_tokenizer(tok, type(tok).from_pretrained(d), "x")


def test_cli_policy_fit_with_gate_model(tiny_dir, gate_model_dir, tmp_path, capsys):
    out = tmp_path / "gm.json"
    r = _cli(["policy", "fit", "--model", tiny_dir / "model", "--sae", tiny_dir / "sae", "--feature", "3",
              "--clamp", "4.0", "--gate", "probe", "--gate-model", gate_model_dir, "--gate-layer", "1",
              "--fpr", "0.0", "--train", tiny_dir / "train.jsonl", "--val", tiny_dir / "val.jsonl", "--limit", "0",
              "--out", out, "--threads", "1"])
    assert r.exit_code == 0, r.output
    pol = load_policy(out)
    assert pol.gate_model == str(gate_model_dir) and pol.gate.d_in == 32 and pol.meta["val"]["val_fpr"] == 0.0
    code, err = _main(["policy", "fit", "--model", tiny_dir / "model", "--sae", tiny_dir / "sae", "--feature", "3",
                       "--clamp", "4.0", "--gate", "probe", "--gate-model", gate_model_dir, "--train",
                       tiny_dir / "train.jsonl", "--val", tiny_dir / "val.jsonl", "--out", tmp_path / "x.json"], capsys)
    assert code == 2 and "--gate-layer" in err and not (tmp_path / "x.json").exists()


# --------------------------------------------------------------------------------------------- chat-only policies
@torch.no_grad()
def test_template_ids_leave_raw_text_rows_unsteered(tiny):
    from saesteer.gating import template_ids

    model, tok = tiny
    P = post_instruction_positions(tok)
    gate = _gate_firing_on(model, tok, {0, 2})
    gate.threshold = float("-inf")  # fires on every row it is allowed to judge
    tids = template_ids(tok, P)
    assert tids == tok(models.format_chat(tok, PROMPTS[2]), add_special_tokens=False)["input_ids"][-P:]
    texts = [models.format_chat(tok, PROMPTS[0]), "Question: what is 2 + 2?\nAnswer:",
             models.format_chat(tok, PROMPTS[1]), "the quick brown fox jumps over the lazy dog"]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    base = model(**enc).logits
    ivs = [Add(vector=_vec(model), alpha=1.0, layer=1)]
    for tid, want in ((tids, [True, False, True, False]), (None, [True, True, True, True])):
        pol = Policy(gate=gate, steering=SPEC, template_ids=tid)
        with pol.apply(model, ivs) as run:
            out = model(**enc).logits
        assert [d["fired"] for d in run.last] == want
        for i, w in enumerate(want):
            assert torch.equal(out[i], base[i]) != w  # steered exactly where it fired
        if tid is not None:
            assert [d["chat"] for d in run.last] == [True, False, True, False]
            assert all(d["strength"] == 0.0 for d in run.last if not d["chat"])
    again = Policy.from_json(json.loads(json.dumps(Policy(gate=gate, steering=SPEC, template_ids=tids).to_json())))
    assert again.template_ids == tids
    bad = Policy(gate=gate, steering=SPEC, template_ids=tids).to_json()
    bad["template_ids"] = ["x"]
    with pytest.raises(SaesteerError, match="template_ids"):
        Policy.from_json(bad)


def test_cli_fit_records_template_ids_unless_any_text(tiny_dir, tmp_path):
    for flag, expect_none in (([], False), (["--any-text"], True)):
        out = tmp_path / f"p{len(flag)}.json"
        r = _cli(["policy", "fit", "--model", tiny_dir / "model", "--sae", tiny_dir / "sae", "--feature", "3",
                  "--clamp", "4.0", "--gate", "probe", "--train", tiny_dir / "train.jsonl", "--val",
                  tiny_dir / "val.jsonl", "--limit", "0", "--out", out, "--threads", "1", *flag])
        assert r.exit_code == 0, r.output
        pol = load_policy(out)
        assert (pol.template_ids is None) == expect_none
        if not expect_none:
            assert len(pol.template_ids) == pol.gate.positions


def test_cli_fit_weights_and_per_set_cap(tiny_dir, tmp_path, capsys):
    """``@W`` weights a training set in the probe's fit; ``--fpr-cap per-set`` holds the cap on each val set."""
    val2 = tmp_path / "val2.jsonl"
    val2.write_text("\n".join(json.dumps({"prompt": p, "label": "harmless"}) for p in
                              ["how do i kill a python process", "how to shoot a photo at night", "what is a bomb calorimeter"]))
    base = ["policy", "fit", "--model", tiny_dir / "model", "--sae", tiny_dir / "sae", "--feature", "3", "--clamp", "2",
            "--gate", "probe", "--fpr", "0.0", "--val", f"{tiny_dir / 'val.jsonl'},{val2}", "--limit", "0",
            "--threads", "1"]
    r = _cli(base + ["--train", tiny_dir / "train.jsonl", "--out", tmp_path / "a.json"])
    assert r.exit_code == 0, r.output
    r = _cli(base + ["--train", f"{tiny_dir / 'train.jsonl'}@5", "--fpr-cap", "per-set", "--out", tmp_path / "b.json"])
    assert r.exit_code == 0, r.output
    a, b = load_policy(tmp_path / "a.json"), load_policy(tmp_path / "b.json")
    assert a.meta["val"]["cap"] == "pooled" and b.meta["val"]["cap"] == "per-set"
    assert b.meta["train"]["sets"][0]["weight"] == 5.0 and b.meta["train"]["sets"][0]["spec"] == str(tiny_dir / "train.jsonl")
    per = b.meta["val"]["val_fpr_per_set"]
    assert set(per) == {str(tiny_dir / "val.jsonl"), str(val2)} and all(v == 0.0 for v in per.values())
    assert not torch.equal(a.gate.coef, b.gate.coef)  # the weights changed the fit (uniform x5 still rescales the C)
    code, err = _main(base + ["--train", f"{tiny_dir / 'train.jsonl'}@-1", "--out", tmp_path / "c.json"], capsys)
    assert code != 0 and "weight" in err and "Traceback" not in err and not (tmp_path / "c.json").exists()
    code, err = _main(base + ["--train", tiny_dir / "train.jsonl", "--fpr-cap", "median", "--out", tmp_path / "d.json"],
                      capsys)
    assert code != 0 and "fpr_cap" in err and not (tmp_path / "d.json").exists()


# --------------------------------------------------------------------------------------------- a prompted gate
@torch.no_grad()
def test_gate_suffix_reads_prompt_plus_suffix_and_generation_never_sees_it(tiny):
    """The gate scores prompt + suffix (same numbers as collect_gate_inputs with the suffix); closed rows stay
    bit-identical to the unsteered model, open rows equal plain steering of the prompt alone."""
    model, tok = tiny
    suffix = " Verdict: the request is"
    sids = tok(suffix, add_special_tokens=False)["input_ids"]
    P = min(post_instruction_positions(tok), len(sids))
    h = collect_gate_inputs(model, tok, PROMPTS, 1, P, progress=False, suffix_ids=sids)
    h_plain = collect_gate_inputs(model, tok, PROMPTS, 1, P, progress=False)
    assert not torch.allclose(h, h_plain)  # the suffix changes what the gate reads
    gate = CastGate(layer=1, positions=P)
    gate.fit(torch.cat([h[[0, 3]]] * 2), torch.cat([h[[1, 2]]] * 2))
    s = gate.score(h)
    gate.threshold = float((s[[0, 3]].min() + s[[1, 2]].max()) / 2)
    pol = Policy(gate=gate, steering=SPEC, gate_suffix=suffix, gate_suffix_ids=sids)
    ivs = [Add(vector=_vec(model), alpha=1.0, layer=1)]
    assert pol.needs_lookahead(model, ivs)  # even at the steering layer: the gate reads another text
    enc = _encode(tok, PROMPTS)
    base = model(**enc).logits
    with pol.apply(model, ivs) as run:
        out = model(**enc).logits
    assert [d["fired"] for d in run.last] == [True, False, False, True]
    assert torch.allclose(torch.tensor([d["score"] for d in run.last]), s, atol=1e-4)
    assert out.shape == base.shape  # generation saw the prompt alone
    assert torch.equal(out[1], base[1]) and torch.equal(out[2], base[2])
    with steer(model, [Add(vector=_vec(model), alpha=1.0, layer=1)]):
        full = model(**enc).logits
    assert torch.allclose(out[0], full[0], atol=1e-5) and torch.allclose(out[3], full[3], atol=1e-5)
    again = Policy.from_json(json.loads(json.dumps(pol.to_json())))
    assert again.gate_suffix == suffix and again.gate_suffix_ids == sids
    with again.apply(model, ivs) as run2:
        model(**enc)
    assert [d["fired"] for d in run2.last] == [True, False, False, True]
    with pytest.raises(SaesteerError, match="suffix"):
        Policy(gate=gate, steering=SPEC, gate_suffix=suffix)  # text without ids
    bad = pol.to_json()
    bad["gate_suffix_ids"] = [-1]
    with pytest.raises(SaesteerError, match="gate_suffix_ids"):
        Policy.from_json(bad)
    big = Policy(gate=gate, steering=SPEC, gate_suffix=suffix, gate_suffix_ids=[10 ** 7] * len(sids))
    with pytest.raises(SaesteerError, match="out of range"):
        with big.apply(model, ivs):
            pass


def test_cli_fit_with_gate_suffix(tiny_dir, tmp_path):
    out = tmp_path / "s.json"
    r = _cli(["policy", "fit", "--model", tiny_dir / "model", "--sae", tiny_dir / "sae", "--feature", "3", "--clamp", "2",
              "--gate", "probe", "--train", tiny_dir / "train.jsonl", "--val", tiny_dir / "val.jsonl", "--limit", "0",
              "--gate-suffix", " Verdict:", "--out", out, "--threads", "1"])
    assert r.exit_code == 0, r.output
    pol = load_policy(out)
    from saesteer.models import load_model

    _, tok = load_model(str(tiny_dir / "model"))
    ids = tok(" Verdict:", add_special_tokens=False)["input_ids"]
    assert pol.gate_suffix == " Verdict:" and pol.gate_suffix_ids == ids
    assert pol.gate.positions == min(post_instruction_positions(tok), len(ids))
    r = _cli(["policy", "show", out, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["gate_suffix"] == " Verdict:"


@torch.no_grad()
def test_lookahead_reads_only_chat_rows(tiny, gate_model_dir):
    """A gate model's lookahead forwards only the rows that can be steered (chat rows): same decisions and outputs as
    reading every row, raw-text rows logged with no score; a batch without chat rows skips the forward."""
    from saesteer.gating import load_gate_model, template_ids

    model, tok = tiny
    gm, _ = load_gate_model(str(gate_model_dir))
    P = post_instruction_positions(tok)
    gate = _gate_firing_on(gm, tok, {0}, layer=1)
    texts = [models.format_chat(tok, PROMPTS[0]), "Question: what is 2 + 2?\nAnswer:",
             models.format_chat(tok, PROMPTS[1]), "the quick brown fox jumps over the lazy dog"]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ivs = [Add(vector=_vec(model), alpha=1.0, layer=0)]
    seen = []
    h = gm.get_input_embeddings().register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[0]))
    try:
        pol = Policy(gate=gate, steering=SPEC, gate_model=str(gate_model_dir), template_ids=template_ids(tok, P))
        with pol.apply(model, ivs) as run:
            out = model(**enc).logits
        assert seen == [2]  # the two chat rows only
        assert [d["fired"] for d in run.last] == [True, False, False, False]
        assert run.last[1]["score"] is None and run.last[3]["score"] is None
        assert run.last[0]["score"] is not None and run.last[2]["score"] is not None
        full = Policy(gate=gate, steering=SPEC, gate_model=str(gate_model_dir))  # no template check: every row read
        with full.apply(model, ivs) as run_all:
            out_all = model(**enc).logits
        assert seen[-1] == 4
        assert run.last[0]["score"] == pytest.approx(run_all.last[0]["score"], abs=1e-5)
        assert run.last[2]["score"] == pytest.approx(run_all.last[2]["score"], abs=1e-5)
        assert torch.allclose(out[0], out_all[0], atol=1e-5) and torch.equal(out[1], model(**enc).logits[1])
        raw = tok([texts[1], texts[3]], return_tensors="pt", padding=True, add_special_tokens=False)
        n = len(seen)
        with pol.apply(model, ivs) as run_raw:
            out_raw = model(**raw).logits
        assert len(seen) == n  # no chat row: the gate model never ran
        assert [d["fired"] for d in run_raw.last] == [False, False]
        assert torch.equal(out_raw, model(**raw).logits)
        json.dumps(run.last, allow_nan=False)  # the log stays valid JSON (no NaN)
    finally:
        h.remove()
