"""Shared fixtures: tiny random models built in-process; real built-in models for integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SAESTEER_THREADS", "2")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``--threads`` / ``threads=`` calls set torch's process-wide thread count; undo it after every test so a later
    test never runs with (or asserts on) a count an earlier one left behind."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


def _hooks(model) -> list[tuple[dict, int]]:
    """(hook dict, id) of every forward (pre-)hook on ``model`` except transformers' own output-capturing hooks,
    which it installs lazily on the first ``output_hidden_states`` call and keeps."""
    return [(d, k) for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
            for k, h in d.items() if not getattr(h, "__module__", "").startswith("transformers")]


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer random Llama and its tiny ChatML tokenizer (shared; do not mutate: ``_guard_tiny`` checks)."""
    from saesteer.models import tiny_model

    return tiny_model("llama")


@pytest.fixture(autouse=True)
def _guard_tiny(request):
    """A test that uses the shared ``tiny`` model and leaves a hook, a steering intervention, changed weights, a
    changed name or train mode on it fails here, and the model is put back so that later tests are unaffected."""
    if "tiny" not in request.fixturenames:
        yield
        return
    import torch

    model, _ = request.getfixturevalue("tiny")
    hooks, name = {(id(d), k) for d, k in _hooks(model)}, getattr(model, "saesteer_name", None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    yield
    leaks = []
    left = [(d, k) for d, k in _hooks(model) if (id(d), k) not in hooks]
    if left:
        leaks.append(f"{len(left)} hook(s)")
        for d, k in left:
            d.pop(k, None)
    if getattr(model, "_saesteer_interventions", None):
        leaks.append("steering interventions")
        del model._saesteer_interventions
    if getattr(model, "saesteer_name", None) != name:
        leaks.append("saesteer_name")
        model.saesteer_name = name
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    if changed:
        leaks.append(f"weights {changed[:3]}")
        model.load_state_dict(state)
    if model.training:
        leaks.append("train mode")
        model.eval()
    assert not leaks, f"the test left the shared tiny model changed: {', '.join(leaks)}"


@pytest.fixture
def tiny_dir(tiny, tmp_path) -> Path:
    """The tiny Llama saved as a local HF folder (the CLI loads it like any local model)."""
    model, tok = tiny
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def data_root() -> Path:
    from saesteer.data import data_root as _root

    root = _root()
    if root is None:
        pytest.skip("no data root (../shared/data or SAESTEER_DATA)")
    return root


@pytest.fixture(scope="session")
def smollm():
    """The real SmolLM2-135M-Instruct (converted once into the cache), in float32: the tests that pin math and
    expected answers on the real models run in float32 whatever this CPU's default dtype (test_bf16 and
    test_dtype_default cover bfloat16 and the default; CI's demo runs the default)."""
    from saesteer.models import load_model

    return load_model("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="session")
def qwen():
    """The real default model, Qwen2.5-Coder-0.5B-Instruct, in float32 (see ``smollm``)."""
    from saesteer.models import load_model

    return load_model("qwen2.5-coder-0.5b-instruct", dtype="float32")
