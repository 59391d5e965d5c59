"""figure_png: a matplotlib figure as PNG bytes (the figure closed), for the reports' plots and inline HTML images."""

from __future__ import annotations

import io
from typing import Any


def figure_png(fig: Any, dpi: float | None = None, tight: bool = False) -> bytes:
    """PNG bytes of ``fig`` at ``dpi`` (None: matplotlib's default), cropped to its content when ``tight``; closes
    ``fig``."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)
    return buf.getvalue()
