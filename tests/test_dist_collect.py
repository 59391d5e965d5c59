"""Distributed activation collection: 2 CPU processes under torchrun (gloo) write one cache whose rows are exactly
those of a 1-process collection; a rank killed mid-run resumes its own part; ranks with different settings stop
with one clear error (in-process, with rank 1 simulated); the global --tokens budget is split across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saesteer.activations import ActivationCache, CollectConfig, collect
from saesteer.core import SaesteerError
from saesteer.core.dist import share
from test_activations import DOCS

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


# Runs the CLI like `-m saesteer`; test knobs: rank 1 dies (os._exit, no cleanup: a hard kill) when it starts its
# forward pass number KILL_AFTER + 1; RANK1_EXTRA appends arguments on rank 1 only.
WRAPPER = """
import os, sys
from saesteer import models as m
from saesteer.cli import main
rank = int(os.environ["RANK"])
after = int(os.environ.get("KILL_AFTER", "0"))
if rank == 1 and after:
    real, calls = m.run_to_layer, [0]
    def dying(*a, **k):
        calls[0] += 1
        if calls[0] > after:
            os._exit(137)
        return real(*a, **k)
    m.run_to_layer = dying
extra = os.environ.get("RANK1_EXTRA", "").split() if rank == 1 else []
main(sys.argv[1:] + extra)
"""


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """(tiny model folder, docs file, wrapper script) shared by the tests of this module."""
    model, tok = tiny
    d = tmp_path_factory.mktemp("distcollect")
    model.save_pretrained(d / "tiny")
    tok.save_pretrained(d / "tiny")
    docs = d / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i, t in enumerate(DOCS)))
    (d / "wrap.py").write_text(WRAPPER)
    return d / "tiny", docs, d / "wrap.py"


def _args(setup, out: Path, tokens: int = 100_000) -> list[str]:
    mdir, docs, _ = setup
    return ["collect", "--model", str(mdir), "--layer", "1", "--data", str(docs), "--tokens", str(tokens),
            "--out", str(out), "--batch-size", "4", "--context-len", "64", "--shard-tokens", "150", "--threads", "1"]


def _torchrun(setup, args: list[str], **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "SAESTEER_THREADS": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(setup[2]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


def _by_doc(cache: ActivationCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(acts, token_ids, doc_ids) of the whole cache ordered by document (a document's rows come from one forward
    pass and stay in order, so a stable sort by doc id lines two collections of the same documents up row by row)."""
    acts = torch.cat([cache.shard(i).float() for i in range(cache.n_shards)])
    tids = torch.cat([cache.shard_tensor(i, "token_ids") for i in range(cache.n_shards)])
    dids = torch.cat([cache.shard_tensor(i, "doc_ids") for i in range(cache.n_shards)])
    order = torch.sort(dids, stable=True).indices
    return acts[order], tids[order], dids[order]


def test_share_splits_the_budget():
    assert [share(301, r, 2) for r in range(2)] == [151, 150]
    assert [share(10, r, 4) for r in range(4)] == [3, 3, 2, 2] and sum(share(7, r, 3) for r in range(3)) == 7


