"""One progress bar for every long loop: count, rate (items/s and, where tokens apply, tokens/s) and ETA, on stderr.

tqdm, not rich: these loops run inside the experiments' rich bars (sweep, compare), and rich allows only one live
display at a time. ``enabled=False`` prints nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class Bar:
    """``tqdm`` with rate and ETA; :meth:`update` can also count tokens, shown as a ``tok/s`` postfix when the bar's
    unit is not tokens (prompts, documents, sequences)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True, leave: bool = False,
                 initial: int = 0) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, initial=initial,
                         file=sys.stderr, dynamic_ncols=True, unit_scale=unit == "tok", smoothing=0.1)
        self.tokens = 0
        self._t0 = time.perf_counter()
        self._extra = ""

    def update(self, n: int = 1, tokens: int = 0) -> None:
        """Advance by ``n`` units, ``tokens`` of them tokens (for the tok/s postfix)."""
        self.tokens += tokens
        if self.tokens:
            self._set_postfix()
        self._bar.update(n)

    def describe(self, text: str) -> None:
        """Extra text after the rate (e.g. a training loss)."""
        self._extra = text
        self._set_postfix()

    def _set_postfix(self) -> None:
        parts = [f"{self.tokens / max(time.perf_counter() - self._t0, 1e-9):,.0f} tok/s"] if self.tokens else []
        self._bar.set_postfix_str(", ".join(parts + ([self._extra] if self._extra else [])), refresh=False)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, leave: bool = False,
                 initial: int = 0) -> Bar:
    """A :class:`Bar` (use as a context manager)."""
    return Bar(total, desc, unit, enabled, leave, initial)
