"""Loading any model — a built-in name, a local HF folder, a local GGUF file or a hub id — as ``(model, tokenizer)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from saesteer.core import SaesteerError, ensure, resolve_dtype

from .builtin import BUILTIN_MODELS, DEFAULT_MODEL, ensure_converted, require_gguf_support
from .quant import quantize_model, resolve_quantize


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
    linears (``models.quant``; ``int8-decode``: int8 only for the decode steps of a few sequences, ``auto``: that on CPU
    in bf16, else none — the fast single-stream path on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, resolve_dtype(dtype, device))  # a bad --dtype fails before any conversion
    quantize = resolve_quantize(quantize, device, dtype)
    path, kw = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        if name_or_path in BUILTIN_MODELS and dtype != torch.float32:
            # the cache holds fp32 safetensors: read them cast as they arrive instead of mmap-ing the whole fp32 file
            # beside the cast copy
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
            cls = AutoModelForCausalLM._model_mapping[type(config)]
            model = cls.from_pretrained(None, config=config, dtype=dtype, state_dict=read_safetensors_folder(path, dtype))
        else:
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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, read with plain file reads (no mmap) and floating-point tensors cast to
    ``dtype`` one at a time. Peak memory: the cast tensors plus the largest single tensor as stored — loading an fp32
    file into a bf16 model through an mmap keeps every page of the file resident beside the bf16 copy (measured: the
    default model's bf16 load peaked at ~3.5 GiB that way)."""
    import json
    import struct

    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            ensure(info["dtype"] in SAFETENSORS_DTYPES, f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            if end == start:
                t = torch.empty(info["shape"], dtype=stored)
            else:
                f.seek(base + start)
                buf = bytearray(end - start)
                ensure(f.readinto(buf) == end - start, f"{path}: truncated at tensor {name}")
                t = torch.frombuffer(buf, dtype=stored).reshape(info["shape"])
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def read_safetensors_folder(folder: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """:func:`read_safetensors` over every ``*.safetensors`` file of a model folder."""
    files = sorted(Path(folder).glob("*.safetensors"))
    ensure(bool(files), f"no .safetensors files in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(read_safetensors(f, dtype))
    return out


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
