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
    import click

    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except SaesteerError as e:
        print(f"saesteer: error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("saesteer: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("saesteer: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    return 0


if __name__ == "__main__":
    main()
