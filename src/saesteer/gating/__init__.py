"""Gating: conditional steering — gates (probe, CAST, SAE feature), policies (gate + threshold + steering in one
file) and fitting them on labelled prompts.
"""

from .config import specs_from_options, split_values, steering_from_options  # noqa: F401
from .fit import (  # noqa: F401
    PolicyFitConfig,
    fit_policy,
    gate_inputs_file,
    gate_inputs_key,
    item_keys,
    load_slice,
    split_weight,
    template_ids,
    text_key,
    turn_prefixes,
)
from .gates import (  # noqa: F401
    REDUCE_MODES,
    STRENGTH_MODES,
    AlwaysGate,
    CastGate,
    Gate,
    ProbeGate,
    SAEFeatureGate,
    choose_low_threshold,
    choose_threshold,
    choose_threshold_per_set,
    collect_gate_inputs,
    gate_from_header,
    make_gate,
    post_instruction_positions,
    strength_from_scores,
)
from .policy import (  # noqa: F401
    FORMAT,
    GATE_READS,
    SAFETY_SYSTEM_PROMPT,
    VERSION,
    Policy,
    PolicyRun,
    check_same_tokenizer,
    load_gate_model,
    load_policy,
    policy_label,
    policy_summary,
    prompt_key,
)
from .windows import WindowRead  # noqa: F401
