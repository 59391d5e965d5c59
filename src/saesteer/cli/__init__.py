"""Command-line entry point: ``saesteer COMMAND``. Errors print one line on stderr and exit with code 2."""

from __future__ import annotations

import importlib
import sys

from ..utils import SaesteerError
from ._app import app, eval_app  # noqa: F401

# One module per pipeline stage adds its commands; a stage not installed yet is skipped.
_STAGES = ("foundation", "sae", "steer", "features", "evals", "sweep", "policy", "serve", "demo")
for _stage in _STAGES:
    try:
        importlib.import_module(f"{__name__}.{_stage}")
    except ModuleNotFoundError as _e:  # only tolerate the stage module itself being absent
        if _e.name != f"{__name__}.{_stage}":
            raise


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Returns 0 on success; exits with typer's code on usage errors and with 2 on a SaesteerError."""
    try:
        app(args=argv, standalone_mode=True)  # typer handles --help, usage errors, Ctrl-C
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code:
            raise SystemExit(code) from None
        return 0
    except SaesteerError as e:
        print(f"saesteer: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("saesteer: interrupted", file=sys.stderr)
        sys.exit(130)
    return 0


if __name__ == "__main__":
    main()
