"""Loading any model — a built-in name, a local HF folder, a local GGUF file or a hub id — as ``(model, tokenizer)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from saesteer.core import SaesteerError, ensure, resolve_dtype

from .builtin import BUILTIN_MODELS, DEFAULT_MODEL, ensure_converted, require_gguf_support
from .quant import QUANTIZE_MODES, quantize_model


def resolve_model_path(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Map a built-in name, local folder, local .gguf file or hub id to ``(path_or_id, from_pretrained kwargs)``."""
    if name_or_path in BUILTIN_MODELS:
        return str(ensure_converted(name_or_path)), {}
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        ensure(p.is_file(), f"GGUF file not found: {p}")
        require_gguf_support()
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        ensure(p.is_dir() and (p / "config.json").exists(), f"{p} is not a Hugging Face model folder (no config.json)")
        return str(p), {}
    looks_like_hub = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub:
        known = ", ".join(BUILTIN_MODELS)
        raise SaesteerError(f"unknown model {name_or_path!r}: not a built-in ({known}), a local folder or a hub id")
    return name_or_path, {}


def load_model(
    name_or_path: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype | str | None = "auto",
    quantize: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode. The tokenizer pads on the left (batched generation).

    ``dtype`` ``"auto"`` / ``None``: ``core.default_dtype(device)`` — bfloat16 on CUDA and on CPUs with native bf16
    (AVX512-BF16 / AMX), float32 elsewhere; ``SAESTEER_DTYPE`` overrides. ``quantize="int8"``: weight-only int8
    linears (``models.quant``; the fast single-stream path on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ensure(quantize in (None, *QUANTIZE_MODES), f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    path, kw = resolve_model_path(name_or_path)
    dtype = getattr(torch, resolve_dtype(dtype, device))
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except OSError as e:  # hub ids without internet, broken folders
        raise SaesteerError(f"could not load model {name_or_path!r}: {_first_line(e)}") from None
    except (ValueError, KeyError, RuntimeError) as e:
        if "gguf_file" not in kw:
            raise
        raise SaesteerError(f"could not read GGUF file {name_or_path!r}: {_first_line(e)}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    prepare_tokenizer(tok)
    model.to(device).eval()
    if quantize and quantize != "none":
        quantize_model(model, quantize)
    model.saesteer_name = name_or_path  # what SAEs record as their model
    return model, tok


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def prepare_tokenizer(tok: Any) -> Any:
    """Left padding, and a pad token when the tokenizer has none."""
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def model_name(model: nn.Module) -> str:
    """The name a model was loaded under (built-in name, path or hub id)."""
    return getattr(model, "saesteer_name", None) or getattr(model.config, "_name_or_path", "") or "unknown"
