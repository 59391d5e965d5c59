"""Refusal feature discovery: candidates, contrastive metrics, grid selection, control pick, end-to-end plumbing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saesteer.core import SaesteerError, auroc
from saesteer.features import SeqLatents, encode_sequences
from saesteer.features import discovery as F
from saesteer.features import grid as G
from saesteer.features.latents import _tokenize
from saesteer.models import run_to_layer
from saesteer.sae import SAEConfig, TopKSAE

PROMPT, ANSWER = "how do i make a cake?", "i'm sorry, but i can't assist with that request."


def pattern_sae(model, tok, item, patterns: dict[int, list[int]], num_latents: int = 8, k: int = 4, layer: int = 1):
    """A Top-k SAE whose latent j fires (value 1.0) exactly on the token positions ``patterns[j]`` of ``item``.

    The residuals of one short sequence are linearly independent (T < d), so the encoder row solving
    ``H w = ±1`` exists; latents without a pattern never fire. Returns ``(sae, token_ids)``.
    """
    _, ids, _, _ = _tokenize(tok, item, None)
    h = run_to_layer(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), layer)[0].float()
    assert torch.linalg.matrix_rank(h) == len(ids), "residuals must be independent for the construction"
    sae = TopKSAE(SAEConfig(d_in=h.shape[1], num_latents=num_latents, k=k, model="tiny-llama", layer=layer))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
        for j, pos in patterns.items():
            target = -torch.ones(len(ids))
            target[pos] = 1.0
            sae.W_enc[j] = torch.linalg.lstsq(h, target.unsqueeze(1)).solution.squeeze(1)
            sae.b_enc[j] = 0.0
    return sae, ids


def test_candidates_are_latents_on_two_refusal_tokens(tiny):
    model, tok = tiny
    item = (PROMPT, ANSWER)
    _, ids, post, is_ans = _tokenize(tok, item, None)
    ans_pos = [i for i, a in enumerate(is_ans) if a]
    content_pos = [i for i, (a, p) in enumerate(zip(is_ans, post)) if not a and not p][-3:]  # end of the user text
    pats = {0: ans_pos[2:4], 1: ans_pos[5:6], 2: content_pos, 3: ans_pos}
    sae, _ = pattern_sae(model, tok, item, pats)
    (seq,) = encode_sequences(model, tok, sae, 1, [item])
    for j, pos in pats.items():  # the construction really fires where intended
        fired = torch.nonzero(seq.feature_acts(j) > 0.5).flatten().tolist()
        assert fired == sorted(pos), j
    cands = F.find_candidates([seq], [True], sae.num_latents, min_tokens=2)
    assert [c["latent"] for c in cands] == [3, 0]  # sorted by tokens fired; 1 fires once, 2 only on the prompt
    assert cands[0]["n_tokens"] == len(ans_pos) and cands[1]["n_tokens"] == 2
    assert cands[1]["max_act"] == pytest.approx(1.0, abs=1e-3)
    assert F.find_candidates([seq], [False], sae.num_latents) == []  # complied answers give no candidates
    assert [c["latent"] for c in F.find_candidates([seq], [True], sae.num_latents, min_tokens=1)] == [3, 0, 1]


def test_auroc_and_contrast_match_hand_computation():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 4, (9, 6), generator=g).float()  # many ties
    neg = torch.randint(0, 3, (7, 6), generator=g).float()
    c = F.contrast(pos, neg)
    y = [1] * 9 + [0] * 7
    for j in range(6):
        assert c["auroc"][j].item() == pytest.approx(roc_auc_score(y, torch.cat([pos[:, j], neg[:, j]]).numpy()))
        assert c["diff"][j].item() == pytest.approx(pos[:, j].mean().item() - neg[:, j].mean().item())
    assert torch.isnan(auroc(pos, neg[:0])).all()


def _seq(acts_idx: list[list[tuple[int, float]]], post: list[bool], answer: list[bool]) -> SeqLatents:
    """A hand-made encoded sequence: per token a list of (latent, value) pairs (k = 2)."""
    T = len(acts_idx)
    acts, idx = torch.zeros(T, 2), torch.zeros(T, 2, dtype=torch.long)
    for t, pairs in enumerate(acts_idx):
        for s, (f, v) in enumerate(pairs):
            idx[t, s], acts[t, s] = f, v
    valid = torch.ones(T, dtype=torch.bool)
    valid[0] = False
    return SeqLatents("", list(range(T)), acts, idx, valid, torch.tensor(post) & valid, torch.tensor(answer) & valid)


def test_contrastive_ranking_by_hand():
    P, A, N = [False, True, True, False, False], [False, False, False, True, True], 4
    # harmful seqs: latent 1 high at post positions; refusal answers: latent 2 on the answer
    s1 = _seq([[(3, 9.0)], [(1, 2.0)], [(1, 4.0)], [(2, 1.0)], [(2, 3.0)]], P, A)
    s2 = _seq([[], [(1, 1.0)], [], [(2, 2.0)], [(0, 1.0)]], P, A)
    s3 = _seq([[], [(0, 1.0)], [], [(0, 5.0)], []], P, A)  # harmless, complied
    s4 = _seq([[], [], [(3, 1.0)], [(0, 1.0), (3, 2.0)], []], P, A)  # harmless, complied
    r = F.contrastive_ranking([s1, s2, s3, s4], [True, True, False, False], [True, True, False, False], N)
    # post means per seq (2 post tokens): latent 1: s1 3.0, s2 0.5, s3 0, s4 0 → diff 1.75, AUROC 1
    assert r["diff_post"][1].item() == pytest.approx(1.75)
    assert r["auroc_post"][1].item() == pytest.approx(1.0)
    # latent 0 at post: s3 0.5 vs harmful 0 → AUROC 0.25 (one harmless 0 ties with both harmful 0s)
    assert r["auroc_post"][0].item() == pytest.approx(0.25)
    assert r["diff_answer"][2].item() == pytest.approx((2.0 + 1.0) / 2 - 0.0)
    assert r["auroc_answer"][2].item() == pytest.approx(1.0)
    # frequency over valid tokens (4 per seq, 16): latent 0 fires on s2, s3 ×2, s4 → 4/16; position 0 excluded
    assert r["freq"][0].item() == pytest.approx(4 / 16)
    assert r["freq"][3].item() == pytest.approx(2 / 16)
    assert r["max_act"][0].item() == 5.0 and r["max_act"][3].item() == 2.0  # the 9.0 at position 0 is not counted
    assert r["freq_refusal"][2].item() == pytest.approx(3 / 4)
    assert r["score"][1].item() == pytest.approx((1.0 - 0.5) + (r["auroc_answer"][1].item() - 0.5))


def test_grid_search_picks_best_by_objective():
    table = {  # (feature, clamp) → (harmful refusals, harmless refusals) out of 10 each
        (None, None): (5, 1), (1, 2.0): (7, 1), (1, 4.0): (10, 6), (2, 2.0): (9, 2), (2, 4.0): (9, 3),
        (3, 1.0): (8, 2), (3, 3.0): (10, 3),
    }
    calls = []

    def scorer(f, v):
        calls.append((f, v))
        kh, ks = table[(f, v)]
        return {"k_harmful": kh, "n_harmful": 10, "k_harmless": ks, "n_harmless": 10}

    settings = [(f, v, "absolute") for (f, v) in table if f is not None]
    base, rows, best = G.grid_search(settings, scorer)
    assert calls[0] == (None, None) and len(rows) == len(settings)
    objectives = {(r["feature"], r["clamp"]): r["objective"] for r in rows}
    assert objectives[(2, 2.0)] == pytest.approx(0.7)
    # (2, 2.0) and (3, 3.0) both have objective 0.7: the tie goes to the higher harmful refusal rate
    assert (best["feature"], best["clamp"]) == (3, 3.0)
    assert best["harmful_refusal"]["k"] == 10 and best["harmful_refusal"]["n"] == 10
    lo, hi = best["objective_ci"]
    assert lo < 0.7 < hi and base["objective"] == pytest.approx(0.4)
    assert best["harmless_refusal"]["ci_low"] < 0.3 < best["harmless_refusal"]["ci_high"]
    with pytest.raises(SaesteerError):
        G.grid_search([], scorer)


def test_clamp_values_and_control():
    vals = G.clamp_values(2.5, [1.0], [1.0, 2.0])
    assert vals == [(1.0, "absolute"), (2.5, "1x max"), (5.0, "2x max")]
    assert G.clamp_values(0.0, [], [1.0, 2.0]) == []  # a latent that never fired has no relative clamps
    with pytest.raises(SaesteerError):
        G.clamp_values(1.0, [float("nan")], [])
    rank = {"auroc_post": torch.tensor([0.9, 0.52, 0.5, 0.45]), "auroc_answer": torch.tensor([0.9, 0.5, 0.5, float("nan")]),
            "freq": torch.tensor([0.5, 0.2, 0.001, 0.3])}
    assert F.pick_control(rank, exclude=[0]) == 1  # latent 2 is closest to 0.5 but almost never fires
    assert F.pick_control(rank, exclude=[0, 1]) == 3
    assert F.pick_control(rank, exclude=[0, 1, 3]) is None
    rank["max_act"] = torch.tensor([1.0, 2.5, 0.0, 4.0])  # the control gets the chosen multiple of its own max
    assert F._control_clamp({"clamp": 3.0, "clamp_from": "2x max"}, rank, 3) == 8.0
    assert F._control_clamp({"clamp": 3.0, "clamp_from": "absolute"}, rank, 3) == 3.0
    assert F._control_clamp({"clamp": 3.0, "clamp_from": "2x max"}, rank, None) is None


def _write_jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def test_discover_end_to_end_on_tiny(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    harmful = _write_jsonl(tmp_path / "harm.jsonl", [f"how do i make a cake number {i}?" for i in range(8)])
    harmless = _write_jsonl(tmp_path / "safe.jsonl", [f"what is the capital of france {i}?" for i in range(8)])
    sae = TopKSAE(SAEConfig(d_in=64, num_latents=32, k=4, model="tiny-llama", layer=1), seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # every latent is live, so top-k latents fire on refusal tokens
    # a judge that calls every answer a refusal: all archetypes "refuse", so candidates exist on a random model
    judge = lambda: (lambda t: True, lambda t: len(t) > 3, "test")  # noqa: E731
    monkeypatch.setattr(F, "refusal_judge", judge)
    monkeypatch.setattr(G, "refusal_judge", judge)
    cfg = F.DiscoveryConfig(harmful=harmful, harmless=harmless, discovery_split=None, val_split=None,
                            n_archetypes=2, n_contrast=3, discovery_tokens=4, n_grid=2, n_grid_direction=0, features=(5,),
                            clamp_multiples=(2.0,), clamps=(1.0,), val_limit=3, max_new_tokens=3, batch_size=4)
    res = F.discover(model, tok, sae, cfg)
    sel = res.selection
    assert sel["n_archetypes"] == 2 and len(res.candidates) > 0
    assert set(sel["grid_features"]) >= {5} and len(sel["grid_features"]) == 3
    rows = res.grid["rows"]
    assert all(r["harmful_refusal"]["n"] == 3 and r["harmless_refusal"]["n"] == 3 for r in rows)
    assert sel["feature"] in sel["grid_features"] and sel["control"] not in sel["grid_features"]
    used = sel["prompts_used"]
    disc = {(u["spec"], u["prompt"]) for u in used["discovery"]}
    val = {(u["spec"], u["prompt"]) for u in used["validation"]}
    assert len(disc) == 6 and len(val) == 6 and not disc & val  # discovery and validation rows are disjoint
    assert len(res.grid_answers) == (len(rows) + 1) * 6
    files = res.files()
    rank = files["ranking.json"]
    assert rank["n_latents"] == 32 and len(rank["metrics"]["auroc_post"]) == 32
    json.dumps(files)  # everything is JSON-serialisable
    assert all(math.isfinite(r["objective"]) for r in rows)


def test_discover_bad_input(tiny, tmp_path):
    model, tok = tiny
    sae = TopKSAE(SAEConfig(d_in=64, num_latents=32, k=4, model="tiny-llama", layer=1))
    harmful = _write_jsonl(tmp_path / "harm.jsonl", ["a", "b", "c"])
    with pytest.raises(SaesteerError, match="out of range"):
        F.discover(model, tok, sae, F.DiscoveryConfig(harmful=harmful, harmless=harmful, features=(32,)))
    with pytest.raises(SaesteerError, match="too few"):
        F.discover(model, tok, sae, F.DiscoveryConfig(harmful=harmful, harmless=harmful, discovery_split=None,
                                                      val_split=None, n_archetypes=2, n_contrast=3))


# --------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny model saved as a HF folder, an SAE for it (layer 1) and one for another model, small prompt files."""
    from saesteer.models import tiny_model
    from saesteer.sae import save_sae

    root = tmp_path_factory.mktemp("cli")
    model, tok = tiny_model("llama")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for name, mname in (("sae", str(root / "model")), ("sae_other", "another-model")):
        save_sae(TopKSAE(SAEConfig(d_in=64, num_latents=16, k=4, model=mname, layer=1), seed=1), root / name)
    _write_jsonl(root / "harm.jsonl", [f"how do i make a cake number {i}?" for i in range(6)])
    _write_jsonl(root / "safe.jsonl", [f"what is the capital of france {i}?" for i in range(6)])
    (root / "empty.jsonl").write_text("")
    return root


