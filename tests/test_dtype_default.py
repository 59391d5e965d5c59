"""The model dtype default per device and CPU capability (cpuinfo mocked), ``SAESTEER_DTYPE``, and the trainer's
selection-precision default following it."""

from __future__ import annotations

import pytest
import torch

from saesteer.core import SaesteerError, cpu_has_bf16, default_dtype, resolve_dtype, runtime

FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov avx2 avx512f avx512bw avx512vl"


def _cpuinfo(tmp_path, extra: str) -> str:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {FLAGS} {extra}\n\nprocessor\t: 1\n"
                 f"flags\t\t: {FLAGS} {extra}\n")
    return str(p)


@pytest.mark.parametrize("extra, expected", [("avx512_bf16 avx512_vnni", True), ("amx_bf16 amx_tile", True),
                                             ("avx512_vnni", False), ("", False)])
def test_cpu_has_bf16_reads_flags(tmp_path, extra, expected):
    assert cpu_has_bf16(_cpuinfo(tmp_path, extra)) is expected


def test_cpu_has_bf16_without_cpuinfo(tmp_path):
    assert cpu_has_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("has, expected", [(True, "bfloat16"), (False, "float32")])
def test_default_dtype_cpu_follows_capability(monkeypatch, has, expected):
    monkeypatch.delenv("SAESTEER_DTYPE", raising=False)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda *a, **k: has)
    assert default_dtype("cpu") == expected
    assert resolve_dtype(None, "cpu") == expected and resolve_dtype("auto", "cpu") == expected


@pytest.mark.parametrize("avail, bf16, expected", [(True, True, "bfloat16"), (True, False, "float32"),
                                                   (False, False, "float32")])
def test_default_dtype_cuda(monkeypatch, avail, bf16, expected):
    monkeypatch.delenv("SAESTEER_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: avail)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert default_dtype("cuda") == expected and default_dtype("cuda:1") == expected


def test_env_overrides_and_explicit_wins(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda *a, **k: True)
    monkeypatch.setenv("SAESTEER_DTYPE", "float32")
    assert default_dtype("cpu") == "float32"
    monkeypatch.setenv("SAESTEER_DTYPE", "auto")
    assert default_dtype("cpu") == "bfloat16"
    assert resolve_dtype("float16", "cpu") == "float16" and resolve_dtype(torch.float32, "cpu") == "float32"
    monkeypatch.setenv("SAESTEER_DTYPE", "fp8")
    with pytest.raises(SaesteerError, match="SAESTEER_DTYPE must be one of"):
        default_dtype("cpu")
    with pytest.raises(SaesteerError, match="--dtype must be one of"):
        resolve_dtype("int4", "cpu")


def test_load_model_uses_the_default(monkeypatch, tiny_dir):
    """A model loaded without a dtype comes in the capability's default; an explicit dtype wins."""
    from saesteer.models import load_model

    monkeypatch.delenv("SAESTEER_DTYPE", raising=False)
    for has, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda *a, _h=has, **k: _h)
        m, _ = load_model(str(tiny_dir))
        assert next(m.parameters()).dtype == expected
    m, _ = load_model(str(tiny_dir), dtype="float32")
    assert next(m.parameters()).dtype == torch.float32


def test_trainer_selection_default_follows_device(monkeypatch):
    from saesteer.sae.trainer import TrainConfig, selection_dtype

    monkeypatch.delenv("SAESTEER_DTYPE", raising=False)
    assert TrainConfig(acts="x", out="y").mm_dtype == "auto"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda *a, **k: True)
    assert selection_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda *a, **k: False)
    assert selection_dtype("auto", "cpu") == "float32"
    assert selection_dtype("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setenv("SAESTEER_DTYPE", "float16")  # fp16 models: the selection stays float32
    assert selection_dtype("auto", "cpu") == "float32"
