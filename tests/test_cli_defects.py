"""Issue 18 §4 (CLI): output paths are checked before any work, ``--layer -1`` is stored as the absolute layer,
``metrics.jsonl`` has no repeated steps after a resume, ``--threads`` < 1 and Ctrl-C are one line each."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from saesteer.core import SaesteerError, check_output_path
from test_cli_foundation import in_process, one_error_line


@pytest.fixture()
def no_work(monkeypatch):
    """Record any model load (the start of a command's work) instead of doing it."""
    import saesteer.models
    import saesteer.models.load

    calls: list[str] = []

    def _load(name, *a, **kw):
        calls.append(str(name))
        raise SaesteerError("load_model was called")

    monkeypatch.setattr(saesteer.models, "load_model", _load)
    monkeypatch.setattr(saesteer.models.load, "load_model", _load)
    return calls


# ------------------------------------------------------------------------------------- output paths, before work
_X = "missing-input"  # inputs need not exist: the output path is checked first
WRITERS = {
    "collect": ["collect", "--layer", "0", "--out", "{bad}"],
    "train": ["train", "--acts", _X, "--out", "{bad}"],
    "sae-eval": ["sae-eval", "--model", "m", "--sae", _X, "--data", "d", "--out", "{bad}"],
    "eval refusal": ["eval", "refusal", "--out", "{bad}"],
    "eval capability": ["eval", "capability", "--out", "{bad}"],
    "eval multiturn": ["eval", "multiturn", "--out", "{bad}"],
    "eval judges": ["eval", "judges", "--out", "{bad}"],
    "features": ["features", "--sae", _X, "--out", "{bad}"],
    "inspect": ["inspect", "--sae", _X, "--features", "1", "--data", "d", "--out", "{bad}"],
    "sweep": ["sweep", "--out", "{bad}"],
    "compare": ["compare", "--out", "{bad}"],
    "policy fit": ["policy", "fit", "--out", "{bad}"],
    "direction": ["direction", "--out", "{bad}"],
    "report": ["report", _X, "--out", "{bad}"],
    "sae export": ["sae", "export", _X, "{bad}", "--to", "saelens"],
    "sae import": ["sae", "import", _X, "{bad}"],
    "demo": ["demo", "--out", "{bad}"],
    "data fetch": ["data", "fetch", "xstest", "--dest", "{bad}"],
}
FILE_OUTPUTS = {"sae-eval", "eval judges", "policy fit", "direction"}


@pytest.mark.parametrize("cmd", sorted(WRITERS))
def test_uncreatable_out_fails_before_work(cmd, tmp_path, no_work, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    t0 = time.perf_counter()
    code, _, err = in_process(*[a.replace("{bad}", str(blocker / "sub" / "out")) for a in WRITERS[cmd]])
    line = one_error_line(err)
    assert code == 2 and "cannot write" in line and "a-file" in line, line
    assert no_work == [] and time.perf_counter() - t0 < 10
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing left behind


@pytest.mark.parametrize("cmd", sorted(WRITERS))
def test_wrong_kind_of_out_fails_before_work(cmd, tmp_path, no_work, monkeypatch):
    """A folder where a file is written (sae-eval / direction / ...) or a file where a folder is, is one line."""
    monkeypatch.chdir(tmp_path)
    if cmd in FILE_OUTPUTS:
        target = tmp_path / "a-folder"
        target.mkdir()
        want = "is a folder"
    else:
        target = tmp_path / "a-file"
        target.write_text("x")
        want = "is not a folder"
    code, _, err = in_process(*[a.replace("{bad}", str(target)) for a in WRITERS[cmd]])
    assert code == 2 and want in one_error_line(err) and no_work == []


def test_check_output_path_leaves_nothing(tmp_path):
    assert check_output_path(tmp_path / "x" / "y") == tmp_path / "x" / "y"
    assert check_output_path(tmp_path / "f.json", "file") == tmp_path / "f.json"
    assert check_output_path(None) is None
    assert list(tmp_path.iterdir()) == []  # probes removed, nothing created
    (tmp_path / "f").write_text("")
    with pytest.raises(SaesteerError, match="is a file, not a folder"):
        check_output_path(tmp_path / "f" / "x.json", "file")


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_below_one_is_one_line(threads, tmp_path, no_work):
    code, _, err = in_process("collect", "--layer", "0", "--out", str(tmp_path / "a"), "--threads", threads)
    assert code == 2 and "--threads" in one_error_line(err) and no_work == []


# ------------------------------------------------------------------------------------- --layer -1
def test_negative_layer_is_stored_absolute(tiny_dir, tmp_path):
    from saesteer.sae import load_sae

    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"text": f"the quick brown fox jumps over the lazy dog {i}"}) + "\n"
                            for i in range(20)))
    acts = tmp_path / "acts"
    base = ["collect", "--model", str(tiny_dir), "--data", str(docs), "--tokens", "100", "--out", str(acts),
            "--batch-size", "4", "--threads", "1"]
    code, out, err = in_process(*base, "--layer", "-1")  # the tiny model has 2 layers: -1 is layer 1
    assert code == 0, err
    meta = json.loads((acts / "meta.json").read_text())
    assert meta["layer"] == 1 and meta["config"]["layer"] == 1 and meta["hook_name"] == "model.layers.1"
    assert "(layer 1," in out
    for again in ("1", "-1"):  # the same collection, named either way: accepted (already complete)
        code, out, err = in_process(*base, "--layer", again)
        assert code == 0 and "100 tokens" in out, err
    code, _, err = in_process(*base, "--layer", "0")
    assert code == 2 and "different collection" in one_error_line(err)
    train = ["train", "--acts", str(acts), "--k", "4", "--num-latents", "32", "--batch-size", "20", "--steps", "3",
             "--threads", "1", "--no-progress"]
    for layer in ("-1", "1"):
        code, _, err = in_process(*train, "--layer", layer, "--out", str(tmp_path / f"sae{layer}"))
        assert code == 0, err
        assert load_sae(tmp_path / f"sae{layer}").cfg.layer == 1
    code, _, err = in_process(*train, "--layer", "-2", "--out", str(tmp_path / "sae-2"))
    assert code == 2 and "not layer -2" in one_error_line(err)