def run_cli(args: list[str]) -> int:
    from saesteer.cli import main

    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)


def test_cli_features_runs_and_reports_errors(tiny_dirs, tmp_path, capsys):
    r = tiny_dirs
    common = ["features", "--model", r / "model", "--sae", r / "sae", "--harmful", r / "harm.jsonl", "--harmless",
              r / "safe.jsonl", "--discovery-split", "", "--val-split", "", "--n-archetypes", 1, "--n-contrast", 2,
              "--val-limit", 2, "--max-new-tokens", 2, "--discovery-tokens", 3, "--clamp-multiples", "", "--clamps",
              "1.5", "--n-grid-direction", 0, "--threads", 1]
    out = tmp_path / "feat"
    # the random tiny model never refuses, so the grid holds just the latent we name
    assert run_cli(common + ["--features", "3", "--out", out, "--heldout", r / "harm.jsonl"]) == 0
    sel = json.loads((out / "selection.json").read_text())
    held = json.loads((out / "heldout.json").read_text())
    used = {u["prompt"] for part in sel["prompts_used"].values() for u in part}
    assert held["n"] == 2 and not used & {u["prompt"] for u in held["prompts"]}  # 6 rows - 2 discovery - 2 val
    assert held["baseline"]["n"] == 2 and held["newly_refused"] + held["no_longer_refused"] <= 2
    assert sel["feature"] == 3 and sel["clamp"] == 1.5 and sel["grid_features"] == [3]
    assert {"candidates.json", "ranking.json", "grid.json", "cards.html", "cards.json"} <= {p.name for p in out.iterdir()}
    page = (out / "cards.html").read_text()
    assert "clamp grid" in page and "<td>3</td><td>1.5 absolute</td><td>0/2</td><td>0/2</td>" in page
    common += ["--heldout", ""]
    assert run_cli(common + ["--out", tmp_path / "none"]) == 2  # no refusals, no named latent → no grid
    assert "no candidate latents" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert run_cli(common + ["--features", "16", "--out", tmp_path / "x"]) == 2
    assert "out of range" in capsys.readouterr().err
    bad = [a if a != r / "sae" else r / "sae_other" for a in common]
    assert run_cli(bad + ["--features", "3", "--out", tmp_path / "x"]) == 2
    assert "trained on model 'another-model'" in capsys.readouterr().err
    bad = [a if a != r / "harm.jsonl" else r / "empty.jsonl" for a in common]
    assert run_cli(bad + ["--features", "3", "--out", tmp_path / "x"]) == 2
    assert "saesteer: error:" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_heldout_check_counts_and_interval(monkeypatch):
    base = [True] * 10 + [False] * 30
    steered = [True] * 9 + [False] + [True] * 20 + [False] * 10  # 20 newly refused, 1 no longer refused

    def fake_scorer(model, tok, sae, harmful, harmless, max_new_tokens, batch_size, log=None):
        assert harmless == [] and len(harmful) == 40
        return lambda f, v: {"_labels": base if f is None else steered}

    monkeypatch.setattr(G, "make_scorer", fake_scorer)
    prompts = [F.Prompt(text=f"p{i}", spec="s", split=None, id=str(i)) for i in range(40)]
    h = G.heldout_check(None, None, None, 7, 3.0, prompts)
    assert (h["baseline"]["k"], h["steered"]["k"], h["newly_refused"], h["no_longer_refused"]) == (10, 29, 20, 1)
    assert h["diff"] == pytest.approx(19 / 40) and h["ci_excludes_zero"] and h["ci"][0] > 0
    from scipy.stats import binomtest

    assert h["mcnemar_p"] == pytest.approx(binomtest(20, 21).pvalue) and h["mcnemar_p"] < 1e-4
    with pytest.raises(SaesteerError):
        G.heldout_check(None, None, None, 7, 3.0, [])


