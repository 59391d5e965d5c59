"""Atomic writes (temp file + rename; folders built aside and renamed into place) and JSON reading with one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import SaesteerError


def _check_writable_dir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SaesteerError(f"cannot create output directory {d}: {e.strerror or e}") from None
    if not os.access(d, os.W_OK):
        raise SaesteerError(f"output directory {d} is not writable")


def check_output_path(path: str | os.PathLike | None, kind: str = "dir", what: str = "--out") -> Path | None:
    """Check, before any work starts, that ``path`` can be written as a folder (``kind="dir"``) or a file
    (``kind="file"``): no regular file where a folder is needed (or the reverse), and the nearest existing folder
    on the way accepts new entries. Creates nothing (a probe entry is made and removed at once). Returns the path
    (``None`` passes through); raises :class:`SaesteerError` with one line naming ``what``."""
    if path is None:
        return None
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    p = Path(path).expanduser()
    if p.exists():
        if kind == "dir" and not p.is_dir():
            raise SaesteerError(f"{what} {p} exists and is not a folder")
        if kind == "file" and p.is_dir():
            raise SaesteerError(f"{what} {p} is a folder, not a file")
    probe_in = p if kind == "dir" and p.is_dir() else p.parent
    anc = probe_in
    while not anc.exists() and not anc.is_symlink() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise SaesteerError(f"cannot write {what} {p}: {anc} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=anc, prefix=".saesteer-probe."))
    except OSError as e:
        raise SaesteerError(f"cannot write {what} {p}: {anc} is not writable ({e.strerror or e})") from None
    return p


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
