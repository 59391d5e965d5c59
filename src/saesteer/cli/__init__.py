"""Command-line entry point: ``saesteer COMMAND``.

Every failure a user can cause or meet ends as one ``saesteer: error: …`` line on stderr and exit code 2 — a
:class:`~saesteer.core.SaesteerError` with its own message, anything else with its type, first line and what to do.
``SAESTEER_DEBUG=1`` or ``saesteer --debug COMMAND`` shows the traceback instead. A
:class:`~saesteer.core.SaesteerWarning` (the run goes on) is one ``saesteer: warning: …`` line.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Callable

import typer

from saesteer.core import SaesteerError, SaesteerWarning

from ._app import app, eval_app  # noqa: F401

# One module per pipeline stage adds its commands.
_STAGES = ("foundation", "sae", "steer", "features", "evals", "sweep", "policy", "serve", "demo", "presets")
for _stage in _STAGES:
    importlib.import_module(f"{__name__}.{_stage}")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show the traceback of an error (also SAESTEER_DEBUG=1)")) -> None:
    """Steer chat models to refuse harmful requests with SAE features, and measure what it costs."""
    _debug_flag[0] = debug


_debug_flag = [False]  # set by --debug for the current main() call only


def debug_enabled() -> bool:
    return _debug_flag[0] or os.environ.get("SAESTEER_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def describe_error(e: BaseException) -> str:
    """One line for an exception that escaped a command: what happened and what to do."""
    if isinstance(e, SaesteerError):
        return str(e).strip().replace("\n", " ")
    if isinstance(e, ModuleNotFoundError) and e.name:
        pkg = e.name.split(".")[0]
        return f"the Python package {pkg!r} is not installed: pip install {pkg} (or reinstall saesteer)"
    if isinstance(e, MemoryError):
        return "out of memory: lower --batch-size / --limit, or use a machine with more memory"
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    return (f"{type(e).__name__}: {first} (unexpected; rerun with SAESTEER_DEBUG=1 or --debug for the traceback "
            "and report it)")


def _warning_line(fallback: Callable[..., str]) -> Callable[..., str]:
    """A ``warnings.formatwarning``: our warnings as one ``saesteer: warning: …`` line, others by ``fallback``."""
    def fmt(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
        if issubclass(category, SaesteerWarning):
            return f"saesteer: warning: {message}\n"
        return fallback(message, category, filename, lineno, line)

    return fmt


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Returns 0 on success; exits with typer's code on usage errors and with 2 on any error."""
    _debug_flag[0] = False
    fmt = warnings.formatwarning
    warnings.formatwarning = _warning_line(fmt)
    try:
        rv = app(args=argv, standalone_mode=False)  # usage errors and Ctrl-C come back as click exceptions
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code:
            raise SystemExit(code) from None
        return 0
    except typer.Exit as e:
        if isinstance(e.__cause__, KeyboardInterrupt):  # typer turns Ctrl-C into a silent Exit(130)
            print("saesteer: interrupted", file=sys.stderr)
        if e.exit_code:
            sys.exit(e.exit_code)
        return 0
    except typer.TyperException as e:  # usage errors: the parser's message and its exit code (2)
        if hasattr(e, "show"):
            e.show()
        else:
            print(f"saesteer: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print("saesteer: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one place where every error becomes one line
        if debug_enabled():
            raise
        print(f"saesteer: error: {describe_error(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        warnings.formatwarning = fmt
    if isinstance(rv, int) and rv:  # typer returns Ctrl-C as exit code 130 when not in standalone mode
        if rv == 130:
            print("saesteer: interrupted", file=sys.stderr)
        sys.exit(rv)
    return 0


if __name__ == "__main__":
    main()
