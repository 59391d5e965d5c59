"""Runtime settings: torch threads and the device string."""

from __future__ import annotations

import contextlib
import os

from .errors import SaesteerError


def set_threads(num_threads: int | None = None, interop_threads: int | None = None) -> int:
    """Set torch's intra-op (and, once per process, inter-op) thread counts.

    ``None`` reads ``SAESTEER_THREADS`` / ``SAESTEER_INTEROP_THREADS`` and otherwise leaves torch's default.
    Returns the intra-op thread count in force.
    """
    import torch

    if num_threads is None and os.environ.get("SAESTEER_THREADS"):
        num_threads = _positive_int(os.environ["SAESTEER_THREADS"], "SAESTEER_THREADS")
    if interop_threads is None and os.environ.get("SAESTEER_INTEROP_THREADS"):
        interop_threads = _positive_int(os.environ["SAESTEER_INTEROP_THREADS"], "SAESTEER_INTEROP_THREADS")
    if num_threads is not None:
        num_threads = _positive_int(num_threads, "--threads")
    if num_threads:
        torch.set_num_threads(int(num_threads))
    if interop_threads:
        with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
            torch.set_num_interop_threads(int(interop_threads))
    return torch.get_num_threads()


def _positive_int(v: object, what: str) -> int:
    try:
        n = int(v)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise SaesteerError(f"{what} must be a whole number of threads, got {v!r}") from None
    if n < 1:
        raise SaesteerError(f"{what} must be at least 1, got {n}")
    return n


def resolve_device(device: str | None) -> str:
    """``auto`` / ``None`` → cuda when available, else cpu; anything else is checked and passed through."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaesteerError(f"--device {device} asked for, but CUDA is not available on this machine")
    return device
