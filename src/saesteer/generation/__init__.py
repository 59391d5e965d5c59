"""Generation: fast batched greedy decoding with steering hooks active, and the shared-prefix prefill.
"""

from .decode import (  # noqa: F401
    GenerationConfig,
    Row,
    StepEvent,
    batches,
    decode_rows,
    encode_prompts,
    eos_token_ids,
    generate,
    generate_rows,
    generate_stream,
)
from .kvprefill import (  # noqa: F401
    GROUP_OVERHEAD,
    MIN_SHARED,
    length_groups,
    prefill,
    shared_prefix_len,
)
from .reuse import AnswerStore, settings_key  # noqa: F401