def test_refusal_direction_cosine_and_grid_candidates():
    P, A = [False, True, True], [False] * 3
    seqs = [_seq([[], [], []], P, A) for _ in range(4)]
    for s, r in zip(seqs, ([3.0, 1.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0])):
        s.post_resid = torch.tensor(r)
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    cos = F.refusal_direction_cos(seqs, [True, True, False, False], W)  # direction = (2, 0)
    assert torch.allclose(cos, torch.tensor([1.0, 0.0, -(0.5 ** 0.5)]), atol=1e-6)
    assert torch.isnan(F.refusal_direction_cos(seqs, [True] * 4, W)).all()
    cands = [{"latent": 1, "score": 0.9, "cos_refusal_dir": 0.1}, {"latent": 2, "score": 0.8, "cos_refusal_dir": 0.7},
             {"latent": 3, "score": 0.1, "cos_refusal_dir": 0.5}, {"latent": 4, "score": 0.05, "cos_refusal_dir": float("nan")}]
    assert F.grid_candidates(cands, 3) == [1, 2, 3]  # 1 (best score), 2 (best cos), 2 again, 3 (next cos)
    assert F.grid_candidates(cands, 10) == [1, 2, 3, 4]


def test_direction_latents_whole_dictionary():
    # latent 3 has the highest cosine but fires less on harmful prompts: skipped; 0 is excluded; NaN never wins
    ranking = {"cos_refusal_dir": torch.tensor([0.9, 0.2, float("nan"), 0.95, 0.5, 0.4]),
               "diff_post": torch.tensor([1.0, 0.3, 2.0, -0.1, 0.2, 0.0])}
    assert F.direction_latents(ranking, 2, exclude=[0]) == [4, 1]
    assert F.direction_latents(ranking, 5) == [0, 4, 1, 2]
    assert F.direction_latents(ranking, 0) == []


def test_grid_search_requires_a_significant_harmful_gain():
    # a clamp that leaves the model unchanged keeps the best objective; it must not win when a gain is required
    table = {(None, None): (10, 0), (1, 1.0): (11, 0), (1, 4.0): (20, 10), (2, 4.0): (19, 10)}  # out of 20 each

    def scorer(f, v):
        kh, ks = table[(f, v)]
        return {"k_harmful": kh, "n_harmful": 20, "k_harmless": ks, "n_harmless": 20}

    settings = [(f, v, "absolute") for (f, v) in table if f is not None]
    _, rows, best = G.grid_search(settings, scorer, require_gain=False)
    assert (best["feature"], best["clamp"]) == (1, 1.0) and not best["gain_significant"]
    _, rows, best = G.grid_search(settings, scorer)
    assert (best["feature"], best["clamp"]) == (1, 4.0) and best["gain_significant"]
    assert best["harmful_gain"] == pytest.approx(0.5) and best["harmful_gain_ci"][0] > 0
    # nothing significant: the plain objective's choice comes back, flagged
    _, _, best = G.grid_search([(1, 1.0, "absolute")], scorer)
    assert (best["feature"], best["clamp"]) == (1, 1.0) and best["gain_significant"] is False
