"""Shared by the benchmark scripts (run as ``python benchmarks/NAME.py``; this folder is on ``sys.path`` then)."""

from __future__ import annotations

import os
import sys


def run_command() -> str:
    """The command line that ran this benchmark (with the thread setting), recorded in its JSON."""
    return f"SAESTEER_THREADS={os.environ.get('SAESTEER_THREADS', '')} python " + " ".join(sys.argv)
