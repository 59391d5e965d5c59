"""Data-parallel training: 2 CPU processes under torchrun (gloo) match 1 process with the same global batch,
including a stop + resume in the middle."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saesteer.sae import TrainConfig, load_sae, train
from test_train import synthetic_acts, write_cache

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
    from saesteer.core import SaesteerError
    from saesteer.sae import trainer as tr

    cache = write_cache(tmp_path / "c", synthetic_acts(1000))
    monkeypatch.setattr(tr, "_dist_setup", lambda device: (0, 2, "cpu"))
    with pytest.raises(SaesteerError, match="not divisible by 2 processes"):
        train(TrainConfig(acts=str(cache), out=str(tmp_path / "o"), k=4, num_latents=64, batch_size=201, steps=2,
                          progress=False))


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find torchrun's workers")
def test_kill_during_distributed_run_leaves_a_valid_checkpoint(tmp_path):
    from saesteer.sae import load_checkpoint

    cache = write_cache(tmp_path / "c", synthetic_acts(4000))
    kw = dict(k=4, num_latents=64, batch_size=200, lr=3e-3, warmup_steps=5, steps=150, checkpoint_every=10, threads=1,
              progress=False)
    single = train(TrainConfig(acts=str(cache), out=str(tmp_path / "one"), **kw))
    out = tmp_path / "two"
    args = [*ARGS, "--steps", "150", "--checkpoint-every", "10"]  # later options win
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAESTEER_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "saesteer",
           "train", "--acts", str(cache), "--out", str(out), *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ckpt = out / "checkpoints" / "state.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # torchrun starts each worker in a session of its own: SIGKILL the workers' groups and torchrun's at once
    workers = _children(p.pid)
    groups = {os.getpgid(w) for w in workers if _running(w)} | {p.pid}
    for g in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(g, signal.SIGKILL)
    p.wait(timeout=30)
    stderr = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    assert ckpt.exists(), stderr[-3000:]
    assert p.returncode == -signal.SIGKILL and len(workers) == 2, (p.returncode, workers, stderr[-3000:])
    t0 = time.monotonic()
    while any(_running(w) for w in workers) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not any(_running(w) for w in workers)
    assert not (out / "saesteer.json").exists()  # killed before the end
    state = load_checkpoint(ckpt)  # complete, loadable (written atomically)
    assert 0 < state["step"] < 150 and state["step"] % 10 == 0, state["step"]
    # resume (in one process: the checkpoint does not depend on the world size) to the end
    dp = train(TrainConfig(acts=str(cache), out=str(out), resume=True, **kw))
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 150
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(dp, name), getattr(single, name), atol=2e-4, rtol=1e-3, msg=name)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_bad_input_exit_cleanly(tmp_path):
    # both ranks fail validation after joining the process group: one clear line, no gloo abort, nothing written
    cache = write_cache(tmp_path / "c", synthetic_acts(1000))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAESTEER_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "saesteer",
           "train", "--acts", str(cache), "--out", str(tmp_path / "o"), "--k", "4", "--num-latents", "64",
           "--batch-size", "201", "--steps", "2", "--threads", "1", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0
    assert "saesteer: error: batch_size 201 is not divisible by 2 processes" in p.stderr
    assert "terminate called" not in p.stderr and "SIGABRT" not in p.stderr
    assert not (tmp_path / "o" / "saesteer.json").exists()
