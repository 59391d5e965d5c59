"""Shared by the benchmark scripts (run as ``python benchmarks/NAME.py``; this folder is on ``sys.path`` then)."""

from __future__ import annotations

import os
import sys


def run_command() -> str:
    """The command line that ran this benchmark (with the thread setting), recorded in its JSON."""
    return f"SAESTEER_THREADS={os.environ.get('SAESTEER_THREADS', '')} python " + " ".join(sys.argv)


def decode_step_fn(model, tok, rows: int):
    """A one-token KV-cache decode step of ``model`` on ``rows`` copies of a fixed ~40-token text (prefilled here,
    untimed); each call feeds the previous step's greedy token."""
    ids = tok(["The quick brown fox jumps over the lazy dog. " * 4] * rows, return_tensors="pt").input_ids
    out = model(ids, use_cache=True, logits_to_keep=1)
    state = {"pkv": out.past_key_values, "nxt": out.logits[:, -1:].argmax(-1)}

    def step():
        o = model(state["nxt"], past_key_values=state["pkv"], use_cache=True, logits_to_keep=1)
        state["pkv"], state["nxt"] = o.past_key_values, o.logits[:, -1:].argmax(-1)

    return step
