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


MODEL_DTYPES = ("float32", "bfloat16", "float16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU reports native bf16 arithmetic (AVX512-BF16 or AMX-BF16 in ``/proc/cpuinfo``'s flags).

    On such CPUs oneDNN runs bf16 GEMMs at about twice the fp32 rate (measured: ``benchmarks/generation.py``); without
    the flags torch emulates bf16 and it is slower than fp32. Non-Linux systems (no cpuinfo file) answer False."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[-1].split())
                    return any(flag in flags for flag in BF16_CPU_FLAGS)
    except OSError:
        return False
    return False


def default_dtype(device: str = "cpu") -> str:
    """The model dtype used when none is given: ``SAESTEER_DTYPE`` if set; else bfloat16 on CUDA devices that support
    it and on CPUs with native bf16 (:func:`cpu_has_bf16`); float32 elsewhere. SAE and clamp math stay float32."""
    env = os.environ.get("SAESTEER_DTYPE", "").strip()
    if env and env != "auto":
        return check_dtype(env, "SAESTEER_DTYPE")
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    if device == "cpu":
        return "bfloat16" if cpu_has_bf16() else "float32"
    return "float32"


def check_dtype(name: str, what: str = "--dtype") -> str:
    if name not in MODEL_DTYPES:
        raise SaesteerError(f"{what} must be one of {', '.join(MODEL_DTYPES)} or auto, got {name!r}")
    return name


def resolve_dtype(name: object, device: str = "cpu") -> str:
    """A model dtype name: ``None`` / ``"auto"`` → :func:`default_dtype` for ``device``; a ``torch.dtype`` or a name
    is checked and returned as its name."""
    if name is None or name == "auto" or name == "":
        return default_dtype(device)
    if not isinstance(name, str):
        name = str(name).removeprefix("torch.")
    return check_dtype(name)
