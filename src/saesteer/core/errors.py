"""The project's one user-facing error type and its guards."""

from __future__ import annotations


class SaesteerError(Exception):
    """A user-facing error: bad input, a missing file, a mismatch. Printed as one line, never as a traceback."""


class SaesteerWarning(UserWarning):
    """A user-facing warning (the run goes on): printed by the CLI as one ``saesteer: warning: …`` line."""


def ensure(cond: bool, msg: str) -> None:
    """Raise :class:`SaesteerError` with ``msg`` unless ``cond`` holds."""
    if not cond:
        raise SaesteerError(msg)


def require_package(module: str, why: str, pip_name: str | None = None) -> None:
    """Raise :class:`SaesteerError` naming ``pip install …`` unless ``module`` can be imported."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise SaesteerError(f"{why} needs the Python package {pip_name or module!r}, which is not installed: "
                            f"pip install {pip_name or module}")
