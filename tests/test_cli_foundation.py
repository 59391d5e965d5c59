"""CLI: ``saesteer models``, ``saesteer collect``, ``saesteer data show`` and their error paths (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

from saesteer import models


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "saesteer", *args], capture_output=True, text=True, env=e, timeout=300)


def in_process(*args: str, monkeypatch=None):
    """Run ``saesteer.cli.main`` in this process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from saesteer.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    """Exactly one error line, no traceback (transformers' own "Loading weights" progress bar may precede it)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("saesteer:")]
    assert len(lines) == 1 and lines[0].startswith("saesteer: error: "), err
    return lines[0]


def test_models_json_and_table():
    code, out, _ = in_process("models", "--json")
    assert code == 0
    rows = json.loads(out)
    names = {r["name"] for r in rows}
    assert {"qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"} <= names
    assert all({"params", "licence", "source", "cached", "size_gib"} <= set(r) for r in rows)
    code, out, _ = in_process("models")
    assert code == 0 and "smollm2-135m-instruct" in out and "cached" in out


def test_data_show(data_root):
    code, out, _ = in_process("data", "show", "xstest-unsafe", "--limit", "2")
    assert code == 0 and "200 items" in out and "harmful" in out
    code, out, _ = in_process("data", "show", "hh-harmless", "--limit", "1", "--json")
    row = json.loads(out.strip())
    assert row["messages"][0]["role"] == "user"


def test_data_show_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 1}\n{oops\n')
    code, _, err = in_process("data", "show", str(bad))
    assert code == 2 and "line 2" in one_error_line(err)
    empty = tmp_path / "e.csv"
    empty.write_text("")
    code, _, err = in_process("data", "show", str(empty))
    assert code == 2 and "empty" in one_error_line(err)


def test_collect_end_to_end_and_resume_message(tiny_dir, tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"text": f"the quick brown fox jumps over the lazy dog {i}"}) + "\n" for i in range(20)))
    out = tmp_path / "acts"
    args = ("collect", "--model", str(tiny_dir), "--layer", "0", "--data", str(docs), "--tokens", "100", "--out", str(out),
            "--batch-size", "4", "--threads", "1", "--dtype", "float16")
    code, stdout, err = in_process(*args)
    assert code == 0, err
    assert "100 tokens x 64 (layer 0, float16)" in stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["n_tokens"] == 100 and meta["model"] == str(tiny_dir)
    code, stdout, _ = in_process(*args)  # already complete: a no-op that reports the same cache
    assert code == 0 and "100 tokens" in stdout
    code, _, err = in_process(*[a if a != "0" else "1" for a in args])
    assert code == 2 and "different collection" in one_error_line(err)


def test_collect_errors_leave_nothing(tiny_dir, tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"text": "hello world"}) + "\n")
    out = tmp_path / "acts"
    base = ["collect", "--model", str(tiny_dir), "--data", str(docs), "--out", str(out), "--tokens", "10"]
    code, _, err = in_process(*base, "--layer", "7")
    assert code == 2 and "layer 7 is out of range" in one_error_line(err) and not out.exists()
    code, _, err = in_process("collect", "--model", "no-such-model", "--layer", "0", "--out", str(out))
    assert code == 2 and "unknown model" in one_error_line(err) and not out.exists()
    (tmp_path / "e.jsonl").write_text("")
    code, _, err = in_process(*base[:4], str(tmp_path / "e.jsonl"), *base[5:], "--layer", "0")
    assert code == 2 and "empty" in one_error_line(err) and not out.exists()
    (tmp_path / "m.jsonl").write_text("{broken\n")
    code, _, err = in_process(*base[:4], str(tmp_path / "m.jsonl"), *base[5:], "--layer", "0")
    assert code == 2 and "line 1" in one_error_line(err) and not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = in_process(*base[:6], str(blocker / "sub"), *base[7:], "--layer", "0")
    assert code == 2 and "cannot write" in one_error_line(err)
    code, _, err = in_process(*base, "--layer", "0", "--dtype", "int8")
    assert code == 2 and "dtype" in one_error_line(err) and not out.exists()


def test_checksum_mismatch_via_cli(tmp_path):
    """A built-in whose assembled GGUF has the wrong sha256 is refused: one line, exit 2, nothing left in the cache."""
    code = (
        "import sys, pathlib, types\n"
        "from saesteer import models\n"
        "from saesteer.cli import main\n"
        "pkg = pathlib.Path(sys.argv[1]) / 'fakepkg'; (pkg / 'data').mkdir(parents=True)\n"
        "(pkg / '__init__.py').write_text(''); (pkg / 'data' / 'part01.bin').write_bytes(b'GGUF' + b'0' * 60)\n"
        "(pkg / 'data' / 'part02.bin').write_bytes(b'1' * 64)\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "models.BUILTIN_MODELS['fake'] = models.BuiltinModel(name='fake', hf_id='x/y', params='1', licence='MIT',"
        " packages=('fakepkg==1',), files=(('fakepkg', 'data/part01.bin'), ('fakepkg', 'data/part02.bin')), sha256='0' * 64)\n"
        "main(['collect', '--model', 'fake', '--layer', '0', '--out', sys.argv[1] + '/acts'])\n"
    )
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "SAESTEER_CACHE": str(cache)})
    assert r.returncode == 2
    assert "checksum mismatch for fake" in one_error_line(r.stderr)
    assert not (tmp_path / "acts").exists()
    assert not list((cache / "gguf").glob("*"))  # no half-assembled file left


def test_cli_subprocess_error_is_one_line(tmp_path):
    r = run_cli("data", "show", str(tmp_path / "missing.csv"))
    assert r.returncode == 2 and "data file not found" in one_error_line(r.stderr)
    assert models.DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct"


def test_cli_warning_is_one_line(monkeypatch):
    """A SaesteerWarning from a command is one 'saesteer: warning:' line and the command still succeeds; Python's
    warning format is restored after the call."""
    import warnings

    import saesteer.steering as steering
    from saesteer.core import SaesteerWarning

    real = steering.list_presets

    def warn_then_list():
        warnings.warn("the SAE was trained on the base model 'x'", SaesteerWarning, stacklevel=2)
        return real()

    fmt = warnings.formatwarning
    monkeypatch.setattr(steering, "list_presets", warn_then_list)
    with warnings.catch_warnings():  # shown as Python shows them outside pytest (which records them instead)
        warnings.simplefilter("default")
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line))
        code, out, err = in_process("presets", "--json")
    assert code == 0 and json.loads(out)
    assert err.strip() == "saesteer: warning: the SAE was trained on the base model 'x'"
    assert warnings.formatwarning is fmt
    with warnings.catch_warnings(record=True) as seen:  # other warnings keep Python's format; pytest still records
        warnings.simplefilter("always")
        monkeypatch.setattr(steering, "list_presets", lambda: [warnings.warn("plain", UserWarning, stacklevel=2), real()][1])
        code, _, err = in_process("presets", "--json")
    assert code == 0 and err == "" and [str(w.message) for w in seen] == ["plain"]
