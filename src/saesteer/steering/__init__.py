"""Steering: interventions on the residual stream (clamp / scale / ablate a latent, add / ablate a direction), the hooks
that install them, the serialisable steering spec, and the Arditi refusal direction.
"""

from .direction import (  # noqa: F401
    REFUSAL_PREFIXES,
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
from .interventions import (  # noqa: F401
    KINDS,
    POSITIONS,
    AblateDirection,
    AblateFeature,
    Add,
    Clamp,
    Intervention,
    PositionTracker,
    Scale,
    SteeringSpec,
    active_interventions,
    build_all,
    check_sae_compatible,
    latent_vectors,
    load_specs,
    sae_d_in,
    sae_layer,
    sae_num_latents,
    select_rows,
    set_row_scale,
    steer,
)