def test_same_layer_on_caches_before_n_layers():
    from saesteer.activations import same_layer

    old = {"layer": 29, "config": {"layer": -1}}  # collected with --layer -1 before the fix
    assert same_layer(old, -1) and same_layer(old, 29) and not same_layer(old, 28) and not same_layer(old, -2)
    new = {"layer": 29, "n_layers": 30, "config": {"layer": 29}}
    assert same_layer(new, -1) and same_layer(new, 29) and not same_layer(new, -2) and not same_layer(new, -31)


# ------------------------------------------------------------------------------------- metrics after resume
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from test_train import synthetic_acts, write_cache

    return write_cache(tmp_path_factory.mktemp("acts") / "c", synthetic_acts(6000))


def _steps(out: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()]


def test_metrics_not_repeated_after_crash_and_resume(cache, tmp_path, monkeypatch):
    import saesteer.sae.trainer as tr
    from saesteer.sae import TrainConfig, train

    cfg = TrainConfig(acts=str(cache), out=str(tmp_path / "o"), k=4, num_latents=64, batch_size=200, lr=3e-3,
                      warmup_steps=5, steps=30, checkpoint_every=20, progress=False, threads=1)
    real = tr._lr_factor

    def crash(step, *a):
        if step == 25:  # after the metrics line of step 20 and the checkpoint at 20
            raise RuntimeError("simulated crash")
        return real(step, *a)

    monkeypatch.setattr(tr, "_lr_factor", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        train(replace(cfg, steps=30, checkpoint_every=10))  # metrics 10, 20; checkpoint 10, 20
    monkeypatch.setattr(tr, "_lr_factor", real)
    metrics = tmp_path / "o" / "checkpoints" / "metrics.jsonl"
    assert _steps(tmp_path / "o") == [10, 20]
    # a checkpoint older than the last metrics line (killed between them) and a torn last line
    state = tr.load_checkpoint(tmp_path / "o" / "checkpoints" / "state.pt")
    assert state["step"] == 20
    metrics.write_text(metrics.read_text() + '{"step": 30, "fvu": 0.1}\n{"step": 4')
    train(replace(cfg, checkpoint_every=10, resume=True))
    steps = _steps(tmp_path / "o")
    assert steps == [10, 20, 30], steps


def test_ctrl_c_during_train_prints_interrupted_and_resume_has_unique_steps(cache, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "saesteer", "train", "--acts", str(cache), "--out", str(out), "--k", "4",
           "--num-latents", "64", "--batch-size", "200", "--lr", "3e-3", "--warmup-steps", "5", "--steps", "3000",
           "--checkpoint-every", "20", "--threads", "1", "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ck = out / "checkpoints" / "state.pt"
    deadline = time.time() + 120
    while not ck.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a few more metrics lines after the checkpoint
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    if (out / "saesteer.json").exists():
        pytest.skip("the run finished before it could be interrupted")
    assert p.returncode == 130 and "saesteer: interrupted" in err and "Traceback" not in err, err
    from saesteer.sae.trainer import load_checkpoint

    at = int(load_checkpoint(ck)["step"])
    assert _steps(out)[-1] >= at  # metrics were written past the checkpoint: a resume would repeat them
    subprocess.run([*cmd, "--resume", "--stop-at-step", str(at + 30)], check=True, capture_output=True, timeout=300)
    steps = _steps(out)
    assert steps == sorted(set(steps)) and steps[-1] == at + 30, steps


def test_sae_import_refuses_negative_layer(tmp_path):
    """No model to count layers from: ``sae import --layer -1`` would record -1 (\"unknown\"); it is one error line."""
    from saesteer.sae import SAEConfig, TopKSAE, export_saelens, load_sae

    s = TopKSAE(SAEConfig(d_in=16, num_latents=32, k=4, model="tiny", layer=1, hook_name="model.layers.1"), seed=0)
    export_saelens(s, tmp_path / "sl")
    code, _, err = in_process("sae", "import", str(tmp_path / "sl"), str(tmp_path / "back"), "--layer", "-1")
    assert code == 2 and "absolute layer" in one_error_line(err) and not (tmp_path / "back").exists()
    code, _, err = in_process("sae", "import", str(tmp_path / "sl"), str(tmp_path / "back"), "--layer", "0")
    assert code == 0, err
    assert load_sae(tmp_path / "back").cfg.layer == 0
