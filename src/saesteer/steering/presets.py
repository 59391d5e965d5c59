"""Presets: a named setting — chat model, layer, SAE source, clamp grid and dtype — for ``--preset NAME``.

* ``obrien2024``: the paper's own setting (O'Brien et al. 2024, arXiv 2411.11296): Phi-3-Mini-4k-Instruct, a Top-k SAE
  with k = 32 and 8x expansion (24,576 latents for d_model 3072) that *you train* (``saesteer collect`` + ``saesteer
  train``; the paper released no SAE), clamp values 10 and 12.
* public-SAE presets: a popular chat model with a published residual-stream SAE, named by its exact hub location
  (``hf://REPO/PATH``; the SAELens ``release`` / ``sae_id`` for the same SAE is recorded too).

A public preset's SAE resolves through ``huggingface_hub`` (which honours ``HF_ENDPOINT``, ``HF_HOME`` and
``HF_HUB_OFFLINE``) into a local folder that :func:`saesteer.sae.load_sae` reads; only the files under ``PATH`` are
fetched. ``SAESTEER_PRESET_SAE_DIR=DIR`` (or ``resolve_sae(..., local_dir=DIR)``) uses ``DIR/REPO/PATH`` instead —
for machines without internet, where the folder was copied by hand.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saesteer.core import SaesteerError, ensure

LOCAL_DIR_ENV = "SAESTEER_PRESET_SAE_DIR"
TRAIN = "train"  # the SAE source of a preset without a public SAE


@dataclass(frozen=True)
class Preset:
    """One setting. ``layer`` is our layer index (the decoder layer whose output the SAE reads)."""

    name: str
    model: str  # hub id of the chat model
    arch: str  # transformers model_type (phi3, gemma2, llama, qwen2)
    n_layers: int
    d_model: int
    layer: int
    hook_point: str  # the hook point as the SAE's authors name it
    sae_source: str  # "train", or hf://REPO/PATH
    sae_layout: str  # file layout load_sae detects: saesteer, gemmascope, dictionary_learning, saelens, sparsify
    sae_arch: str  # topk, jumprelu, batchtopk, relu
    width: int  # SAE latents
    clamps: tuple[float, ...]  # clamp grid in the SAE's latent units (the first is the default clamp)
    dtype: str  # model dtype the preset runs in
    model_licence: str
    sae_licence: str
    citation: str
    k: int | None = None  # active latents per token (Top-k / BatchTopK)
    expansion: int | None = None  # train stage: num_latents = expansion x d_model
    saelens: tuple[str, str] | None = None  # (release, sae_id) in SAELens' pretrained_saes.yaml
    notes: str = ""
    eval_format: str = "prefix judge (any refusal judge works)"

    @property
    def public(self) -> bool:
        return self.sae_source != TRAIN

    @property
    def hub(self) -> tuple[str, str]:
        """(repo_id, path inside the repo) of a public SAE."""
        ensure(self.public, f"preset {self.name!r} has no public SAE: train it (saesteer collect + saesteer train "
                            f"--preset {self.name})")
        rest = self.sae_source.removeprefix("hf://")
        owner, name, *path = rest.split("/")
        return f"{owner}/{name}", "/".join(path)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clamps"] = list(self.clamps)
        d["saelens"] = list(self.saelens) if self.saelens else None
        return d


_GEMMA_LIC = "Gemma Terms of Use"
_GEMMASCOPE = ("Lieberum et al. 2024, Gemma Scope: Open Sparse Autoencoders Everywhere All At Once on Gemma 2, "
               "arXiv 2408.05147")
_ANDYRDT_LIC = "not declared on the hub repo (no licence tag or file; ask the author before redistributing)"
_ANDYRDT = ("Andy Arditi, BatchTopK SAEs trained with dictionary_learning (saprmarks/dictionary_learning); listed in "
            "SAELens pretrained_saes.yaml since v6.12.0")

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="obrien2024", model="microsoft/Phi-3-mini-4k-instruct", arch="phi3", n_layers=32, d_model=3072,
        layer=16, hook_point="model.layers.16", sae_source=TRAIN, sae_layout="saesteer", sae_arch="topk",
        width=24_576, k=32, expansion=8, clamps=(10.0, 12.0), dtype="bfloat16", model_licence="MIT",
        sae_licence="yours (trained here)", eval_format="WildGuard-format refusal verdicts",
        citation="O'Brien et al. 2024, Steering Language Model Refusal with Sparse Autoencoders, arXiv 2411.11296",
        notes="train-your-own SAE stage: saesteer collect --preset obrien2024 ...; saesteer train --preset "
              "obrien2024 ... (k=32, expansion 8 = 24,576 latents). Layer 16 = the middle of Phi-3-Mini's 32 "
              "layers; check it against the paper before claiming a replication."),
    Preset(
        name="gemma2-9b-it-gemmascope", model="google/gemma-2-9b-it", arch="gemma2", n_layers=42, d_model=3584,
        layer=20, hook_point="blocks.20.hook_resid_post",
        sae_source="hf://google/gemma-scope-9b-it-res/layer_20/width_16k/average_l0_91", sae_layout="gemmascope",
        sae_arch="jumprelu", width=16_384, clamps=(20.0, 40.0, 80.0), dtype="bfloat16", model_licence=_GEMMA_LIC,
        sae_licence="CC-BY-4.0", citation=_GEMMASCOPE,
        saelens=("gemma-scope-9b-it-res-canonical", "layer_20/width_16k/canonical"),
        notes="Gemma Scope residual SAE trained on the chat model itself (gemma-2-9b-it). Clamp grid: a starting "
              "grid (choose with saesteer features)."),
    Preset(
        name="gemma2-2b-it-gemmascope", model="google/gemma-2-2b-it", arch="gemma2", n_layers=26, d_model=2304,
        layer=12, hook_point="blocks.12.hook_resid_post",
        sae_source="hf://google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82", sae_layout="gemmascope",
        sae_arch="jumprelu", width=16_384, clamps=(20.0, 40.0, 80.0), dtype="bfloat16", model_licence=_GEMMA_LIC,
        sae_licence="CC-BY-4.0", citation=_GEMMASCOPE,
        saelens=("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical"),
        notes="The smallest public-SAE setting (fits a 16 GB GPU in bf16). Gemma Scope released no residual SAEs of "
              "gemma-2-2b-it: this one was trained on the base model (gemma-2-2b), which Gemma Scope reports "
              "transfers to the chat model; check its reconstruction on chat data (saesteer sae-eval) first. Layer "
              "12 of 26, the middle, as for the default model. Clamp grid: a starting grid (choose with saesteer "
              "features)."),
    Preset(
        name="llama3.1-8b-it-andyrdt", model="meta-llama/Llama-3.1-8B-Instruct", arch="llama", n_layers=32,
        d_model=4096, layer=19, hook_point="resid_post_layer_19",
        sae_source="hf://andyrdt/saes-llama-3.1-8b-instruct/resid_post_layer_19/trainer_1",
        sae_layout="dictionary_learning", sae_arch="batchtopk", width=131_072, clamps=(4.0, 8.0, 16.0),
        dtype="bfloat16", model_licence="Llama 3.1 Community License", sae_licence=_ANDYRDT_LIC, citation=_ANDYRDT,
        saelens=("llama-3.1-8b-instruct-andyrdt", "resid_post_layer_19_trainer_1"),
        notes="BatchTopK SAE trained on the chat model (ae.pt + config.json). Width 131,072 is inferred from the "
              "file sizes; load_sae reads the real dict_size and k from config.json and the layer check is exact."),
    Preset(
        name="qwen2.5-7b-it-andyrdt", model="Qwen/Qwen2.5-7B-Instruct", arch="qwen2", n_layers=28, d_model=3584,
        layer=15, hook_point="resid_post_layer_15",
        sae_source="hf://andyrdt/saes-qwen2.5-7b-instruct/resid_post_layer_15/trainer_1",
        sae_layout="dictionary_learning", sae_arch="batchtopk", width=131_072, clamps=(4.0, 8.0, 16.0),
        dtype="bfloat16", model_licence="Apache-2.0", sae_licence=_ANDYRDT_LIC, citation=_ANDYRDT,
        saelens=("qwen2.5-7b-instruct-andyrdt", "resid_post_layer_15_trainer_1"),
        notes="BatchTopK SAE trained on the chat model (ae.pt + config.json). Width 131,072 is inferred from the "
              "file sizes; load_sae reads the real dict_size and k from config.json."),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SaesteerError(f"unknown preset {name!r} (known: {', '.join(PRESETS)}; see saesteer presets)")
    return PRESETS[name]


def list_presets() -> list[dict[str, Any]]:
    return [p.to_dict() for p in PRESETS.values()]


def resolve_sae(preset: Preset | str, local_dir: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None) -> Path:
    """Local folder holding the preset's SAE (``load_sae`` reads it).

    ``local_dir`` (default ``$SAESTEER_PRESET_SAE_DIR``): use ``local_dir/REPO/PATH`` and download nothing. Otherwise
    ``huggingface_hub.snapshot_download`` fetches only ``PATH/*`` of the repo (``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` /
    ``cache_dir`` or ``HF_HOME`` honoured) and the cached copy is reused."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    repo, path = p.hub
    local_dir = local_dir if local_dir is not None else (os.environ.get(LOCAL_DIR_ENV) or None)
    if local_dir is not None:
        q = Path(local_dir).expanduser() / repo / path
        ensure(q.is_dir(), f"preset {p.name}: {q} not found ({LOCAL_DIR_ENV} must hold {repo}/{path}, a copy of "
                           f"{p.sae_source})")
        return q
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo_id=repo, allow_patterns=[f"{path}/*"], cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: one line with what to do
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SaesteerError(f"preset {p.name}: could not fetch {p.sae_source} ({type(e).__name__}: {first}); "
                            f"download {repo} (files {path}/*) where there is internet and point {LOCAL_DIR_ENV} at a "
                            f"folder holding {repo}/{path}") from None
    q = Path(root) / path
    ensure(q.is_dir(), f"preset {p.name}: {p.sae_source} has no files under {path}")
    return q


def check_model(preset: Preset, model: Any, layer: int | None = None) -> int:
    """The layer to hook on ``model`` for this preset; one clear error when the model is of another architecture or
    has too few layers (``layer`` overrides the preset's layer, e.g. on a smaller test model)."""
    from saesteer.models import check_layer

    mt = getattr(model.config, "model_type", "")
    ensure(mt == preset.arch, f"preset {preset.name} is for {preset.arch} models ({preset.model}), got a {mt} model")
    return check_layer(model, preset.layer if layer is None else layer)


def check_sae(preset: Preset, sae: Any, model: Any, layer: int) -> None:
    """The SAE fits the model at ``layer`` (residual width, the SAE's own layer and model): one error line."""
    from saesteer.sae import check_compatible

    try:
        check_compatible(sae, model, layer)
    except SaesteerError as e:
        raise SaesteerError(f"preset {preset.name}: {e}") from None
