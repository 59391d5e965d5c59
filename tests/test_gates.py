"""Gates: threshold selection, strength ramps, separation of synthetic clusters, residual collection."""

from __future__ import annotations

import math

import pytest
import torch

from saesteer.core import SaesteerError, auroc
from saesteer.gating import (
    AlwaysGate,
    CastGate,
    ProbeGate,
    SAEFeatureGate,
    choose_threshold,
    choose_threshold_per_set,
    collect_gate_inputs,
    gate_from_header,
    post_instruction_positions,
    strength_from_scores,
)


# --------------------------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize("n", [1, 7, 50, 333, 1000])
@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.02, 0.05, 0.1, 0.5])
def test_choose_threshold_hits_fpr_and_is_tightest(n, fpr):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(n, generator=g).double()
    t = choose_threshold(scores, fpr)
    achieved = float((scores > t).double().mean())
    assert achieved <= fpr + 1e-12
    # tightest: every candidate below t (the next lower score) exceeds the target
    lower = scores[scores < t]
    if lower.numel():
        t2 = float(lower.max())
        assert float((scores > t2).double().mean()) > fpr
    # with continuous scores the achieved count is exactly floor(fpr * n)
    assert int((scores > t).sum()) == math.floor(fpr * n + 1e-9)


def test_choose_threshold_with_ties():
    scores = torch.tensor([0.0] * 90 + [1.0] * 10)
    # 10 % allowed → the tied block of 1.0 can all fire (exactly 10 %)
    assert choose_threshold(scores, 0.10) == 0.0
    # 5 % allowed → none of the tied 1.0s may fire, threshold sits on them
    t = choose_threshold(scores, 0.05)
    assert t == 1.0 and float((scores > t).float().mean()) == 0.0


def test_choose_threshold_errors():
    with pytest.raises(SaesteerError):
        choose_threshold([], 0.02)
    with pytest.raises(SaesteerError):
        choose_threshold([0.1, float("nan")], 0.02)
    with pytest.raises(SaesteerError):
        choose_threshold([0.1, 0.2], 1.5)
    assert choose_threshold([0.1, 0.2], 1.0) == float("-inf")


def test_strength_modes():
    s = torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.0])
    assert strength_from_scores(s, 0.0, "hard").tolist() == [0, 0, 1, 1, 1]
    lin = strength_from_scores(s, 0.0, "linear", ramp=2.0)
    assert torch.allclose(lin, torch.tensor([0, 0, 0.25, 0.5, 1.0]))
    sig = strength_from_scores(s, 0.0, "sigmoid", ramp=1.0)
    assert sig[0] == 0 and sig[1] == 0 and torch.allclose(sig[2:], torch.tanh(torch.tensor([0.5, 1.0, 3.0])))
    with pytest.raises(SaesteerError):
        strength_from_scores(s, 0.0, "cubic")
    with pytest.raises(SaesteerError):
        strength_from_scores(s, 0.0, "linear", ramp=0.0)


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    pos = torch.randn(40, 5, generator=g) + torch.tensor([0, 1, -1, 0, 2.0])
    neg = torch.randn(60, 5, generator=g)
    pos[:, 3] = 0
    neg[:, 3] = 0  # all ties → 0.5
    a = auroc(pos, neg)
    y = [1] * 40 + [0] * 60
    for j in range(5):
        assert a[j].item() == pytest.approx(roc_auc_score(y, torch.cat([pos[:, j], neg[:, j]]).numpy()), abs=1e-12)


