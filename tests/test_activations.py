"""Activation collection (exclusions, equivalence to a plain forward, sharding, resume) and the memory-mapped reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saesteer import models
from saesteer.activations import ActivationCache, CollectConfig, collect, keep_mask, pad_right, parse_mix_spec
from saesteer.core import SaesteerError

DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "how do i make a cake? here is a simple recipe",
    "i'm sorry, but i can't assist with that request.",
    "sure, here is how you can write a python function",
    "what is the capital of france? paris.",
    "explain photosynthesis in simple terms",
] * 6


@pytest.fixture
def docs_file(tmp_path: Path) -> str:
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i, t in enumerate(DOCS)))
    return str(p)


def _cfg(tmp_path: Path, data: str, **kw) -> CollectConfig:
    base = dict(model="tiny", layer=1, data=data, tokens=600, out=str(tmp_path / "acts"), batch_size=4,
                context_len=64, shard_tokens=150, progress=False)
    base.update(kw)
    return CollectConfig(**base)


def test_keep_mask_drops_first_pad_and_special():
    ids = torch.tensor([[5, 1, 7, 8, 0, 0], [9, 10, 11, 2, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    keep = keep_mask(ids, mask, {0, 1, 2})
    assert keep.tolist() == [[False, False, True, True, False, False], [False, True, True, False, True, True]]


def test_pad_right_shapes():
    ids, mask = pad_right([[3, 4, 5], [6]], pad_id=0)
    assert ids.tolist() == [[3, 4, 5], [6, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collect_rows_equal_unpadded_forward(tiny, tmp_path, docs_file):
    model, tok = tiny
    # layer 0: in HF, the last hidden_states entry has the final norm applied, so compare on a non-final layer
    out = collect(_cfg(tmp_path, docs_file, tokens=10_000, layer=0), model, tok)
    cache = ActivationCache(out)
    meta = cache.meta
    assert meta["complete"] and meta["layer"] == 0 and meta["d_model"] == 64 and meta["hook_name"] == "model.layers.0"
    assert meta["n_tokens"] == sum(s["n_tokens"] for s in meta["shards"]) == len(cache)
    assert len(meta["shards"]) > 1  # shard_tokens=150 forces several shards
    specials = models.special_token_ids(tok)
    acts = torch.cat([cache.shard(i).float() for i in range(cache.n_shards)])
    tids = torch.cat([cache.shard_tensor(i, "token_ids") for i in range(cache.n_shards)])
    dids = torch.cat([cache.shard_tensor(i, "doc_ids") for i in range(cache.n_shards)])
    assert not set(tids.tolist()) & specials
    texts = [json.loads(x)["text"] for x in Path(docs_file).read_text().splitlines()]
    assert sorted(set(dids.tolist())) == list(range(len(texts)))  # data ran out before 10k tokens: every doc in
    for d in range(0, len(texts), 5):  # a spread of documents (batches mix lengths, so padding is exercised)
        ids = tok(texts[d], add_special_tokens=True)["input_ids"][:64]
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        keep = [i for i in range(1, len(ids)) if ids[i] not in specials]
        rows = acts[dids == d]
        assert tids[dids == d].tolist() == [ids[i] for i in keep]
        torch.testing.assert_close(rows, hs[keep], atol=1e-4, rtol=1e-4)


def test_collect_stops_at_token_budget_and_float16(tiny, tmp_path, docs_file):
    model, tok = tiny
    out = collect(_cfg(tmp_path, docs_file, tokens=333, dtype="float16"), model, tok)
    cache = ActivationCache(out)
    assert len(cache) == 333 and cache.shard(0).dtype == torch.float16
    assert next(cache.iter_batches(50)).dtype == torch.float32


def test_collect_excludes_chat_specials(tiny, tmp_path):
    model, tok = tiny
    p = tmp_path / "chat.jsonl"
    conv = [{"role": "user", "content": "how do i make a cake?"}, {"role": "assistant", "content": "flour and eggs"}]
    p.write_text("\n".join(json.dumps({"messages": conv}) for _ in range(3)) + "\n")
    out = collect(_cfg(tmp_path, str(p), tokens=1000), model, tok)
    cache = ActivationCache(out)
    tids = cache.shard_tensor(0, "token_ids").tolist()
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert im_start not in tids and im_end not in tids
    n_real = len(tok(models.format_chat(tok, conv, add_generation_prompt=False), add_special_tokens=False)["input_ids"])
    assert len(cache) == 3 * (n_real - 4)  # 2 x <|im_start|> + 2 x <|im_end|>; position 0 is <|im_start|> itself


def test_resume_after_interrupt_matches_uninterrupted(tiny, tmp_path, docs_file, monkeypatch):
    model, tok = tiny
    ref = ActivationCache(collect(_cfg(tmp_path, docs_file, out=str(tmp_path / "ref")), model, tok))
    real = models.run_to_layer
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(models, "run_to_layer", flaky)
    cfg = _cfg(tmp_path, docs_file)
    with pytest.raises(KeyboardInterrupt):
        collect(cfg, model, tok)
    meta = json.loads((Path(cfg.out) / "meta.json").read_text())
    assert meta["complete"] is False and 0 < len(meta["shards"])
    with pytest.raises(SaesteerError, match="incomplete"):
        ActivationCache(cfg.out)
    assert ActivationCache(cfg.out, allow_incomplete=True).n_tokens == meta["n_tokens"]
    monkeypatch.setattr(models, "run_to_layer", real)
    got = ActivationCache(collect(cfg, model, tok))
    assert len(got) == len(ref) == 600
    torch.testing.assert_close(got.rows(np.arange(600)), ref.rows(np.arange(600)))


def test_more_tokens_extends_a_finished_cache(tiny, tmp_path, docs_file):
    model, tok = tiny
    ref = ActivationCache(collect(_cfg(tmp_path, docs_file, tokens=500, out=str(tmp_path / "ref")), model, tok))
    collect(_cfg(tmp_path, docs_file, tokens=200), model, tok)
    small = ActivationCache(tmp_path / "acts")
    assert len(small) == 200
    collect(_cfg(tmp_path, docs_file, tokens=100), model, tok)  # already past a smaller target: unchanged
    assert len(ActivationCache(tmp_path / "acts")) == 200
    big = ActivationCache(collect(_cfg(tmp_path, docs_file, tokens=500), model, tok))
    assert len(big) == 500 and big.meta["complete"] and big.meta["n_tokens_requested"] == 500
    # the first 200 rows are the old cache; extending continues the batches where they stopped
    torch.testing.assert_close(big.rows(np.arange(200)), small.rows(np.arange(200)))
    assert big.meta["next_batch"] >= small.meta["next_batch"] and big.d_model == ref.d_model


def test_different_config_same_dir_is_an_error(tiny, tmp_path, docs_file):
    model, tok = tiny
    collect(_cfg(tmp_path, docs_file, tokens=200), model, tok)
    with pytest.raises(SaesteerError, match="different collection.*layer"):
        collect(_cfg(tmp_path, docs_file, tokens=200, layer=0), model, tok)
    collect(_cfg(tmp_path, docs_file, tokens=200, layer=0, overwrite=True), model, tok)
    assert ActivationCache(tmp_path / "acts").layer == 0


def test_bad_layer_and_unwritable_out_leave_nothing(tiny, tmp_path, docs_file):
    model, tok = tiny
    with pytest.raises(SaesteerError, match="out of range"):
        collect(_cfg(tmp_path, docs_file, layer=5), model, tok)
    assert not (tmp_path / "acts").exists()
    blocker = tmp_path / "afile"  # a file where a folder should be: unwritable even for root
    blocker.write_text("x")
    with pytest.raises(SaesteerError, match="cannot write to output folder"):
        collect(_cfg(tmp_path, docs_file, out=str(blocker / "x")), model, tok)
    notdocs = tmp_path / "empty.jsonl"
    notdocs.write_text("")
    with pytest.raises(SaesteerError, match="empty"):
        collect(_cfg(tmp_path, str(notdocs)), model, tok)
    assert not (tmp_path / "acts").exists()


def test_parse_mix_spec():
    assert parse_mix_spec("chat-mix") == {}
    assert parse_mix_spec("chat-mix:text=3,harmful=2,answer=4") == {"n_text": 3, "n_harmful": 2, "answer_tokens": 4}
    with pytest.raises(SaesteerError, match="bad chat-mix option"):
        parse_mix_spec("chat-mix:foo=1")


# --------------------------------------------------------------------------------------------- reader
@pytest.fixture
def cache_dir(tiny, tmp_path, docs_file) -> Path:
    model, tok = tiny
    return collect(_cfg(tmp_path, docs_file, tokens=500, shard_tokens=120), model, tok)


def test_reader_is_memory_mapped_and_batches_cover_everything(cache_dir):
    c = ActivationCache(cache_dir)
    assert isinstance(c._acts[0], np.memmap)
    everything = c.rows(np.arange(len(c)))
    for s in range(c.n_shards):  # shards are the rows in order
        lo = sum(x["n_tokens"] for x in c.meta["shards"][:s])
        torch.testing.assert_close(c.shard(s), everything[lo : lo + c.meta["shards"][s]["n_tokens"]])
    batches = list(c.iter_batches(64, seed=3))
    assert [b.shape[0] for b in batches] == [64] * 7 + [500 - 7 * 64]
    got = torch.cat(batches)
    key = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731  (row multiset equality)
    torch.testing.assert_close(key(got), key(everything))
    assert not torch.equal(got, everything)  # shuffled
    again = torch.cat(list(c.iter_batches(64, seed=3)))
    torch.testing.assert_close(got, again)  # deterministic
    assert not torch.equal(torch.cat(list(c.iter_batches(64, seed=3, epoch=1))), got)
    tail = torch.cat(list(c.iter_batches(64, seed=3, start_batch=5)))
    torch.testing.assert_close(tail, got[5 * 64 :])
    assert torch.equal(torch.cat(list(c.iter_batches(64, shuffle=False))), everything)


def test_reader_rank_sharding_is_disjoint(cache_dir):
    c = ActivationCache(cache_dir)
    r0 = list(c.iter_batches(50, seed=1, rank=0, world_size=2))
    r1 = list(c.iter_batches(50, seed=1, rank=1, world_size=2))
    full = list(c.iter_batches(50, seed=1))
    assert len(r0) == len(r1) == 5
    for i in range(5):
        assert torch.equal(r0[i], full[2 * i]) and torch.equal(r1[i], full[2 * i + 1])
    s = c.sample(20, seed=0)
    assert s.shape == (20, 64) and torch.equal(s, c.sample(20, seed=0))
    assert c.validate()["n_tokens"] == 500


def test_reader_errors(cache_dir, tmp_path):
    with pytest.raises(SaesteerError, match="not found"):
        ActivationCache(tmp_path / "nope")
    meta = cache_dir / "meta.json"
    good = meta.read_text()
    meta.write_text("{not json")
    with pytest.raises(SaesteerError, match="not valid JSON"):
        ActivationCache(cache_dir)
    meta.write_text(good)
    shard = cache_dir / "shard_00001.safetensors"
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SaesteerError, match="truncated"):
        ActivationCache(cache_dir)
    shard.unlink()
    with pytest.raises(SaesteerError, match="missing"):
        ActivationCache(cache_dir)
    # NaN in a shard: validate() finds it
    from safetensors.torch import save_file

    x = torch.zeros(json.loads(good)["shards"][1]["n_tokens"], 64)
    x[7, 3] = float("nan")
    save_file({"acts": x}, str(shard))
    c = ActivationCache(cache_dir)
    with pytest.raises(SaesteerError, match="non-finite"):
        c.validate()


def test_norm_outliers_unit():
    from saesteer.activations.collect import hist_median, norm_outliers

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 16, generator=g)  # norms ~4
    rows[7] *= 50  # a massive activation
    hist: dict[str, int] = {}
    drop = norm_outliers(rows, hist, 10.0)
    assert drop.tolist() == [i == 7 for i in range(500)]
    assert hist_median(hist) == pytest.approx(float(rows.norm(dim=-1).median()), rel=0.03)
    assert not norm_outliers(rows, {}, None).any() and not norm_outliers(rows, {}, 0).any()


def test_collect_drops_planted_massive_rows_and_resumes_the_same(tiny, tmp_path, docs_file, monkeypatch):
    """Position 1 of the first document of every batch is blown up 100x: those rows (only) are dropped and counted,
    disabled keeps them, and an interrupted run resumes to the same cache (the running median is resume state)."""
    model, tok = tiny
    real = models.run_to_layer
    calls = {"n": 0, "interrupt": 0}

    def planted(*a, **k):
        calls["n"] += 1
        if calls["n"] == calls["interrupt"]:
            raise KeyboardInterrupt
        h = real(*a, **k).clone()
        h[0, 1] *= 100
        return h

    monkeypatch.setattr(models, "run_to_layer", planted)
    kw = dict(tokens=10_000, batch_size=4)
    off = ActivationCache(collect(_cfg(tmp_path, docs_file, out=str(tmp_path / "off"), max_norm_ratio=None, **kw),
                                  model, tok))
    n_batches = calls["n"]
    on = ActivationCache(collect(_cfg(tmp_path, docs_file, out=str(tmp_path / "on"), **kw), model, tok))
    a_off, a_on = (torch.cat([c.shard(i) for i in range(c.n_shards)]) for c in (off, on))
    assert off.meta["n_excluded_norm"] == 0 and on.meta["n_excluded_norm"] == n_batches
    assert len(on) == len(off) - n_batches
    big = a_off.norm(dim=-1) > 10 * on.meta["median_norm"]
    assert int(big.sum()) == n_batches  # exactly the planted rows are outliers; every normal row is kept
    torch.testing.assert_close(a_on, a_off[~big])
    calls.update(n=0, interrupt=5)
    cfg = _cfg(tmp_path, docs_file, out=str(tmp_path / "resumed"), **kw)
    with pytest.raises(KeyboardInterrupt):
        collect(cfg, model, tok)
    calls["interrupt"] = 0
    got = ActivationCache(collect(cfg, model, tok))
    assert got.meta["n_excluded_norm"] == n_batches and len(got) == len(on)
    torch.testing.assert_close(torch.cat([got.shard(i) for i in range(got.n_shards)]), a_on)