def test_two_ranks_killed_then_resumed_equal_one_process(setup, tmp_path):
    from saesteer.sae import TrainConfig, train

    mdir, docs, _ = setup
    single = ActivationCache(collect(CollectConfig(model=str(mdir), layer=1, data=str(docs), tokens=100_000,
                                                   out=str(tmp_path / "one"), batch_size=4, context_len=64,
                                                   shard_tokens=150, threads=1, progress=False)))
    out = tmp_path / "two"
    # rank 1 dies in its 4th forward pass: after its first shard (2 batches of ~80 rows >= 150), before its last
    p = _torchrun(setup, _args(setup, out), KILL_AFTER="3")
    assert p.returncode != 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] is False and meta["world_size"] == 2
    with pytest.raises(SaesteerError, match="incomplete"):
        ActivationCache(out)
    r1 = json.loads((out / "rank_001.json").read_text())
    assert len(r1["shards"]) == 1 and r1["shards"][0]["file"] == "shard_r001_00000.safetensors"
    first = (out / "shard_r001_00000.safetensors").read_bytes()
    before = sorted(f.name for f in out.iterdir())
    p = _torchrun(setup, _args(setup, out), RANK1_EXTRA="--seed 1")  # ranks disagree: both stop, nothing touched
    assert p.returncode != 0
    assert "saesteer: error: processes disagree on the collect settings (seed=1 on rank 1 vs 0 on rank 0)" in p.stderr
    assert "terminate called" not in p.stderr  # the ranks exit with the CLI's code, not an abort
    assert sorted(f.name for f in out.iterdir()) == before and json.loads((out / "meta.json").read_text()) == meta
    with pytest.raises(SaesteerError, match="collected by 2 process"):  # one process cannot continue it
        collect(CollectConfig(model=str(mdir), layer=1, data=str(docs), tokens=100_000, out=str(out), batch_size=4,
                              context_len=64, shard_tokens=150, threads=1, progress=False))

    p = _torchrun(setup, _args(setup, out))  # the same command resumes
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("tokens x 64") == 1  # rank 0 reports for both
    two = ActivationCache(out)
    assert two.meta["complete"] and two.meta["exhausted"] and two.meta["world_size"] == 2
    assert {s["file"][:10] for s in two.meta["shards"]} == {"shard_r000", "shard_r001"}
    assert (out / "shard_r001_00000.safetensors").read_bytes() == first  # resumed after it, not redone
    assert len(two) == len(single) == sum(r["n_tokens"] for r in two.meta["ranks"])
    a2, t2, d2 = _by_doc(two)
    a1, t1, d1 = _by_doc(single)
    assert torch.equal(d2, d1) and torch.equal(t2, t1)
    torch.testing.assert_close(a2, a1)
    assert two.validate()["n_tokens"] == len(single)
    # `saesteer train` reads it unchanged
    sae = train(TrainConfig(acts=str(out), out=str(tmp_path / "sae"), k=4, num_latents=32, batch_size=100, steps=3,
                            threads=1, progress=False))
    assert sae is not None and (tmp_path / "sae" / "saesteer.json").exists()


def _fake_world(monkeypatch, other):
    """Rank 0 of a 2-process world whose rank 1 passes ``other(obj)`` to every agreement check."""
    from saesteer.core import dist as dist

    monkeypatch.setattr(dist, "setup", lambda device: (0, 2, "cpu"))
    monkeypatch.setattr(dist, "gather", lambda obj, world: [obj, other(obj)])
    monkeypatch.setattr(dist, "barrier", lambda world: None)
    monkeypatch.setattr(dist, "on_rank0", lambda fn, rank, world: fn())
    monkeypatch.setattr(dist, "teardown", lambda world: None)


def test_rank_takes_its_share_of_the_budget_and_every_other_batch(tiny, setup, tmp_path, monkeypatch):
    from saesteer.activations.collect import _plan

    model, tok = tiny
    cfg = CollectConfig(model="tiny", layer=1, data=str(setup[1]), tokens=301, out=str(tmp_path / "a"), batch_size=4,
                        context_len=64, shard_tokens=150, progress=False)
    _fake_world(monkeypatch, lambda o: o)
    collect(cfg, model, tok)
    state = json.loads((tmp_path / "a" / "rank_000.json").read_text())
    assert state["n_tokens"] == share(301, 0, 2) == 151 and state["world_size"] == 2
    c = ActivationCache(tmp_path / "a")  # the fake rank 1 reported rank 0's state again: 2 x 151 rows
    assert len(c) == 302 and c.meta["shards"][0]["file"].startswith("shard_r000_")
    docs = [(json.loads(x)["text"], False) for x in setup[1].read_text().splitlines()]
    batches = _plan(cfg, tok, docs)[1]
    mine = {d for b in batches[0::2][: state["next_batch"]] for d in b}
    got = {int(d) for i in range(c.n_shards) for d in c.shard_tensor(i, "doc_ids")}
    assert got <= mine and len(mine - got) < cfg.batch_size  # rank 0's batches only (the last one may be cut short)


def test_mismatched_ranks_stop_with_one_clear_error(tiny, setup, tmp_path, monkeypatch):
    model, tok = tiny
    cfg = CollectConfig(model="tiny", layer=1, data=str(setup[1]), tokens=300, out=str(tmp_path / "a"), batch_size=4,
                        context_len=64, shard_tokens=150, progress=False)
    _fake_world(monkeypatch, lambda o: {**o, "seed": 1} if isinstance(o, dict) else o)
    with pytest.raises(SaesteerError, match=r"disagree on the collect settings \(seed=1 on rank 1 vs 0 on rank 0\)"):
        collect(cfg, model, tok)
    assert not (tmp_path / "a").exists()  # checked before anything is written
    _fake_world(monkeypatch, lambda o: "another digest" if isinstance(o, str) else o)
    with pytest.raises(SaesteerError, match="disagree on the tokenized documents"):
        collect(cfg, model, tok)
    assert not (tmp_path / "a").exists()  # nothing collected yet: the folder it made is gone again
