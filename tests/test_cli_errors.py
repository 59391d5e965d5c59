"""Every error that escapes a command is one ``saesteer: error:`` line and exit code 2; ``--debug`` shows the
traceback; Ctrl-C prints "interrupted". The GGUF path is driven with ``accelerate`` hidden (the fresh-clone failure)."""

from __future__ import annotations

import sys

import pytest

from saesteer.cli import app, main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    err = capsys.readouterr().err
    return ei.value.code, err


def test_gguf_conversion_without_accelerate_is_one_line(tmp_path, monkeypatch, capsys):

    from saesteer.models import builtin_installed

    if not builtin_installed("smollm2-135m-instruct"):
        pytest.skip("built-in SmolLM2 package not installed")
    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path / "cache"))  # empty cache: the model must be converted
    monkeypatch.delenv("SAESTEER_DEBUG", raising=False)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as on a base install that lacks it
    code, err = _run(["generate", "--model", "smollm2-135m-instruct", "--max-new-tokens", "2", "hi"], capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("saesteer: error:"), err
    assert "pip install accelerate" in lines[0]
    assert "Traceback" not in err
    conv = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert not (conv / "config.json").exists()  # nothing half-converted left behind


def test_gguf_file_without_accelerate(tmp_path, monkeypatch, capsys):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "accelerate", None)
    code, err = _run(["generate", "--model", str(f), "hi"], capsys)
    assert code == 2 and "pip install accelerate" in err and err.count("\n") == 1


def test_garbage_gguf_is_one_line(tmp_path, capsys):
    f = tmp_path / "garbage.gguf"
    f.write_text("not a gguf file\n")
    code, err = _run(["generate", "--model", str(f), "hi"], capsys)
    assert code == 2 and err.startswith("saesteer: error:") and err.count("\n") == 1, err
    assert "garbage.gguf" in err


@pytest.fixture()
def boom_command():
    """A throw-away command that raises what the test asks for (removed afterwards)."""
    state = {}

    @app.command("zz-boom", hidden=True)
    def _boom(kind: str) -> None:
        raise state["exc"](kind)

    yield state
    app.registered_commands[:] = [c for c in app.registered_commands if c.name != "zz-boom"]


def test_unexpected_exception_is_one_line(boom_command, monkeypatch, capsys):
    monkeypatch.delenv("SAESTEER_DEBUG", raising=False)
    boom_command["exc"] = RuntimeError
    code, err = _run(["zz-boom", "kaput\nsecond line"], capsys)
    assert code == 2
    assert err == "saesteer: error: RuntimeError: kaput (unexpected; rerun with SAESTEER_DEBUG=1 or --debug for " \
                  "the traceback and report it)\n"


def test_missing_module_names_pip_install(boom_command, monkeypatch, capsys):
    monkeypatch.delenv("SAESTEER_DEBUG", raising=False)

    def _missing(_):
        raise ModuleNotFoundError("No module named 'foo_pkg.sub'", name="foo_pkg.sub")

    boom_command["exc"] = _missing
    code, err = _run(["zz-boom", "x"], capsys)
    assert code == 2 and "pip install foo_pkg" in err and err.count("\n") == 1


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_traceback(boom_command, monkeypatch, how):
    boom_command["exc"] = RuntimeError
    monkeypatch.delenv("SAESTEER_DEBUG", raising=False)
    argv = ["zz-boom", "kaput"]
    if how == "env":
        monkeypatch.setenv("SAESTEER_DEBUG", "1")
    else:
        argv = ["--debug", *argv]
    with pytest.raises(RuntimeError, match="kaput"):
        main(argv)


def test_ctrl_c_prints_interrupted(boom_command, monkeypatch, capsys):
    boom_command["exc"] = lambda _: KeyboardInterrupt()
    code, err = _run(["zz-boom", "x"], capsys)
    assert code == 130 and "saesteer: interrupted" in err


def test_usage_error_exit_2(capsys):
    code, err = _run(["generate", "--no-such-option"], capsys)
    assert code == 2 and "No such option" in err