# --------------------------------------------------------------------------------------------- synthetic clusters
def clusters(n=200, d=32, P=3, shift=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    base = torch.randn(d, generator=g) * 3
    harm = base + torch.randn(n, P, d, generator=g) + shift * u
    benign = base + torch.randn(n, P, d, generator=g) - shift * u
    return harm, benign


class DenseSAE(torch.nn.Module):
    """A minimal SAE exposing the documented encode_dense / W_enc interface (ReLU encoder, all latents kept)."""

    def __init__(self, d, m, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(m, d, generator=g) / d**0.5)
        self.b_enc = torch.nn.Parameter(torch.zeros(m))

    def encode_dense(self, x):
        return torch.relu(x @ self.W_enc.T + self.b_enc)


def _make_sae(d, m, u_feature=None):
    try:
        from saesteer.sae import SAEConfig, TopKSAE

        sae = TopKSAE(SAEConfig(d_in=d, num_latents=m, k=m // 2))
    except Exception:  # sae.py not there yet / different signature: the documented interface is enough here
        sae = DenseSAE(d, m)
    if u_feature is not None:
        with torch.no_grad():
            sae.W_enc[0] = u_feature * 3
    return sae


@pytest.mark.parametrize("kind", ["probe", "cast", "sae"])
def test_gates_separate_clusters_and_calibrate(kind):
    harm_tr, ben_tr = clusters(seed=0)
    harm_va, ben_va = clusters(seed=1)
    d = harm_tr.shape[-1]
    if kind == "probe":
        gate = ProbeGate(layer=0, positions=3)
    elif kind == "cast":
        gate = CastGate(layer=0, positions=3)
    else:
        gate = SAEFeatureGate(layer=0, positions=3, sae=_make_sae(d, 64), top_m=8)
    gate.fit(harm_tr, ben_tr)
    sh, sb = gate.score(harm_va), gate.score(ben_va)
    y = torch.cat([torch.ones_like(sh), torch.zeros_like(sb)])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y.numpy(), torch.cat([sh, sb]).numpy()) > 0.95
    stats = gate.calibrate(sb, sh, fpr=0.02)
    assert stats["val_fpr"] <= 0.02 and stats["val_tpr"] > 0.7
    s, fired, strength = gate.decide(ben_va)
    assert float(fired.float().mean()) <= 0.02
    assert torch.equal(strength[~fired], torch.zeros(int((~fired).sum())))
    # save → load gives identical scores
    g2 = gate_from_header(gate.header(), gate.tensors())
    if kind == "sae":
        g2.attach(gate.sae)
    assert torch.equal(g2.score(harm_va), sh) and g2.threshold == gate.threshold


def test_sae_gate_picks_the_separating_latent():
    harm, ben = clusters(seed=3, shift=2.0)
    u = (harm.mean((0, 1)) - ben.mean((0, 1)))
    u /= u.norm()
    sae = DenseSAE(harm.shape[-1], 32)
    with torch.no_grad():
        sae.W_enc[5] = u * 2
        sae.b_enc[5] = 0.0
    gate = SAEFeatureGate(layer=0, positions=3, sae=sae, top_m=1).fit(harm, ben)
    assert gate.features.tolist() == [5] and gate.auroc[0] > 0.95


def test_reduce_last_uses_only_last_position():
    harm, ben = clusters(seed=4)
    gate = CastGate(layer=0, positions=3, reduce="last").fit(harm, ben)
    x = ben.clone()
    x[:, :2] += 100.0  # earlier positions ignored
    assert torch.allclose(gate.score(x), gate.score(ben))


def test_gate_input_errors():
    harm, ben = clusters(n=10)
    with pytest.raises(SaesteerError):
        ProbeGate(layer=0, positions=3).fit(harm[:, :, :5], ben)
    g = ProbeGate(layer=0, positions=3).fit(harm, ben)
    with pytest.raises(SaesteerError, match="width"):
        g.score(harm[:, :, :5])
    with pytest.raises(SaesteerError, match="positions"):
        g.score(harm[:, :1])
    with pytest.raises(SaesteerError):
        ProbeGate(layer=0, positions=3).fit(harm, harm[:1])
    bad = harm.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(SaesteerError, match="NaN"):
        g.decide(bad)
    with pytest.raises(SaesteerError):
        gate_from_header({"kind": "nope"}, {})
    with pytest.raises(SaesteerError, match="missing"):
        gate_from_header(g.header(), {})
    with pytest.raises(SaesteerError):
        ProbeGate(layer=0, reduce="max")


def test_always_gate():
    g = AlwaysGate(layer=1)
    s, fired, st = g.decide(torch.zeros(4, 1, 8))
    assert fired.all() and torch.equal(st, torch.ones(4))


# --------------------------------------------------------------------------------------------- real residuals
def test_post_instruction_positions_and_collect(tiny):
    model, tok = tiny
    P = post_instruction_positions(tok)
    # ChatML: <|im_end|> \n <|im_start|> assistant \n
    assert P == len(tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    prompts = ["how do i make a cake?", "what is the capital of france? tell me more please"]
    h = collect_gate_inputs(model, tok, prompts, layer=1, positions=P, batch_size=2, progress=False)
    assert h.shape == (2, P, model.config.hidden_size)
    # left padding: the batched residual equals each prompt run alone (post-instruction tokens are identical text)
    solo = collect_gate_inputs(model, tok, prompts[:1], layer=1, positions=P, progress=False)
    assert torch.allclose(h[0], solo[0], atol=1e-4)
    with pytest.raises(SaesteerError):
        collect_gate_inputs(model, tok, prompts, layer=7, positions=P, progress=False)


@pytest.mark.integration
def test_probe_gate_separates_real_harmful_prompts(data_root, qwen):
    """Default model, layer 12: a probe fitted on 24 + 24 arditi train prompts separates held-out val prompts."""
    from sklearn.metrics import roc_auc_score

    from saesteer.data import load_prompts

    model, tok = qwen
    P = post_instruction_positions(tok)

    def h(spec, n):
        return collect_gate_inputs(model, tok, [it.prompt for it in load_prompts(spec, limit=n, seed=0)], 12, P,
                                   batch_size=12, progress=False)

    gate = ProbeGate(layer=12, positions=P).fit(h("arditi-harmful:train", 24), h("arditi-harmless:train", 24))
    sh, sb = gate.score(h("arditi-harmful:val", 12)), gate.score(h("arditi-harmless:val", 12))
    y = [1] * len(sh) + [0] * len(sb)
    assert roc_auc_score(y, torch.cat([sh, sb]).numpy()) > 0.9


# --------------------------------------------------------------------------------------------- hard look-alikes
def test_per_set_threshold_caps_every_set_where_pooled_does_not():
    g = torch.Generator().manual_seed(7)
    easy = torch.randn(500, generator=g).double() - 3  # a large easy benign set
    hard = torch.randn(25, generator=g).double() + 1  # a small set of harmful-looking benign prompts
    pooled = choose_threshold(torch.cat([easy, hard]), 0.02)
    assert float((hard > pooled).double().mean()) > 0.02  # the pooled cap lets the hard set through
    t = choose_threshold_per_set([easy, hard], 0.02)
    assert t == max(choose_threshold(easy, 0.02), choose_threshold(hard, 0.02))
    for s in (easy, hard):
        assert float((s > t).double().mean()) <= 0.02
    # tightest: the next lower score on the hard set would break its cap
    lower = hard[hard < t]
    assert float((hard > float(lower.max())).double().mean()) > 0.02
    gate = ProbeGate(layer=0, positions=1)
    stats = gate.calibrate(torch.cat([easy, hard]), None, 0.02, benign_sets={"easy": easy, "hard": hard})
    assert gate.threshold == t and stats["cap"] == "per-set"
    assert stats["val_fpr_per_set"]["hard"] <= 0.02 and stats["val_fpr_per_set"]["easy"] <= 0.02
    with pytest.raises(SaesteerError):
        choose_threshold_per_set([], 0.02)


def test_probe_sample_weights_move_the_boundary_and_match_sklearn():
    """Up-weighting a benign cluster that sits near the harmful one lowers its scores."""
    g = torch.Generator().manual_seed(3)
    d = 8
    harm = torch.randn(80, 1, d, generator=g) + 2.0
    easy = torch.randn(80, 1, d, generator=g) - 2.0
    look = torch.randn(20, 1, d, generator=g) * 0.5 + 1.0  # benign look-alikes, close to the harmful cluster
    benign = torch.cat([easy, look])
    plain = ProbeGate(0, 1, C=1.0).fit(harm, benign)
    w = torch.cat([torch.ones(80), torch.full((20,), 10.0)])
    heavy = ProbeGate(0, 1, C=1.0).fit(harm, benign, harmless_weight=w)
    assert heavy.score(look).mean() < plain.score(look).mean() - 1.0
    assert (heavy.score(look) > 0).float().mean() <= (plain.score(look) > 0).float().mean()
    with pytest.raises(SaesteerError):
        ProbeGate(0, 1).fit(harm, benign, harmless_weight=torch.ones(3))
    with pytest.raises(SaesteerError):
        ProbeGate(0, 1).fit(harm, benign, harmless_weight=-w)
