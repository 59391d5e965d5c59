"""SAE files: our format, SAELens (``cfg.json`` + ``sae_weights.safetensors``, architecture ``topk``) and EleutherAI
sparsify (layer folder with ``cfg.json`` + ``sae.safetensors``). ``load_sae`` detects which one a path holds; it
also reads the published layouts and architectures of :mod:`saesteer.sae.archs` (Gemma Scope, dictionary_learning,
SAELens standard / JumpReLU / BatchTopK).

Ours: ``saesteer.json`` (the :class:`~saesteer.sae.model.SAEConfig` plus a format tag) and ``saesteer.safetensors``
(``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` in scaled units; ``input_scale`` in the config). Exports fold the input
scale into the biases so that the other libraries see raw residual units and encode the same latent values as
:meth:`TopKSAE.encode`. Neither library is needed to read or write its format.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from saesteer.core import (
    SaesteerError,
    SaesteerWarning,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    ensure,
    read_json,
)

from .model import SAEConfig, TopKSAE

OWN_CFG, OWN_WEIGHTS = "saesteer.json", "saesteer.safetensors"
SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, CFG = "sae_weights.safetensors", "sae.safetensors", "cfg.json"
_UNIT_TOL = 1e-3


def _st_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _st_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise SaesteerError(f"cannot read SAE weights {path}: {e}") from None


def _need_topk(sae: Any) -> None:
    ensure(isinstance(sae, TopKSAE), f"only Top-k SAEs with unit-norm decoder rows can be written in this format; "
                                     f"this one is {getattr(sae, 'arch', type(sae).__name__)} (steer with its own files)")


# --------------------------------------------------------------------------------------------- our format
def save_sae(sae: TopKSAE, path: str | os.PathLike) -> Path:
    """Write ``saesteer.safetensors`` then ``saesteer.json`` into ``path`` (each atomically; the config last, so a
    folder is only recognised as an SAE once both are complete)."""
    _need_topk(sae)
    path = Path(path)
    atomic_write_bytes(path / OWN_WEIGHTS, _st_bytes(dict(sae.state_dict())))
    atomic_write_json(path / OWN_CFG, {"format": "saesteer-sae", "version": 1, **sae.cfg.to_dict()})
    return path


def load_own(path: Path, device: str = "cpu") -> TopKSAE:
    """Read our own format (``saesteer.json`` + ``saesteer.safetensors``) from folder ``path``."""
    d = read_json(path / OWN_CFG, "SAE config")
    ensure(d.get("format") == "saesteer-sae", f"{path / OWN_CFG} is not a saesteer SAE config")
    cfg = SAEConfig.from_dict(d)
    sd = _st_load(path / OWN_WEIGHTS)
    return build_topk(cfg, sd, path, device)


def build_topk(cfg: SAEConfig, sd: dict[str, torch.Tensor], path: Path, device: str) -> TopKSAE:
    """Our :class:`TopKSAE` from a state dict, checking shapes, finiteness and unit-norm decoder rows."""
    want = {"W_enc": (cfg.num_latents, cfg.d_in), "b_enc": (cfg.num_latents,), "W_dec": (cfg.num_latents, cfg.d_in),
            "b_dec": (cfg.d_in,)}
    for k, shape in want.items():
        ensure(k in sd, f"SAE weights in {path} lack {k}")
        ensure(tuple(sd[k].shape) == shape, f"SAE weight {k} in {path} has shape {tuple(sd[k].shape)}, expected {shape}")
        ensure(bool(torch.isfinite(sd[k]).all()), f"SAE weight {k} in {path} contains NaN or Inf")
    norms = sd["W_dec"].float().norm(dim=1)
    ensure(float((norms - 1).abs().max()) < _UNIT_TOL, f"decoder rows in {path} are not unit-norm (norms "
                                                        f"{float(norms.min()):.4g}..{float(norms.max()):.4g})")
    sae = TopKSAE(cfg, seed=None)
    sae.load_state_dict({k: sd[k].to(sae.W_enc.dtype) for k in want})
    return sae.to(device)


# --------------------------------------------------------------------------------------------- SAELens
def export_saelens(sae: TopKSAE, out: str | os.PathLike) -> Path:
    """SAELens ``topk`` SAE folder (loads with ``sae_lens.SAE.load_from_disk``), raw units."""
    _need_topk(sae)
    s = sae.input_scale
    cfg = {"d_in": sae.d_in, "d_sae": sae.num_latents, "dtype": sae.cfg.dtype, "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": sae.cfg.model or None, "hook_name": sae.cfg.hook_name or None,
                        "saesteer_layer": sae.cfg.layer},
           "k": sae.k, "rescale_acts_by_decoder_norm": False, "architecture": "topk"}
    w = {"W_enc": sae.W_enc.t(), "b_enc": sae.b_enc / s, "W_dec": sae.W_dec, "b_dec": sae.b_dec / s}
    with atomic_dir(out) as tmp:
        (tmp / SAELENS_WEIGHTS).write_bytes(_st_bytes(w))
        atomic_write_json(tmp / CFG, cfg)
    return Path(out)


# --------------------------------------------------------------------------------------------- sparsify
def export_sparsify(sae: TopKSAE, out: str | os.PathLike) -> Path:
    """sparsify run folder ``out/layers.L/{cfg.json, sae.safetensors}`` (``SparseCoder.load_from_disk`` on the layer
    folder, or ``SparseCoder.load_many(out, local=True)``). Returns the layer folder."""
    _need_topk(sae)
    s = sae.input_scale
    hook = f"layers.{sae.cfg.layer}" if sae.cfg.layer >= 0 else "sae"
    cfg = {"activation": "topk", "expansion_factor": max(1, sae.num_latents // sae.d_in), "normalize_decoder": True,
           "num_latents": sae.num_latents, "k": sae.k, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": sae.d_in,
           "saesteer": {"model": sae.cfg.model, "layer": sae.cfg.layer, "hook_name": sae.cfg.hook_name}}
    w = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc / s, "W_dec": sae.W_dec, "b_dec": sae.b_dec / s}
    with atomic_dir(out) as tmp:
        (tmp / hook).mkdir()
        (tmp / hook / SPARSIFY_WEIGHTS).write_bytes(_st_bytes(w))
        atomic_write_json(tmp / hook / CFG, cfg)
    return Path(out) / hook


def check_compatible(sae: Any, model: Any, layer: int) -> None:
    """Raise SaesteerError when the SAE was trained on another model, layer or residual width. A base-model SAE on
    the model's chat fine-tune (by hub name, ``hookpoints.base_of``) passes with a warning."""
    from saesteer.models import check_layer, d_model, model_name, n_layers

    width = d_model(model)
    ensure(width == sae.d_in, f"the SAE reads width {sae.d_in}, but the model's residual stream has width {width}")
    layer = check_layer(model, layer)
    ensure(sae.cfg.layer < 0 or sae.cfg.layer < n_layers(model),
           f"the SAE reads layer {sae.cfg.layer} ({getattr(sae.cfg, 'hook_name', '') or 'no hook name'}), but the "
           f"model has {n_layers(model)} layers")
    if sae.cfg.layer >= 0:
        ensure(sae.cfg.layer == layer, f"the SAE was trained on layer {sae.cfg.layer}, not layer {layer}")
    name = model_name(model)
    if sae.cfg.model and name and name != "unknown":
        from saesteer.sae.archs.hookpoints import base_of, same_model

        if base_of(sae.cfg.model, name):  # a base-model SAE on its chat fine-tune (Gemma Scope 2B, Llama Scope)
            warnings.warn(f"the SAE was trained on the base model {sae.cfg.model!r} and is applied to its chat "
                          f"fine-tune {name!r}: check its reconstruction on chat data (saesteer sae-eval)", SaesteerWarning,
                          stacklevel=2)
            return
        ensure(same_model(sae.cfg.model, name), f"the SAE was trained on model {sae.cfg.model!r}, not {name!r}")
