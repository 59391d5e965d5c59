"""Shared fixtures: tiny random models built in-process; real built-in models for integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SAESTEER_THREADS", "2")


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer random Llama and its tiny ChatML tokenizer (shared; do not mutate)."""
    from saesteer.models import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="session")
def data_root() -> Path:
    from saesteer.data import data_root as _root

    root = _root()
    if root is None:
        pytest.skip("no data root (../shared/data or SAESTEER_DATA)")
    return root


@pytest.fixture(scope="session")
def smollm():
    """The real SmolLM2-135M-Instruct (converted once into the cache)."""
    from saesteer.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen():
    """The real default model, Qwen2.5-Coder-0.5B-Instruct."""
    from saesteer.models import load_model

    return load_model("qwen2.5-coder-0.5b-instruct")
