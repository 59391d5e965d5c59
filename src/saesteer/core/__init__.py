"""Shared foundations every stage uses: the user-facing error type (``errors``), atomic writes (``io``), threads and
devices (``runtime``), interval statistics (``stats``), progress bars (``progress``), figures as PNG (``plots``), and the process-group helpers of distributed collection /
training (``dist``). Depends on nothing else in saesteer."""

from .errors import SaesteerError, SaesteerWarning, ensure, require_package
from .io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output_path,
    read_json,
)
from .plots import figure_png
from .progress import Bar, progress_bar
from .runtime import MODEL_DTYPES, cpu_has_bf16, default_dtype, resolve_device, resolve_dtype, set_threads
from .stats import (
    auroc,
    diff_interval,
    mcnemar_exact,
    paired_diff_interval,
    paired_summary,
    rate_summary,
    standardise_fit,
    wilson_interval,
)

__all__ = [
    "MODEL_DTYPES", "SaesteerError", "SaesteerWarning", "atomic_dir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "auroc",
    "Bar", "progress_bar", "check_output_path", "figure_png", "cpu_has_bf16", "default_dtype", "diff_interval", "ensure",
    "mcnemar_exact", "paired_diff_interval", "paired_summary", "rate_summary", "read_json", "require_package",
    "resolve_device", "resolve_dtype", "set_threads", "standardise_fit", "wilson_interval",
]
