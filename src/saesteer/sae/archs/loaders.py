"""File layouts of published SAEs → a loaded SAE with the common interface (see :mod:`saesteer.sae.archs.base`).

Layouts (detected per folder):

* ``saesteer``: ours (``saesteer.json`` + ``saesteer.safetensors``);
* ``saelens``: ``cfg.json`` + ``sae_weights.safetensors``; architectures ``standard`` (ReLU), ``jumprelu`` (also
  what SAELens saves BatchTopK as), ``topk``, ``batchtopk``;
* ``sparsify``: ``cfg.json`` + ``sae.safetensors`` in one folder per hook point (``layers.5``);
* ``gemmascope``: ``params.npz`` (Gemma Scope: ``W_enc [d, n]``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``) or
  ``params.safetensors`` (Gemma Scope 2: the same in lower case, optional ``config.json``); JumpReLU, the encoder
  reads ``x`` (no ``b_dec`` subtraction);
* ``dictionary_learning``: ``ae.pt`` (a state dict) + ``config.json`` (``trainer``: ``dict_class``, ``layer``,
  ``lm_name``, ``submodule_name``, ``k``); ``BatchTopKSAE``, ``AutoEncoderTopK``, ``AutoEncoder``,
  ``JumpReluAutoEncoder``.

Choosing one SAE of a folder that holds several (a sparsify run, a Gemma Scope release tree): ``hookpoint=`` (the
sub-folder's path relative to the folder, e.g. ``layers.5`` or ``layer_20/width_16k/average_l0_71``), or the path
form ``FOLDER:HOOKPOINT`` (used when ``FOLDER:HOOKPOINT`` is not itself a path), which works wherever an SAE path is
accepted (steering specs, ``--sae``). Weights load only through safetensors, ``torch.load(weights_only=True)`` and
``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import saesteer.sae.archs.batchtopk  # registers the architectures
import saesteer.sae.archs.jumprelu
import saesteer.sae.archs.relu
import saesteer.sae.archs.topk  # noqa: F401
from saesteer.core import SaesteerError, ensure, read_json
from saesteer.sae.archs.base import ArchConfig, make_sae
from saesteer.sae.archs.hookpoints import (
    layer_from_hookpoint,
    model_from_gemmascope_path,
    split_hookpoint,
)

from ..formats import build_topk, load_own
from ..model import SAEConfig

OWN_CFG, CFG = "saesteer.json", "cfg.json"
SAELENS_WEIGHTS, SPARSIFY_WEIGHTS = "sae_weights.safetensors", "sae.safetensors"
GS_NPZ, GS_ST, GS_CFG = "params.npz", "params.safetensors", "config.json"
DL_WEIGHTS, DL_CFG = "ae.pt", "config.json"
_UNIT_TOL = 1e-3
_MAX_DEPTH = 4


# --------------------------------------------------------------------------------------------- detection
def folder_kind(p: Path) -> str | None:
    """The layout of one folder, or None when it holds no SAE."""
    if (p / OWN_CFG).exists():
        return "saesteer"
    if (p / CFG).exists() and (p / SAELENS_WEIGHTS).exists():
        return "saelens"
    if (p / CFG).exists() and (p / SPARSIFY_WEIGHTS).exists():
        return "sparsify"
    if (p / GS_NPZ).exists() or (p / GS_ST).exists():
        return "gemmascope"
    if (p / DL_WEIGHTS).exists():
        return "dictionary_learning"
    return None


def sub_saes(p: Path) -> list[Path]:
    """SAE folders below ``p`` (up to 4 levels deep), sorted."""
    out: list[Path] = []

    def walk(q: Path, depth: int) -> None:
        if depth > _MAX_DEPTH:
            return
        for c in sorted(q.iterdir()):
            if c.is_dir() and not c.name.startswith("."):
                if folder_kind(c):
                    out.append(c)
                else:
                    walk(c, depth + 1)

    walk(p, 1)
    return out


def resolve(path: str | os.PathLike, hookpoint: str | None = None) -> tuple[str, Path]:
    """(layout, folder) of the SAE at ``path`` (``hookpoint``: which one of several)."""
    p, hp = split_hookpoint(path, hookpoint)
    if p.is_file():
        p = p.parent
    ensure(p.is_dir(), f"SAE not found: {path}")
    if hp:
        q = p / hp
        kind = folder_kind(q) if q.is_dir() else None
        if kind:
            return kind, q
        names = [s.relative_to(p).as_posix() for s in sub_saes(p)] or ["none"]
        raise SaesteerError(f"{p} has no SAE for hook point {hp!r} (available: {', '.join(names)})")
    kind = folder_kind(p)
    if kind:
        return kind, p
    subs = sub_saes(p)
    if len(subs) == 1:
        return folder_kind(subs[0]) or "", subs[0]
    if subs:
        kinds = {folder_kind(s) for s in subs}
        what = f"several {kinds.pop()} SAEs" if len(kinds) == 1 else "several SAEs"
        raise SaesteerError(f"{p} holds {what} ({', '.join(s.relative_to(p).as_posix() for s in subs)}); pick one "
                            f"with --hookpoint NAME or the path form {p}:NAME")
    raise SaesteerError(f"{p} holds no SAE (expected {OWN_CFG}, SAELens {CFG}+{SAELENS_WEIGHTS}, sparsify "
                        f"{CFG}+{SPARSIFY_WEIGHTS}, Gemma Scope {GS_NPZ}/{GS_ST} or dictionary_learning {DL_WEIGHTS})")


# --------------------------------------------------------------------------------------------- helpers
def _st_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise SaesteerError(f"cannot read SAE weights {path}: {e}") from None


def _need(sd: dict[str, Any], keys: tuple[str, ...], where: Path) -> None:
    missing = [k for k in keys if k not in sd]
    ensure(not missing, f"SAE weights in {where} lack {', '.join(missing)}")


def _dtype_name(d: Any) -> str:
    s = str(d or "float32").replace("torch.", "")
    return {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(s, s)


def _unit_rows(W_dec: torch.Tensor) -> bool:
    return float((W_dec.float().norm(dim=1) - 1).abs().max()) < _UNIT_TOL


def _topk(cfg: ArchConfig, w: dict[str, torch.Tensor], device: str) -> Any:
    """Our TopKSAE when the encoder reads ``x - b_dec`` and decoder rows are unit-norm, else :class:`TopKDecSAE`."""
    if cfg.apply_b_dec_to_input and _unit_rows(w["W_dec"]) and 0 < cfg.k < cfg.num_latents and \
            cfg.dtype in ("float32", "float16", "bfloat16"):
        sc = SAEConfig(d_in=cfg.d_in, num_latents=cfg.num_latents, k=cfg.k, model=cfg.model, layer=cfg.layer,
                       hook_name=cfg.hook_name, dtype=cfg.dtype)
        sae = build_topk(sc, {k: w[k].float() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, Path(cfg.path), device)
        sae.source = cfg.source
        sae.path = cfg.path
        return sae
    return make_sae("topk", cfg, w, device)


def _layer(hook: str, *fallbacks: Any) -> int:
    layer = layer_from_hookpoint(hook)
    if layer >= 0:
        return layer
    for f in fallbacks:
        if f is not None and int(f) >= 0:
            return int(f)
    return -1


# --------------------------------------------------------------------------------------------- saesteer
def _load_own(p: Path, device: str) -> Any:
    sae = load_own(p, device)
    sae.path = str(p)
    return sae


# --------------------------------------------------------------------------------------------- SAELens
_SAELENS_ARCHS = ("standard", "jumprelu", "topk", "batchtopk")


def load_saelens(p: Path, device: str = "cpu") -> Any:
    c = read_json(p / CFG, "SAELens config")
    arch = c.get("architecture", "standard")
    ensure(arch in _SAELENS_ARCHS, f"{p}: SAELens architecture {arch!r} is not supported (supported: "
                                   f"{', '.join(_SAELENS_ARCHS)})")
    norm = c.get("normalize_activations") or "none"
    ensure(norm == "none", f"{p}: normalize_activations={norm!r} is not supported (fold the normalisation into the "
                           f"weights first, e.g. SAELens fold_activation_norm_scaling_factor)")
    ensure((c.get("reshape_activations") or "none") == "none" and c.get("hook_head_index") is None,
           f"{p}: attention (hook_z) SAEs are not supported")
    ensure(not c.get("finetuning_scaling_factor"), f"{p}: SAEs with a finetuning scaling factor are not supported")
    md = c.get("metadata") or {}
    hook = md.get("hook_name") or c.get("hook_name") or c.get("hf_hook_name") or ""
    layer = _layer(hook, md.get("saesteer_layer"))
    sd = _st_load(p / SAELENS_WEIGHTS)
    _need(sd, ("W_enc", "b_enc", "W_dec", "b_dec"), p)
    dtype = _dtype_name(c.get("dtype"))
    f = torch.float32 if dtype == "float32" else None
    w = {"W_enc": sd["W_enc"].t(), "b_enc": sd["b_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    w = {k: (v.to(f) if f is not None else v) for k, v in w.items()}
    cfg = ArchConfig(d_in=int(c["d_in"]), num_latents=int(c["d_sae"]), model=md.get("model_name") or
                     c.get("model_name") or "", layer=layer, hook_name=hook, source="saelens", path=str(p),
                     apply_b_dec_to_input=bool(c.get("apply_b_dec_to_input", True)), dtype=dtype)
    if arch in ("topk", "batchtopk") and c.get("rescale_acts_by_decoder_norm", False):
        # their latent = pre · ‖W_dec[f]‖, decoded with W_dec[f] / ‖W_dec[f]‖: fold the norms into the encoder
        n = w["W_dec"].norm(dim=1)
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * n[:, None], w["b_enc"] * n, w["W_dec"] / n[:, None]
    if arch == "topk":
        cfg.k = int(c["k"])
        return _topk(cfg, w, device)
    if arch == "standard":
        return make_sae("relu", cfg, w, device)
    if "threshold" in sd:
        th = sd["threshold"]
    elif "log_threshold" in sd:  # older SAELens JumpReLU
        th = sd["log_threshold"].exp()
    elif "topk_threshold" in sd:
        th = sd["topk_threshold"]
    else:
        raise SaesteerError(f"SAE weights in {p} lack threshold ({arch} SAE)")
    w["threshold"] = th.reshape(-1).expand(cfg.num_latents).to(w["W_enc"].dtype) if th.numel() == 1 else th
    if arch == "batchtopk":
        cfg.k = round(float(c.get("k", 0)))
    return make_sae(arch, cfg, w, device)


# --------------------------------------------------------------------------------------------- sparsify
def load_sparsify(p: Path, device: str = "cpu") -> Any:
    c = read_json(p / CFG, "sparsify config")
    ensure(c.get("activation", "topk") == "topk", f"{p}: only top-k sparse coders are supported")
    ensure(not c.get("skip_connection") and not c.get("transcode"), f"{p}: transcoders / skip connections are not "
                                                                    f"supported")
    sd = _st_load(p / SPARSIFY_WEIGHTS)
    _need(sd, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), p)
    d_in = int(c["d_in"])
    n_lat = int(c.get("num_latents") or d_in * int(c.get("expansion_factor", 32)))
    meta = c.get("saesteer") or {}
    hook = meta.get("hook_name") or p.name
    layer = _layer(p.name, meta.get("layer"))
    if layer < 0:
        layer = _layer(hook)
    cfg = ArchConfig(d_in=d_in, num_latents=n_lat, k=int(c.get("k", 32)), model=meta.get("model", ""), layer=layer,
                     hook_name=hook, source="sparsify", path=str(p))
    w = {"W_enc": sd["encoder.weight"].float(), "b_enc": sd["encoder.bias"].float(), "W_dec": sd["W_dec"].float(),
         "b_dec": sd["b_dec"].float()}
    return _topk(cfg, w, device)


# --------------------------------------------------------------------------------------------- Gemma Scope
def load_gemmascope(p: Path, device: str = "cpu") -> Any:
    if (p / GS_NPZ).exists():
        import numpy as np

        try:
            with np.load(p / GS_NPZ, allow_pickle=False) as z:
                raw = {k: torch.from_numpy(np.asarray(z[k]).copy()) for k in z.files}
        except (OSError, ValueError) as e:
            raise SaesteerError(f"cannot read SAE weights {p / GS_NPZ}: {e}") from None
    else:
        raw = _st_load(p / GS_ST)
    sd = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    _need(sd, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), p)
    ensure("affine_skip_connection" not in sd, f"{p}: transcoders are not supported")
    if "scaling_factor" in sd:
        ensure(bool(torch.allclose(sd["scaling_factor"].float(), torch.ones(()))),
               f"{p}: SAEs with a scaling factor other than 1 are not supported")
    d_in, n = (int(s) for s in sd["W_enc"].shape)
    ensure(tuple(sd["W_dec"].shape) == (n, d_in), f"{p}: W_dec has shape {tuple(sd['W_dec'].shape)}, expected "
                                                  f"{(n, d_in)} (transcoders are not supported)")
    c = read_json(p / GS_CFG, "Gemma Scope config") if (p / GS_CFG).exists() else {}
    ensure(c.get("architecture", "jump_relu") in ("jump_relu", "jumprelu"),
           f"{p}: Gemma Scope architecture {c.get('architecture')!r} is not supported")
    tail = "/".join(p.resolve().parts[-4:])
    hook = c.get("hf_hook_point_in") or ""
    layer = layer_from_hookpoint(hook) if hook else -1
    layer_p = layer_from_hookpoint(tail)  # also rejects -mlp / -att / mlp_out / attn_out releases
    if layer < 0:
        layer = layer_p
        hook = f"blocks.{layer}.hook_resid_post" if layer >= 0 else ""
    model = c.get("model_name") or model_from_gemmascope_path(tail)
    cfg = ArchConfig(d_in=d_in, num_latents=n, model=model, layer=layer, hook_name=hook, source="gemmascope",
                     path=str(p), apply_b_dec_to_input=False)
    w = {"W_enc": sd["W_enc"].float().t(), "W_dec": sd["W_dec"].float(), "b_enc": sd["b_enc"].float(),
         "b_dec": sd["b_dec"].float(), "threshold": sd["threshold"].float().reshape(-1).expand(n)}
    return make_sae("jumprelu", cfg, w, device)


# --------------------------------------------------------------------------------------------- dictionary_learning
_DL_CLASSES = ("BatchTopKSAE", "AutoEncoderTopK", "AutoEncoder", "JumpReluAutoEncoder")


def load_dictionary_learning(p: Path, device: str = "cpu") -> Any:
    c = read_json(p / DL_CFG, "dictionary_learning config") if (p / DL_CFG).exists() else {}
    tr = c.get("trainer") or {}
    cls = tr.get("dict_class") or ""
    ensure(cls in _DL_CLASSES, f"{p}: dictionary_learning dict_class {cls or '(none)'!r} is not supported "
                               f"(supported: {', '.join(_DL_CLASSES)})")
    try:
        sd = torch.load(p / DL_WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise SaesteerError(f"cannot read SAE weights {p / DL_WEIGHTS}: {e}") from None
    ensure(isinstance(sd, dict), f"{p / DL_WEIGHTS} is not a state dict")
    sub = tr.get("submodule_name") or ""
    layer = _layer(sub, tr.get("layer"))
    hook = sub or (f"resid_post_layer_{layer}" if layer >= 0 else "")
    cfg = ArchConfig(d_in=1, num_latents=1, model=tr.get("lm_name") or "", layer=layer, hook_name=hook,
                     source="dictionary_learning", path=str(p))
    if cls == "JumpReluAutoEncoder":
        _need(sd, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), p)
        w = {"W_enc": sd["W_enc"].float().t(), "b_enc": sd["b_enc"].float(), "W_dec": sd["W_dec"].float(),
             "b_dec": sd["b_dec"].float(), "threshold": sd["threshold"].float()}
        cfg.apply_b_dec_to_input = bool(tr.get("apply_b_dec_to_input", False))
        arch = "jumprelu"
    else:
        bias = "bias" if cls == "AutoEncoder" else "b_dec"
        _need(sd, ("encoder.weight", "encoder.bias", "decoder.weight", bias), p)
        w = {"W_enc": sd["encoder.weight"].float(), "b_enc": sd["encoder.bias"].float(),
             "W_dec": sd["decoder.weight"].float().t(), "b_dec": sd[bias].float()}
        arch = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk"}[cls]
        if arch != "relu":
            _need(sd, ("k",), p)
            cfg.k = int(sd["k"])
        if arch == "batchtopk":
            _need(sd, ("threshold",), p)
            th = sd["threshold"].float()
            ensure(th.numel() == 1 or th.numel() == w["W_enc"].shape[0], f"{p}: threshold has {th.numel()} values")
            if float(th.reshape(-1)[0]) < 0 and th.numel() == 1:
                raise SaesteerError(f"{p}: the BatchTopK threshold was never set (training stopped before "
                                    f"threshold_start_step); it cannot be used at inference")
            w["threshold"] = th.reshape(-1).expand(w["W_enc"].shape[0])
    cfg.num_latents, cfg.d_in = (int(s) for s in w["W_enc"].shape)
    return make_sae(arch, cfg, w, device)


LOADERS: dict[str, Callable[[Path, str], Any]] = {
    "saesteer": _load_own, "saelens": load_saelens, "sparsify": load_sparsify, "gemmascope": load_gemmascope,
    "dictionary_learning": load_dictionary_learning,
}


def load_any(path: str | os.PathLike, device: str = "cpu", hookpoint: str | None = None) -> Any:
    """Load the SAE at ``path`` (any supported layout; ``hookpoint`` picks one of several)."""
    kind, p = resolve(path, hookpoint)
    try:
        return LOADERS[kind](p, device)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise SaesteerError(f"malformed {kind} SAE in {p}: {type(e).__name__}: {e}") from None


def detect_format(path: str | os.PathLike, hookpoint: str | None = None) -> tuple[str, Path]:
    """(layout, folder): "saesteer" | "saelens" | "sparsify" | "gemmascope" | "dictionary_learning". A folder with
    one SAE below it is accepted; with several, ``hookpoint`` (or ``PATH:HOOKPOINT``) picks one (:func:`resolve`)."""
    return resolve(path, hookpoint)


def load_sae(path: str | os.PathLike, device: str = "cpu", hookpoint: str | None = None) -> Any:
    """Load an SAE of any supported layout and architecture (auto-detected; :mod:`saesteer.sae.archs`)."""
    return load_any(path, device, hookpoint)
