"""Published SAE architectures (ReLU, JumpReLU, Top-k, BatchTopK) behind one interface, and the file layouts they
come in (SAELens, Gemma Scope, sparsify, dictionary_learning). See :mod:`saesteer.sae.archs.base` for the interface
and :mod:`saesteer.sae.archs.loaders` for the layouts and the ``hookpoint`` / ``PATH:HOOKPOINT`` choice."""

from .base import (
    ARCHS,
    ArchConfig,
    BaseSAE,
    make_sae,
    register_arch,
    sae_info,
)
from .batchtopk import BatchTopKSAE
from .hookpoints import (
    base_of,
    layer_from_hookpoint,
    sae_path_exists,
    same_model,
    split_hookpoint,
)
from .jumprelu import JumpReLUSAE
from .loaders import detect_format, load_any, load_sae, resolve
from .relu import ReLUSAE
from .topk import TopKDecSAE

__all__ = ["ARCHS", "ArchConfig", "BaseSAE", "BatchTopKSAE", "base_of", "detect_format", "load_sae", "JumpReLUSAE", "ReLUSAE", "TopKDecSAE", "layer_from_hookpoint",
    "load_any", "make_sae", "register_arch", "resolve", "sae_info", "sae_path_exists", "same_model", "split_hookpoint"]
