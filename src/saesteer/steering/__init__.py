"""Steering: interventions on the residual stream (clamp / scale / ablate an SAE latent with its error term kept, add
or ablate a direction) in ``interventions``; installing them as hooks for a ``with`` block in ``hooks``
(:func:`steer`); the serialisable steering spec in ``spec``; the Arditi refusal direction in ``direction``.
"""

from .direction import (  # noqa: F401
    DirectionConfig,
    RefusalDirection,
    default_layers,
    fit_direction,
    load_direction,
    mean_activations,
    post_instruction_len,
    refusal_scores,
    refusal_token_ids,
    save_direction,
)
from .hooks import PositionTracker, active_interventions, select_rows, set_row_scale, steer  # noqa: F401
from .interventions import (  # noqa: F401
    KINDS,
    POSITIONS,
    Ablate,
    AblateDirection,
    AblateFeature,
    Add,
    Clamp,
    Intervention,
    Scale,
    check_sae_compatible,
    finite,
)
from .presets import PRESETS, Preset, get_preset, list_presets, resolve_sae  # noqa: F401
from .spec import (  # noqa: F401
    Steering,
    SteeringSpec,
    as_steering,
    build_all,
    load_sae_cached,
    load_specs,
    spec_name,
    with_strength,
)
