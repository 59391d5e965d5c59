"""Feature cards: per-token encoding masks, promoted/suppressed tokens, top contexts, self-contained HTML."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch

from saesteer.core import SaesteerError
from saesteer.features import CardConfig, encode_sequences, feature_cards, logit_effects, render_html, write_cards
from saesteer.models import tiny_model
from saesteer.sae import SAEConfig, TopKSAE
from test_features import ANSWER, PROMPT, _seq, pattern_sae, tiny_dirs  # noqa: F401 (fixture)


def test_post_instruction_and_answer_masks(tiny):
    model, tok = tiny
    sae = TopKSAE(SAEConfig(d_in=64, num_latents=16, k=4, model="tiny-llama", layer=1))
    (plain,) = encode_sequences(model, tok, sae, 1, [(PROMPT, ANSWER)])
    (spec,) = encode_sequences(model, tok, sae, 1, [(PROMPT, ANSWER)], include_special=True)

    def text(seq, mask):
        return tok.decode([t for t, m in zip(seq.token_ids, mask.tolist()) if m])

    assert text(spec, spec.post) == "<|im_end|>\n<|im_start|>assistant\n"
    assert text(plain, plain.post) == "\nassistant\n"  # special tokens are not encoded by default
    assert text(plain, plain.answer) == ANSWER
    assert not bool(plain.valid[0]) and not bool((plain.acts[~plain.valid] != 0).any())
    # batching with left padding gives the same latents as one sequence alone
    both = encode_sequences(model, tok, sae, 1, [("hi", None), (PROMPT, ANSWER)])
    assert torch.equal(both[1].idx[both[1].valid], plain.idx[plain.valid])
    assert torch.allclose(both[1].acts, plain.acts, atol=1e-4)


def test_promoted_and_suppressed_tokens_by_hand():
    model, tok = tiny_model("llama", seed=1)
    with torch.no_grad():  # a non-trivial final norm gain, so forgetting it would change the answer
        model.model.norm.weight.copy_(torch.linspace(-2.0, 3.0, 64))
    sae = TopKSAE(SAEConfig(d_in=64, num_latents=16, k=4, model="tiny-llama", layer=1), seed=5)
    f = 7
    logits = model.lm_head.weight.detach() @ (sae.W_dec[f].detach() * model.model.norm.weight.detach())
    eff = logit_effects(model, tok, sae, f, n=5)
    assert [r["id"] for r in eff["promotes"]] == torch.topk(logits, 5).indices.tolist()
    assert [r["id"] for r in eff["suppresses"]] == torch.topk(-logits, 5).indices.tolist()
    assert eff["promotes"][0]["logit"] == pytest.approx(logits.max().item(), rel=1e-5)
    assert eff["suppresses"][0]["token"] == tok.decode([int(torch.argmin(logits))])


def test_cards_contexts_html_and_json(tiny, tmp_path):
    model, tok = tiny
    item = (PROMPT, ANSWER)
    seq_ids = encode_sequences(model, tok, TopKSAE(SAEConfig(d_in=64, num_latents=8, k=4, layer=1)), 1, [item])[0]
    ans_pos = torch.nonzero(seq_ids.answer).flatten().tolist()
    peak = ans_pos[3]
    sae, ids = pattern_sae(model, tok, item, {2: [peak], 4: ans_pos[:2]})
    seqs = encode_sequences(model, tok, sae, 1, [item])
    res = feature_cards(model, tok, sae, [2, 4, 6], seqs, CardConfig(window=3, n_tokens=4))
    c2, c4, c6 = res["cards"]
    assert c2["n_firing"] == 1 and c2["max_act"] == pytest.approx(1.0, abs=1e-3)
    (ctx,) = c2["contexts"]
    assert ctx["text_index"] == 0 and ctx["tokens"][ctx["peak"]][0] == tok.decode([ids[peak]])
    assert len(ctx["tokens"]) == 7 and ctx["tokens"][ctx["peak"]][1] == pytest.approx(1.0, abs=1e-3)
    assert c4["n_firing"] == 2 and c6["contexts"] == [] and c6["n_firing"] == 0
    assert len(c2["promotes"]) == 4 and sum(c2["histogram"]["counts"]) == 1
    page = render_html(res)
    assert "<script" not in page and not re.search(r"(src|href)=['\"]?(http|//)", page)
    assert page.count("data:image/png;base64,") == 3
    # the peak token is highlighted at full strength and its activation is in the tooltip
    assert f'style="background:rgba(220,40,40,1.00)" title="1.000">{html.escape(tok.decode([ids[peak]]))}</span>' in page
    write_cards(res, tmp_path)
    data = json.loads((tmp_path / "cards.json").read_text())
    assert [c["feature"] for c in data["cards"]] == [2, 4, 6]
    assert (tmp_path / "hist_2.png").read_bytes()[:4] == b"\x89PNG"
    assert data["cards"][0]["contexts"] == json.loads(json.dumps(res["cards"][0]["contexts"]))
    with pytest.raises(SaesteerError, match="out of range"):
        feature_cards(model, tok, sae, [8], seqs)
    with pytest.raises(SaesteerError):
        encode_sequences(model, tok, sae, 1, [])


def test_top_contexts_are_ordered_by_each_texts_maximum(tiny):
    model, tok = tiny
    sae = TopKSAE(SAEConfig(d_in=64, num_latents=8, k=2, layer=1))
    P, A = [False] * 4, [False, False, True, True]
    seqs = [_seq([[], [(1, 0.5)], [(1, 2.0)], []], P, A), _seq([[], [], [], [(0, 3.0)]], P, A),
            _seq([[], [(1, 4.0)], [(1, 1.0)], [(1, 3.5)]], P, A)]
    (card,) = feature_cards(model, tok, sae, [1], seqs, CardConfig(n_contexts=5, window=1))["cards"]
    assert [(c["text_index"], c["max_act"], c["peak"]) for c in card["contexts"]] == [(2, 4.0, 1), (0, 2.0, 1)]
    assert card["n_firing"] == 5 and card["freq"] == pytest.approx(5 / 9) and card["mean_when_firing"] == pytest.approx(2.2)


def test_cli_inspect(tiny_dirs, tmp_path, capsys):  # noqa: F811 (tiny_dirs: the fixture imported above)
    from test_features import run_cli

    r = tiny_dirs
    common = ["inspect", "--model", r / "model", "--sae", r / "sae", "--data", r / "harm.jsonl", "--threads", 1]
    assert run_cli(common + ["--features", "1,5", "--out", tmp_path / "cards"]) == 0
    data = json.loads((tmp_path / "cards" / "cards.json").read_text())
    assert [c["feature"] for c in data["cards"]] == [1, 5] and data["n_texts"] == 6
    assert "latent 5" in (tmp_path / "cards" / "cards.html").read_text()
    assert run_cli(common + ["--features", "16", "--out", tmp_path / "x"]) == 2
    assert "out of range" in capsys.readouterr().err
    bad = [a if a != r / "harm.jsonl" else r / "empty.jsonl" for a in common]
    assert run_cli(bad + ["--features", "1", "--out", tmp_path / "x"]) == 2
    assert "saesteer: error:" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_massive_activation_tokens_are_not_encoded(tiny):
    model, tok = tiny
    sae = TopKSAE(SAEConfig(d_in=64, num_latents=16, k=4, layer=1))
    (ref,) = encode_sequences(model, tok, sae, 1, [(PROMPT, ANSWER)])
    j = int(torch.nonzero(ref.answer).flatten()[2])

    def blow_up(_m, _i, out):  # one token gets a 100x residual, like an attention sink
        out = out.clone()
        out[0, j] *= 100
        return out

    handle = model.model.layers[1].register_forward_hook(blow_up)
    try:
        (seq,) = encode_sequences(model, tok, sae, 1, [(PROMPT, ANSWER)])
        (kept,) = encode_sequences(model, tok, sae, 1, [(PROMPT, ANSWER)], max_norm_ratio=None)
    finally:
        handle.remove()
    assert bool(ref.valid[j]) and not bool(seq.valid[j]) and bool(kept.valid[j])
    assert torch.equal(seq.valid, ref.valid & (torch.arange(len(ref.valid)) != j))
    assert seq.acts[j].abs().sum() == 0
