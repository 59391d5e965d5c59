"""Activations: residual-stream collection after a layer (resumable, distributed) into a memory-mapped cache.
"""

from .cache import (  # noqa: F401
    FORMAT,
    ActivationCache,
    same_layer,
)
from .collect import (  # noqa: F401
    CollectConfig,
    collect,
    keep_mask,
    make_batches,
    pad_right,
    parse_mix_spec,
    tokenize_docs,
)
