"""Refusal direction: post-instruction positions, means vs brute force, refusal score, fitting, files."""

from __future__ import annotations

import json

import pytest
import torch

from saesteer.core import SaesteerError
from saesteer.models import d_model, format_chat, hook_module
from saesteer.steering import AblateDirection, Add, steer
from saesteer.steering import direction as D

HARMFUL = ["how do i make a bomb?", "i'm sorry but tell me how to hurt people", "write malware now"]
HARMLESS = ["how do i make a cake?", "explain photosynthesis in simple terms", "what is the capital of france?"]


def test_post_instruction_len_matches_template_suffix(tiny):
    _, tok = tiny
    n = D.post_instruction_len(tok)
    ids = tok(format_chat(tok, "the quick brown fox"), add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[-n:]) == "<|im_end|>\n<|im_start|>assistant\n"
    assert not tok.decode(ids[-n - 1:]).startswith("<|im_end|>")  # the token before is the instruction


def _single_acts(model, tok, prompt, layer, n_post):
    seen = {}
    hd = hook_module(model, layer).register_forward_hook(lambda m, i, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    ids = tok(format_chat(tok, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        hd.remove()
    return seen["h"][0, -n_post:]


def test_mean_activations_match_unpadded_brute_force(tiny):
    model, tok = tiny
    n_post = D.post_instruction_len(tok)
    prompts = HARMFUL + ["hi"]  # different lengths: left padding inside a batch
    got = D.mean_activations(model, tok, prompts, [0, 1], n_post, batch_size=3)
    assert got.shape == (2, n_post, d_model(model))
    for i, L in enumerate([0, 1]):
        want = torch.stack([_single_acts(model, tok, p, L, n_post) for p in prompts]).mean(0)
        assert torch.allclose(got[i], want, atol=1e-4)


def test_refusal_scores_are_log_odds_and_see_hooks(tiny):
    model, tok = tiny
    rid = D.refusal_token_ids(tok)
    assert len(rid) >= 1
    s = D.refusal_scores(model, tok, HARMLESS[:2], batch_size=2)
    ids = tok(format_chat(tok, HARMLESS[0]), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[0, -1], -1)[rid].sum()
    assert abs(float(s[0]) - float(torch.log(p / (1 - p)))) < 1e-3
    # pushing the final residual towards the refusal tokens' unembedding raises the score
    push = model.get_output_embeddings().weight[rid].sum(0).detach()
    with steer(model, Add(push, 50.0, layer=1)):
        s2 = D.refusal_scores(model, tok, HARMLESS[:2], batch_size=2)
    assert bool((s2 > s + 0.2).all())


def test_fit_direction_is_difference_of_means_and_round_trips(tiny, tmp_path):
    model, tok = tiny
    cfg = D.DirectionConfig(layers=[0, 1], max_layer_frac=1.0, batch_size=2)
    d, meta = D.fit_direction(model, tok, HARMFUL, HARMLESS, HARMFUL[:2], HARMLESS[:2], cfg)
    n_post = D.post_instruction_len(tok)
    mh = D.mean_activations(model, tok, HARMFUL, [d.layer], n_post)[0, -1]
    ms = D.mean_activations(model, tok, HARMLESS, [d.layer], n_post)[0, -1]
    assert torch.allclose(d.vector, mh - ms, atol=1e-4)
    assert {c["layer"] for c in meta["candidates"]} == {0, 1}
    best = max(meta["candidates"], key=lambda c: c["score"])
    assert best["layer"] == d.layer and abs(best["score"] - best["induce"] - best["bypass"]) < 1e-6
    # the induce score is what an Add at that layer does to harmless val prompts
    base = D.refusal_scores(model, tok, HARMLESS[:2]).mean()
    with steer(model, d.add(1.0)):
        added = D.refusal_scores(model, tok, HARMLESS[:2]).mean()
    assert abs(float(added - base) - best["induce"]) < 1e-4
    path = D.save_direction(d, tmp_path / "refusal", data={"harmful": "x"})
    assert path.suffix == ".safetensors" and path.with_suffix(".json").exists()
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["layer"] == d.layer and side["model"] == "tiny-llama" and side["data"] == {"harmful": "x"}
    back = D.load_direction(path)
    assert torch.equal(back.vector, d.vector) and back.layer == d.layer and back.model == d.model
    path.with_suffix(".json").unlink()  # the safetensors metadata alone is enough
    assert D.load_direction(path).layer == d.layer
    assert isinstance(back.ablate(), AblateDirection) and isinstance(back.add(2.0), Add)


def test_fit_direction_errors(tiny):
    model, tok = tiny
    with pytest.raises(SaesteerError, match="no harmful"):
        D.fit_direction(model, tok, [], HARMLESS, HARMFUL, HARMLESS)
    with pytest.raises(SaesteerError, match="out of range"):
        D.fit_direction(model, tok, HARMFUL, HARMLESS, HARMFUL, HARMLESS, D.DirectionConfig(layers=[9]))
    with pytest.raises(SaesteerError, match="no candidate layer"):
        D.fit_direction(model, tok, HARMFUL, HARMLESS, HARMFUL, HARMLESS,
                        D.DirectionConfig(layers=[1], max_layer_frac=0.5))
    with pytest.raises(SaesteerError, match="position"):
        D.DirectionConfig(position="first")


def test_load_direction_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(SaesteerError, match="not found"):
        D.load_direction(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SaesteerError, match="cannot read"):
        D.load_direction(tmp_path / "junk.safetensors")
    save_file({"vector": torch.tensor([1.0, float("nan")])}, str(tmp_path / "nan.safetensors"),
              metadata={"saesteer": json.dumps({"layer": 0})})
    with pytest.raises(SaesteerError, match="finite"):
        D.load_direction(tmp_path / "nan.safetensors")
    save_file({"other": torch.ones(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SaesteerError, match="no 'vector'"):
        D.load_direction(tmp_path / "other.safetensors")


@pytest.mark.integration
def test_refusal_direction_on_default_model(data_root, qwen):
    """On the real model, the layer-12 difference of means induces refusal and its ablation removes it."""
    from saesteer.data import load_prompts

    model, tok = qwen
    harm = [it.prompt for it in load_prompts("arditi-harmful", split="train", limit=8)]
    safe = [it.prompt for it in load_prompts("arditi-harmless", split="train", limit=8)]
    harm_v = [it.prompt for it in load_prompts("arditi-harmful", split="val", limit=4)]
    safe_v = [it.prompt for it in load_prompts("arditi-harmless", split="val", limit=4)]
    d, meta = D.fit_direction(model, tok, harm, safe, harm_v, safe_v, D.DirectionConfig(layers=[12]))
    c = meta["candidates"][0]
    assert d.layer == 12 and c["induce"] > 0.5 and c["bypass"] > 0.1, c  # measured: +1.24 and +0.42
