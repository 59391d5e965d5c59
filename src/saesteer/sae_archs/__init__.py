"""Published SAE architectures (ReLU, JumpReLU, Top-k, BatchTopK) behind one interface, and the file layouts they
come in (SAELens, Gemma Scope, sparsify, dictionary_learning). See :mod:`saesteer.sae_archs.base` for the interface
and :mod:`saesteer.sae_archs.loaders` for the layouts and the ``hookpoint`` / ``PATH:HOOKPOINT`` choice."""

from saesteer.sae_archs.base import (
           ARCHS,
           ArchConfig,
           BaseSAE,
           make_sae,
           register_arch,
           sae_info,
)
from saesteer.sae_archs.batchtopk import BatchTopKSAE
from saesteer.sae_archs.hookpoints import (
           layer_from_hookpoint,
           sae_path_exists,
           same_model,
           split_hookpoint,
)
from saesteer.sae_archs.jumprelu import JumpReLUSAE
from saesteer.sae_archs.loaders import load_any, resolve
from saesteer.sae_archs.relu import ReLUSAE
from saesteer.sae_archs.topk import TopKDecSAE

__all__ = ["ARCHS", "ArchConfig", "BaseSAE", "BatchTopKSAE", "JumpReLUSAE", "ReLUSAE", "TopKDecSAE", "layer_from_hookpoint",
           "load_any", "make_sae", "register_arch", "resolve", "sae_info", "sae_path_exists", "same_model", "split_hookpoint"]
