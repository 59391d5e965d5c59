"""Small shared helpers: the project's error type, atomic writes, threads, seeds, intervals.

Every stage raises :class:`SaesteerError` for bad input; the CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


class SaesteerError(Exception):
    """A user-facing error: bad input, a missing file, a mismatch. Printed as one line, never as a traceback."""


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


# --------------------------------------------------------------------------------------------- atomic writes
def _check_writable_dir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SaesteerError(f"cannot create output directory {d}: {e.strerror or e}") from None
    if not os.access(d, os.W_OK):
        raise SaesteerError(f"output directory {d} is not writable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename."""
    path = Path(path)
    _check_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path``, on failure it is removed.

    Use it for artifacts made of several files (an SAE folder, a report) so that a reader never sees half of one.
    """
    path = Path(path)
    _check_writable_dir(path.parent if str(path.parent) else Path("."))
    if path.exists() and not overwrite:
        raise SaesteerError(f"{path} exists (pass --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.exists():
        raise SaesteerError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaesteerError(f"{what} {path} is not valid JSON: {e}") from None


# --------------------------------------------------------------------------------------------- runtime settings
def set_threads(num_threads: int | None = None, interop_threads: int | None = None) -> int:
    """Set torch's intra-op (and, once per process, inter-op) thread counts.

    ``None`` reads ``SAESTEER_THREADS`` / ``SAESTEER_INTEROP_THREADS`` and otherwise leaves torch's default.
    Returns the intra-op thread count in force.
    """
    import torch

    if num_threads is None and os.environ.get("SAESTEER_THREADS"):
        num_threads = int(os.environ["SAESTEER_THREADS"])
    if interop_threads is None and os.environ.get("SAESTEER_INTEROP_THREADS"):
        interop_threads = int(os.environ["SAESTEER_INTEROP_THREADS"])
    if num_threads:
        torch.set_num_threads(int(num_threads))
    if interop_threads:
        with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
            torch.set_num_interop_threads(int(interop_threads))
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str | None) -> str:
    """``auto`` / ``None`` → cuda when available, else cpu; anything else is checked and passed through."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaesteerError(f"--device {device} asked for, but CUDA is not available on this machine")
    return device


# --------------------------------------------------------------------------------------------- statistics
def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for ``k`` successes out of ``n`` (``(nan, nan)`` when n = 0)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval always contains p (float rounding can put centre + half a hair below p = 1)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def rate_summary(k: int, n: int) -> dict[str, float | int]:
    """``{"rate", "k", "n", "ci_low", "ci_high"}`` for a proportion, the shape every eval summary uses."""
    lo, hi = wilson_interval(k, n)
    return {"rate": (k / n) if n else float("nan"), "k": int(k), "n": int(n), "ci_low": lo, "ci_high": hi}


def diff_interval(k1: int, n1: int, k2: int, n2: int, z: float = 1.959964) -> tuple[float, float, float]:
    """Difference of two proportions p1 - p2 with Newcombe's hybrid-score 95 % interval (method 10)."""
    if n1 <= 0 or n2 <= 0:
        return (float("nan"), float("nan"), float("nan"))
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (d, lo, hi)
