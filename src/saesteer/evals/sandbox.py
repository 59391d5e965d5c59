"""Run untrusted Python (model-written code, e.g. HumanEval completions) in a sandboxed subprocess.

Every run gets, whatever the platform offers:

- a fresh temporary working directory (deleted afterwards) and a minimal environment (``PATH``, ``LANG``, ``HOME`` =
  the temp dir; no proxies, tokens or ``PYTHON*`` variables), ``python -I`` (no user site, no ``PYTHONPATH``);
- resource limits set in the child before ``exec`` (``RLIMIT_AS`` memory, ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` file
  size, ``RLIMIT_NOFILE``, no core dumps; soft = hard so the code cannot raise them). ``RLIMIT_NPROC`` is not set: it
  counts every process of the user, not the child's; forks are stopped by the guard and killed with the group;
- its own session / process group, killed with ``SIGKILL`` at the wall-clock timeout (and by ``RLIMIT_CPU``);
- stdout / stderr written to files in the temp dir (bounded by ``RLIMIT_FSIZE``), the first 4 KB read back;
- a Python **guard** prepended to the program (best-effort, it runs in the same interpreter as the code it guards,
  so ``ctypes``-free tricks such as re-importing ``posix`` can undo it): ``socket.socket`` raises; ``os.remove /
  unlink / rmdir / rename / replace / truncate / chmod``, ``shutil.rmtree / move`` and ``open`` / ``os.open`` for
  writing raise ``PermissionError`` outside the working directory; ``os.system / fork / exec* / spawn* / kill``,
  ``subprocess.Popen`` raise; ``import ctypes`` fails.

On top of that the **isolation** layer, the best one available (``isolation="auto"``):

- ``bwrap`` (bubblewrap; ``apt-get install bubblewrap``, installed by ``make setup-dev``): real containment. The
  whole filesystem is bind-mounted read-only, ``/tmp`` is a fresh tmpfs with only the working directory writable,
  ``$HOME`` is hidden (when Python does not live under it), and the child runs in new network (no interface but
  loopback), PID, IPC, UTS and user namespaces, dying with its parent. Nothing outside the working dir can be
  deleted or written, whatever the code does.
- ``unshare`` (``unshare -rn``, util-linux, needs unprivileged user namespaces): a network namespace (no network
  at all, not best-effort); files are protected only by the guard.
- ``guard``: the guard and the limits only (documented as best-effort; use bwrap for untrusted code at scale).
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from saesteer.core import ensure

ISOLATIONS = ("auto", "bwrap", "unshare", "guard")
OUTPUT_BYTES = 4096

GUARD = r'''
def __saesteer_guard():
    import builtins, io, os, shutil, sys
    root = os.path.realpath(os.getcwd())

    def inside(p, dir_fd=None):
        if isinstance(p, int):
            return False
        try:
            p = os.fsdecode(os.fspath(p))
        except TypeError:
            return False
        if dir_fd is not None and not os.path.isabs(p):
            try:
                p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
            except OSError:
                return False
        rp = os.path.realpath(p)
        return rp == root or rp.startswith(root + os.sep)

    def deny(name):
        def f(*a, **k):
            raise PermissionError(f"sandbox: {name} is disabled")
        return f

    def paths(name, fn, n=1):
        def f(*a, **k):
            for p in a[:n]:
                if not inside(p, k.get("dir_fd") or k.get("src_dir_fd")):
                    raise PermissionError(f"sandbox: {name} outside the working directory: {p!r}")
            return fn(*a, **k)
        return f

    for n in ("remove", "unlink", "rmdir", "removedirs", "truncate", "chmod", "chown", "lchown", "mkdir",
              "makedirs", "symlink", "link", "utime"):
        if hasattr(os, n):
            setattr(os, n, paths(n, getattr(os, n), 2 if n in ("symlink", "link") else 1))
    for n in ("rename", "replace", "renames"):
        setattr(os, n, paths(n, getattr(os, n), 2))
    shutil.rmtree = paths("shutil.rmtree", shutil.rmtree)
    shutil.move = paths("shutil.move", shutil.move, 2)
    _open, _osopen = io.open, os.open
    W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing outside the working directory: {file!r}")
        return _open(file, mode, *a, **k)

    def osopen(path, flags, *a, **k):
        if flags & W and not inside(path, k.get("dir_fd")):
            raise PermissionError(f"sandbox: writing outside the working directory: {path!r}")
        return _osopen(path, flags, *a, **k)

    builtins.open = io.open = open_
    os.open = osopen
    for n in ("system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execlpe",
              "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp",
              "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setsid", "setpgid", "putenv"):
        if hasattr(os, n):
            setattr(os, n, deny(f"os.{n}"))
    import socket
    import subprocess
    socket.socket = deny("socket.socket")
    socket.create_connection = deny("socket.create_connection")
    subprocess.Popen = deny("subprocess.Popen")
    for m in ("ctypes", "_ctypes"):
        sys.modules[m] = None


__saesteer_guard()
del __saesteer_guard
'''


@dataclass
class SandboxLimits:
    """Limits of one sandboxed run."""

    timeout: float = 10.0
    """Wall-clock seconds before the process group is killed (status ``timeout``)."""
    memory_mb: int = 1024
    """Address-space limit (``RLIMIT_AS``); a larger allocation raises ``MemoryError`` in the child."""
    cpu_seconds: int | None = None
    """``RLIMIT_CPU`` (default: the timeout rounded up, + 1)."""
    file_mb: int = 16
    """Largest file the child may write (``RLIMIT_FSIZE``; stdout / stderr included)."""
    open_files: int = 256
    """``RLIMIT_NOFILE``."""


@dataclass
class SandboxResult:
    status: str
    """``passed`` (exit 0), ``failed`` (non-zero exit or killed by a signal / limit) or ``timeout``."""
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def reason(self) -> str:
        """A one-line reason: ``timeout``, the last stderr line (``AssertionError``, ``MemoryError: …``) or the code."""
        if self.status != "failed":
            return self.status
        last = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        return last[-1][:200] if last else f"exit code {self.returncode}"


def _probe(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.lru_cache(maxsize=None)
def available_isolation() -> str:
    """The strongest isolation that works here: ``bwrap``, ``unshare`` or ``guard`` (probed once per process)."""
    d = tempfile.mkdtemp(prefix="saesteer-probe-")
    try:
        if shutil.which("bwrap") and _probe(_bwrap_prefix(d) + [sys.executable, "-I", "-c", "pass"]):
            return "bwrap"
        if shutil.which("unshare") and _probe(["unshare", "-rn", sys.executable, "-I", "-c", "pass"]):
            return "unshare"
        return "guard"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _bwrap_prefix(work: str) -> list[str]:
    cmd = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    home = os.path.realpath(os.path.expanduser("~"))
    py = [os.path.realpath(p) for p in (sys.executable, sys.prefix, sys.base_prefix)]
    if home not in ("/", "/tmp") and os.path.isdir(home) and not any(p.startswith(home + os.sep) for p in py):
        cmd += ["--tmpfs", home]
    return cmd + ["--bind", work, work, "--chdir", work, "--unshare-all", "--die-with-parent", "--new-session",
                  "--setenv", "HOME", work, "--"]


def _limits(lim: SandboxLimits):
    cpu = lim.cpu_seconds if lim.cpu_seconds is not None else int(lim.timeout) + 1

    def apply() -> None:
        for what, value in ((resource.RLIMIT_AS, lim.memory_mb << 20), (resource.RLIMIT_CPU, cpu),
                            (resource.RLIMIT_FSIZE, lim.file_mb << 20), (resource.RLIMIT_NOFILE, lim.open_files),
                            (resource.RLIMIT_CORE, 0)):
            try:
                resource.setrlimit(what, (value, value))
            except (ValueError, OSError):
                pass

    return apply


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(OUTPUT_BYTES).decode("utf-8", "replace")
    except OSError:
        return ""


def run_python(program: str, limits: SandboxLimits | None = None, isolation: str = "auto",
               guard: bool = True) -> SandboxResult:
    """Run ``program`` (Python source) in a sandbox (see the module docstring) → its :class:`SandboxResult`.

    ``isolation``: ``auto`` (the best available), ``bwrap``, ``unshare`` or ``guard`` (an unavailable one raises);
    ``guard=False`` leaves the Python guard out (to test what the isolation layer alone contains)."""
    lim = limits or SandboxLimits()
    ensure(isolation in ISOLATIONS, f"isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
    best = available_isolation()
    if isolation == "auto":
        isolation = best
    ensure(isolation == "guard" or isolation == best or (isolation == "unshare" and _probe(["unshare", "-rn", "true"])),
           f"sandbox isolation {isolation!r} is not available here (best: {best})")
    work = tempfile.mkdtemp(prefix="saesteer-sandbox-")
    try:
        work = os.path.realpath(work)
        prog = Path(work, "program.py")
        prog.write_text((GUARD if guard else "") + "\n" + program, encoding="utf-8")
        cmd = [sys.executable, "-I", str(prog)]
        if isolation == "bwrap":
            cmd = _bwrap_prefix(work) + cmd
        elif isolation == "unshare":
            cmd = ["unshare", "-rn"] + cmd
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0"}
        t0 = time.perf_counter()
        with open(Path(work, "stdout"), "wb") as out, open(Path(work, "stderr"), "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, preexec_fn=_limits(lim), close_fds=True)
            try:
                rc: int | None = proc.wait(timeout=lim.timeout)
                status = "passed" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                status, rc = "timeout", None
            finally:
                try:  # the whole group: anything the code started dies with it
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        return SandboxResult(status, rc, _read(Path(work, "stdout")), _read(Path(work, "stderr")),
                             round(time.perf_counter() - t0, 3), isolation)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_many(programs: Sequence[str], limits: SandboxLimits | None = None, workers: int = 2,
             isolation: str = "auto") -> list[SandboxResult]:
    """:func:`run_python` over ``programs`` with ``workers`` sandboxes at a time (results in order)."""
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(ex.map(lambda p: run_python(p, limits, isolation), programs))


__all__ = ["SandboxLimits", "SandboxResult", "run_python", "run_many", "available_isolation", "GUARD", "ISOLATIONS"]
