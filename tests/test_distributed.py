"""Data-parallel training: 2 CPU processes under torchrun (gloo) match 1 process with the same global batch,
including a stop + resume in the middle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import synthetic_acts, write_cache

from saesteer.formats import load_sae
from saesteer.train import TrainConfig, train

ARGS = ["--k", "4", "--num-latents", "64", "--batch-size", "200", "--lr", "3e-3", "--warmup-steps", "5",
        "--steps", "20", "--checkpoint-every", "5", "--threads", "1", "--no-progress"]


def _torchrun(out, cache, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAESTEER_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "saesteer",
           "train", "--acts", str(cache), "--out", str(out), *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_match_one(tmp_path):
    cache = write_cache(tmp_path / "c", synthetic_acts(4000))
    single = train(TrainConfig(acts=str(cache), out=str(tmp_path / "one"), k=4, num_latents=64, batch_size=200,
                               lr=3e-3, warmup_steps=5, steps=20, checkpoint_every=5, threads=1, progress=False))
    p = _torchrun(tmp_path / "two", cache, "--stop-at-step", "10")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoints" / "state.pt").exists()
    assert not (tmp_path / "two" / "saesteer.json").exists()
    p = _torchrun(tmp_path / "two", cache, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 20
    dp = load_sae(tmp_path / "two")
    assert dp.input_scale == pytest.approx(single.input_scale, rel=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(dp, name), getattr(single, name), atol=2e-4, rtol=1e-3, msg=name)
    # the run really changed the weights (so the match is not trivial)
    fresh = TrainConfig(acts=str(cache), out=str(tmp_path / "z"), k=4, num_latents=64, batch_size=200, steps=1,
                        lr=1e-12, warmup_steps=1, progress=False)
    assert float((train(fresh).W_enc - single.W_enc).detach().abs().max()) > 1e-2


def test_batch_not_divisible_by_world(tmp_path, monkeypatch):
    import saesteer.train as tr
    from saesteer.utils import SaesteerError

    cache = write_cache(tmp_path / "c", synthetic_acts(1000))
    monkeypatch.setattr(tr, "_dist_setup", lambda device: (0, 2, "cpu"))
    with pytest.raises(SaesteerError, match="not divisible by 2 processes"):
        train(TrainConfig(acts=str(cache), out=str(tmp_path / "o"), k=4, num_latents=64, batch_size=201, steps=2,
                          progress=False))
