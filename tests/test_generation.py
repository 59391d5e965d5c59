"""Fast batched generation: identical greedy output to model.generate, row dropping, hooks, stops, sampling."""

from __future__ import annotations

import pytest
import torch

from saesteer.core import SaesteerError
from saesteer.generation import GenerationConfig, encode_prompts, generate, generate_rows, generate_stream
from saesteer.models import hook_module

PROMPTS = [
    "hello there",
    "how do i make a cake? please tell me in detail",
    "capital of france",
    "x",
    "the quick brown fox jumps over the lazy dog and more words here",
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "photosynthesis?"}],
]


@pytest.fixture(scope="module")
def lively():
    """A tiny Llama with larger random weights, so greedy outputs are varied (not one repeated token)."""
    from saesteer.models import tiny_model

    model, tok = tiny_model("llama", weight_std=0.15)  # varied greedy outputs
    return model, tok


def _padded(tok, ids):
    L = max(map(len, ids))
    inp = torch.tensor([[tok.pad_token_id] * (L - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids])
    return inp, mask, L


def _hf_generate(model, tok, ids, max_new, eos):
    """Reference: plain model.generate on one left-padded batch; returns each row's ids up to (excluding) EOS."""
    inp, mask, L = _padded(tok, ids)
    out = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                         eos_token_id=sorted(eos), pad_token_id=tok.pad_token_id)
    res = []
    for row in out[:, L:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        res.append(row[:cut])
    return res


def _common_eos(model, tok, n=3):
    """A few frequent tokens of the free-running output, used as extra EOS ids so rows end at different steps."""
    rows = generate_rows(model, tok, PROMPTS, max_new_tokens=16, eos_ids=[])
    counts = torch.bincount(torch.tensor([t for r in rows for t in r.out_ids]))
    return {int(t) for t in counts.argsort(descending=True)[:n]} | {tok.eos_token_id}


def test_greedy_equals_model_generate_same_batch(lively):
    model, tok = lively
    eos = _common_eos(model, tok)
    rows = generate_rows(model, tok, PROMPTS, max_new_tokens=24, eos_ids=eos, bucket_by_length=False)
    lengths = {len(r.out_ids) for r in rows}
    assert len(lengths) > 1, "rows should finish at different steps so that row dropping is exercised"
    assert {r.finish_reason for r in rows} == {"stop", "length"}
    ref = _hf_generate(model, tok, encode_prompts(tok, PROMPTS), 24, eos)
    assert [r.out_ids for r in rows] == ref
    assert [r.text for r in rows] == [tok.decode(x, skip_special_tokens=True) for x in ref]


def test_bucketed_small_batches_equal_unpadded_generate(lively):
    model, tok = lively
    eos = _common_eos(model, tok)
    ids = encode_prompts(tok, PROMPTS)
    rows = generate_rows(model, tok, PROMPTS, max_new_tokens=16, eos_ids=eos, batch_size=2)
    ref = [_hf_generate(model, tok, [x], 16, eos)[0] for x in ids]  # batch 1: no padding at all
    diverged = sum(r.out_ids != x for r, x in zip(rows, ref))
    assert diverged == 0  # padding-induced divergences: none on this model (counted on a real one in integration)


def test_message_lists_and_raw_prompts(lively):
    model, tok = lively
    conv = [{"role": "user", "content": "capital of france"}]
    assert generate(model, tok, [conv], max_new_tokens=8) == generate(model, tok, ["capital of france"], max_new_tokens=8)
    raw = generate_rows(model, tok, ["the quick brown"], max_new_tokens=5, raw=True)[0]
    enc = tok(["the quick brown"], return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=5, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    cut = ref.index(tok.eos_token_id) if tok.eos_token_id in ref else len(ref)
    assert raw.out_ids == ref[:cut]


def test_stop_strings_cut_before_the_stop(lively):
    model, tok = lively
    full = generate(model, tok, PROMPTS[:3], max_new_tokens=24, eos_ids=[])
    stop = full[1][6:9]
    out = generate_rows(model, tok, PROMPTS[:3], max_new_tokens=24, eos_ids=[], stop=[stop])
    for r, f in zip(out, full):
        pos = f.find(stop)
        if pos >= 0:
            assert r.text == f[:pos] and r.finish_reason == "stop"
        else:
            assert r.text == f and r.finish_reason == "length"
    assert out[1].finish_reason == "stop" and len(out[1].out_ids) < 24


def test_stop_when_ends_rows_early(lively):
    model, tok = lively
    full = generate_rows(model, tok, PROMPTS, max_new_tokens=20, eos_ids=[])
    seen = []

    def judge(text):
        seen.append(text)
        return len(text) >= 6 or None

    out = generate_rows(model, tok, PROMPTS, max_new_tokens=20, eos_ids=[], stop_when=judge)
    for r, f in zip(out, full):
        assert f.out_ids[: len(r.out_ids)] == r.out_ids  # a prefix of the free run
        assert len(r.text) >= 6 and r.finish_reason == "stop"
        shorter = tok.decode(r.out_ids[:-1], skip_special_tokens=True)
        assert len(shorter) < 6  # it stopped at the first decided step, not later
    assert sum(len(r.out_ids) for r in out) == len(seen)


class RowAdd:
    """A per-row steering intervention following the contract (registered in ``models.hooks``): adds vecs[row] at a
    layer; select_rows slices."""

    def __init__(self, model, layer, vecs):
        from saesteer.models import hooks

        self.vecs, self.calls = vecs, []
        self.hs = hooks.install(model, self, members=[self])
        hooks.register_forward_hook(hook_module(model, layer), self.hook, self.hs)

    def hook(self, mod, inp, out):
        self.calls.append(out.shape[0])
        assert out.shape[0] == self.vecs.shape[0], "hook saw a batch of a different size than its rows"
        return out + self.vecs[:, None, :]

    def select_rows(self, index):
        self.vecs = self.vecs[index]

    def remove(self, model):
        from saesteer.models import hooks

        hooks.uninstall(model, self.hs)


def test_row_dropping_keeps_per_row_hooks_aligned(lively):
    model, tok = lively
    g = torch.Generator().manual_seed(3)
    vecs = torch.randn(len(PROMPTS), 64, generator=g) * 2.0
    vecs[0] = 0
    order = []
    iv = RowAdd(model, 0, vecs.clone())
    try:
        eos = _common_eos(model, tok)  # frequent tokens of the steered run
        iv.calls.clear()
        rows = generate_rows(model, tok, PROMPTS, max_new_tokens=16, eos_ids=eos, bucket_by_length=False,
                             on_batch=order.append)
    finally:
        iv.remove(model)
    assert order == [list(range(len(PROMPTS)))]
    assert len(set(iv.calls)) > 1  # the batch shrank while decoding
    # reference: each prompt alone with its own vector through model.generate
    ids = encode_prompts(tok, PROMPTS)
    for i, x in enumerate(ids):
        single = RowAdd(model, 0, vecs[i:i + 1].clone())
        try:
            ref = _hf_generate(model, tok, [x], 16, eos)[0]
        finally:
            single.remove(model)
        assert rows[i].out_ids == ref, f"row {i} differs from its own steered run"
    plain = generate_rows(model, tok, PROMPTS, max_new_tokens=16, eos_ids=eos)
    assert plain[0].out_ids == rows[0].out_ids  # zero vector: unchanged
    assert sum(p.out_ids != r.out_ids for p, r in zip(plain, rows)) >= 3  # the hook really steered


def test_plain_forward_hook_stays_active(lively):
    model, tok = lively
    calls = []
    vec = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 3.0

    def hook(mod, inp, out):
        calls.append(out.shape[1])
        return out + vec

    before = generate(model, tok, PROMPTS[:2], max_new_tokens=10, eos_ids=[])
    h = hook_module(model, 1).register_forward_hook(hook)
    try:
        steered = generate(model, tok, PROMPTS[:2], max_new_tokens=10, eos_ids=[])
    finally:
        h.remove()
    assert steered != before
    assert calls.count(1) == 9 and len(calls) == 10  # prefill + 9 single-token decode steps
    assert generate(model, tok, PROMPTS[:2], max_new_tokens=10, eos_ids=[]) == before


def test_sampling_seeded_and_batch_independent(lively):
    model, tok = lively
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7, eos_ids=[])
    a = generate(model, tok, PROMPTS, cfg)
    assert a == generate(model, tok, PROMPTS, cfg)
    assert a != generate(model, tok, PROMPTS, cfg, seed=8)
    b = generate(model, tok, PROMPTS, cfg, batch_size=1)  # other batch company, same per-row seeds
    assert a == b
    greedy = generate(model, tok, PROMPTS, max_new_tokens=12, eos_ids=[])
    assert a != greedy
    assert generate(model, tok, PROMPTS, cfg, top_p=1e-6) == greedy  # a nucleus of one token is greedy


def test_stream_deltas_rebuild_text_and_hold_back_stops(lively):
    model, tok = lively
    full = generate(model, tok, PROMPTS, max_new_tokens=20, eos_ids=[])
    stop = full[1][5:8]
    ref = generate(model, tok, PROMPTS, max_new_tokens=20, eos_ids=[], stop=[stop])
    got = {i: "" for i in range(len(PROMPTS))}
    finished = {}
    for ev in generate_stream(model, tok, PROMPTS, max_new_tokens=20, eos_ids=[], stop=[stop]):
        assert ev.index not in finished
        got[ev.index] += ev.delta
        assert stop not in got[ev.index]
        if ev.finish_reason:
            finished[ev.index] = ev.finish_reason
    assert [got[i] for i in range(len(PROMPTS))] == ref
    assert finished[1] == "stop" and len(finished) == len(PROMPTS)


def test_zero_tokens_and_empty_list(lively):
    model, tok = lively
    assert generate(model, tok, [], max_new_tokens=5) == []
    assert generate(model, tok, PROMPTS[:2], max_new_tokens=0) == ["", ""]


@pytest.mark.parametrize("bad", [dict(max_new_tokens=-1), dict(batch_size=0), dict(temperature=-1.0),
                                 dict(top_p=0.0), dict(stop=[""]), dict(nonsense=1)])
def test_bad_settings_raise(lively, bad):
    model, tok = lively
    with pytest.raises(SaesteerError):
        generate(model, tok, ["hi"], **bad)


def test_bad_prompts_and_limits_raise(lively):
    model, tok = lively
    with pytest.raises(SaesteerError, match="prompt 1"):
        generate(model, tok, ["ok", 5], max_new_tokens=2)
    with pytest.raises(SaesteerError, match="prompt 0 is empty"):
        generate(model, tok, [""], raw=True, max_new_tokens=2)
    with pytest.raises(SaesteerError, match="context"):
        generate(model, tok, ["hi"], max_new_tokens=10_000)
    h = hook_module(model, 0).register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with pytest.raises(SaesteerError, match="NaN"):
            generate(model, tok, ["hi"], max_new_tokens=2)
    finally:
        h.remove()
    for bad in (float("nan"), float("inf")):  # one bad logit in one row of a batch is enough

        def one_bad(m, i, o, bad=bad):
            o = o.clone()
            o[-1, -1, 7] = bad
            return o

        h = model.lm_head.register_forward_hook(one_bad)
        try:
            with pytest.raises(SaesteerError, match="NaN"):
                generate(model, tok, ["hi", "hello there"], max_new_tokens=2)
        finally:
            h.remove()


@pytest.mark.integration
def test_smollm_greedy_equals_model_generate(smollm):
    model, tok = smollm
    prompts = ["What is the capital of France?", "Write a haiku about rain.", "How do I pick a lock?",
               "Give me three tips for sleeping better.", "Explain recursion to a child.", "2+2=?"]
    rows = generate_rows(model, tok, prompts, max_new_tokens=16, batch_size=8, bucket_by_length=False)
    eos = {tok.eos_token_id} | ({model.generation_config.eos_token_id} - {None})
    ref = _hf_generate(model, tok, encode_prompts(tok, prompts), 16, eos)
    same_batch_diverged = sum(r.out_ids != x for r, x in zip(rows, ref))
    assert same_batch_diverged == 0
    bucketed = generate_rows(model, tok, prompts, max_new_tokens=16, batch_size=3)
    padding_diverged = sum(r.out_ids != x for r, x in zip(bucketed, ref))
    assert padding_diverged <= 1, f"{padding_diverged}/6 rows changed with a different padding"


def test_decode_threads_switch_and_restore(lively):
    model, tok = lively
    seen = []
    h = hook_module(model, 0).register_forward_hook(lambda m, i, o: seen.append((o.shape[1], torch.get_num_threads())))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = generate(model, tok, PROMPTS[:2], max_new_tokens=4, eos_ids=[], decode_threads=1)
        assert torch.get_num_threads() == 2  # restored after the batch
    finally:
        h.remove()
        torch.set_num_threads(before)
    assert seen[0][1] == 2 and all(n == 1 for _, n in seen[1:])  # prefill on 2 threads, decode steps on 1
    assert out == generate(model, tok, PROMPTS[:2], max_new_tokens=4, eos_ids=[])


@pytest.mark.skipif(not __import__("os").environ.get("SAESTEER_TEST_COMPILE"),
                    reason="torch.compile takes ~2 min on this CPU; set SAESTEER_TEST_COMPILE=1 to run")
def test_compiled_forward_gives_same_tokens(lively):
    model, tok = lively
    ref = generate(model, tok, PROMPTS[:3], max_new_tokens=6, eos_ids=[])
    assert generate(model, tok, PROMPTS[:3], max_new_tokens=6, eos_ids=[], compile=True) == ref


def test_stream_holds_back_partial_stops_and_characters():
    from saesteer.generation.decode import _held_back

    assert _held_back("hello wor", ["world"]) == 3  # could still become the stop string
    assert _held_back("hello", ["world"]) == 0
    assert _held_back("ab\ufffd\ufffd", []) == 2  # a multi-byte character split over tokens
    assert _held_back("abc", ["xyz", "bc!"]) == 2


@pytest.mark.parametrize("arch", ["qwen2", "gemma", "phi3", "gpt2"])
def test_other_architectures_equal_model_generate(arch):
    from saesteer.models import tiny_model

    model, tok = tiny_model(arch, weight_std=0.15)  # varied greedy outputs
    rows = generate_rows(model, tok, PROMPTS[:3], max_new_tokens=8, eos_ids=[], bucket_by_length=False)
    assert [r.out_ids for r in rows] == _hf_generate(model, tok, encode_prompts(tok, PROMPTS[:3]), 8, set())


@pytest.fixture
def spy_prefill(monkeypatch):
    """Record the ``info`` of every batch prefill (shared prefix length, number of length groups)."""
    from saesteer.generation import kvprefill as kvprefill

    infos = []
    real = kvprefill.prefill

    def spy(*a, **k):
        out = real(*a, **k)
        infos.append(out[4])
        return out

    monkeypatch.setattr(kvprefill, "prefill", spy)
    return infos


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_shared_prefix_and_length_groups_equal_model_generate(lively, spy_prefill, monkeypatch, positions):
    from saesteer.generation import kvprefill as kvprefill
    from saesteer.steering import Add, steer

    model, tok = lively
    monkeypatch.setattr(kvprefill, "GROUP_OVERHEAD", 0)  # one prefill group per distinct length
    prompts = [[{"role": "system", "content": "you are a careful assistant who answers briefly"},
                {"role": "user", "content": p if isinstance(p, str) else "photosynthesis?"}] for p in PROMPTS]
    ids = encode_prompts(tok, prompts)
    vec = torch.randn(64, generator=torch.Generator().manual_seed(11)) * 3.0
    with steer(model, [Add(vector=vec, alpha=1.0, layer=0)], positions=positions):
        rows = generate_rows(model, tok, prompts, max_new_tokens=12, eos_ids=[], bucket_by_length=False)
        ref = _hf_generate(model, tok, ids, 12, set())
    assert [r.out_ids for r in rows] == ref
    assert spy_prefill[-1]["shared"] >= 10 and spy_prefill[-1]["groups"] >= 3
    plain = _hf_generate(model, tok, ids, 12, set())
    assert sum(a != b for a, b in zip(plain, ref)) >= 2  # the steering (at these positions) changed outputs


def test_prefix_sharing_off_for_foreign_hooks_and_row_scales(lively, spy_prefill):
    from saesteer.models.hooks import hook_sets, prefix_shareable
    from saesteer.steering import Add, set_row_scale, steer

    model, tok = lively
    assert prefix_shareable(model) and hook_sets(model) == []
    seen = []
    h = hook_module(model, 0).register_forward_hook(lambda m, i, o: seen.append(o.shape[:2]))
    try:
        assert not prefix_shareable(model)  # a hook saesteer did not install
        generate(model, tok, PROMPTS, max_new_tokens=2, eos_ids=[], bucket_by_length=False)
    finally:
        h.remove()
    width = max(map(len, encode_prompts(tok, PROMPTS)))
    assert seen[0] == (len(PROMPTS), width) and spy_prefill[-1] == {"shared": 0, "groups": 1}
    with steer(model, [Add(vector=torch.ones(64), alpha=1.0, layer=0)]):
        assert prefix_shareable(model) and len(hook_sets(model)) == 1
        set_row_scale(model, torch.ones(len(PROMPTS)))
        assert not prefix_shareable(model)  # per-row strengths: every row prefilled in full
    out_on = generate(model, tok, PROMPTS[:5], max_new_tokens=8, eos_ids=[])  # all start with "<|im_start|>user\n"
    assert spy_prefill[-1]["shared"] > 0
    assert generate(model, tok, PROMPTS[:5], max_new_tokens=8, eos_ids=[], share_prefix=False) == out_on
    assert spy_prefill[-1]["shared"] == 0


def test_prefix_sharing_survives_transformers_output_capturing_hooks(spy_prefill):
    """transformers installs read-only output-capturing hooks on the first output_hidden_states call and keeps them;
    they must not turn prefix sharing off for the rest of the process (they did: every later batch prefilled in full)."""
    from saesteer.models import tiny_model
    from saesteer.models.hooks import prefix_shareable, unregistered_hooks

    model, tok = tiny_model("llama", weight_std=0.15)
    before = generate(model, tok, PROMPTS[:5], max_new_tokens=6, eos_ids=[])
    assert spy_prefill[-1]["shared"] > 0
    ids = torch.tensor([encode_prompts(tok, PROMPTS[:1])[0]])
    model(input_ids=ids, output_hidden_states=True)
    mods = {getattr(f, "__module__", "") for m in model.modules() for f in m._forward_hooks.values()}
    assert "transformers.utils.output_capturing" in mods  # the hooks transformers leaves behind
    assert unregistered_hooks(model) == 0 and prefix_shareable(model)
    assert generate(model, tok, PROMPTS[:5], max_new_tokens=6, eos_ids=[]) == before
    assert spy_prefill[-1]["shared"] > 0
    h = model.model.layers[0].register_forward_hook(lambda m, i, o: None)  # any other hook still counts
    try:
        assert unregistered_hooks(model) == 1 and not prefix_shareable(model)
    finally:
        h.remove()


def test_length_groups_partition_and_cost():
    from saesteer.generation import length_groups, shared_prefix_len

    lengths = [5, 30, 5, 31, 6, 30]
    groups = length_groups(lengths, overhead=10)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert sorted(map(sorted, groups)) == [[0, 2, 4], [1, 3, 5]]
    assert length_groups(lengths, overhead=1000) == [[3, 1, 5, 4, 0, 2]]  # one forward when forwards are dear
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps a token of its own
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_len([[1, 2, 3]]) == 0


def test_greedy_pick_on_bf16_logits_is_torch_argmax():
    """The decode loop upcasts bf16 logits before its argmax (4x faster on CPU): the same index as argmax over the
    bf16 row itself, ties included (the first maximum)."""
    from saesteer.generation.decode import Row, _sample

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 1000, generator=g) * 3).bfloat16()
    logits[1, 10] = logits[1, 700] = logits[1].max() + 1  # a tie: the first index wins
    rows = [Row(i, [1], 4) for i in range(5)]
    got = _sample(logits, rows)
    assert torch.equal(got, logits.argmax(-1)) and int(got[1]) == 10
