"""Small helpers the command modules share: loading the model a command runs on, comma / repeat lists, rate tables."""

from __future__ import annotations

from typing import Any, Optional


def load(model: str, device: str, threads: Optional[int], dtype: Optional[str] = None,
         quantize: Optional[str] = None) -> tuple[Any, Any]:
    """Set the thread count, then ``(model, tokenizer)`` on the resolved device in ``dtype`` (``--dtype``; None:
    the device's default, ``core.default_dtype``), weight-only quantized when ``quantize`` is ``int8``."""
    from saesteer.core import resolve_device, set_threads
    from saesteer.models import load_model

    set_threads(threads)
    device = resolve_device(device)
    return load_model(model, device=device, dtype=dtype, quantize=quantize)  # None / auto: the device's default


def split_list(values: list[str] | str | None) -> list[str]:
    """``["a,b", "c"]`` / ``"a,b"`` → ``["a", "b", "c"]`` (options given comma-separated, repeated, or both)."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else values
    return [v.strip() for x in items for v in str(x).split(",") if v.strip()]


def split_floats(values: list[str] | str | None, what: str) -> list[float]:
    """:func:`split_list` as numbers; a bad one is a one-line error naming the option."""
    from saesteer.core import SaesteerError

    try:
        return [float(v) for v in split_list(values)]
    except ValueError:
        raise SaesteerError(f"{what} must be comma-separated numbers, got {values!r}") from None


def split_ints(values: list[str] | str | None, what: str) -> list[int]:
    """:func:`split_list` as integers; a bad one is a one-line error naming the option."""
    from saesteer.core import SaesteerError

    try:
        return [int(v) for v in split_list(values)]
    except ValueError:
        raise SaesteerError(f"{what} must be comma-separated integers, got {values!r}") from None


def print_rates(title: str, rows: list[tuple[str, dict]], extra: str = "") -> None:
    """A rich table of rates with their k / n, 95 % interval and failed count."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in ("set", "rate", "k / n", "95% CI", "failed"):
        t.add_column(c)
    for name, r in rows:
        t.add_row(name, f"{r['rate']:.3f}", f"{r['k']} / {r['n']}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
                  str(r.get("n_failed", 0)))
    con = Console()
    con.print(t)
    if extra:
        con.print(extra)
