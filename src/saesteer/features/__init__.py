"""Features: per-token latents, refusal-feature discovery (candidates, contrastive ranking, clamp grid) and feature cards.
"""

from .cards import (  # noqa: F401
    CardConfig,
    SeqLatents,
    check_features,
    dense_mean,
    encode_sequences,
    feature_cards,
    final_norm_weight,
    grid_table_html,
    histogram,
    logit_effects,
    render_html,
    sae_layer,
    sae_layer_or_none,
    write_cards,
)
from .discovery import (  # noqa: F401
    Discovery,
    DiscoveryConfig,
    Prompt,
    auroc,
    contrast,
    contrastive_ranking,
    direction_latents,
    discover,
    discovery_and_val,
    find_candidates,
    firing_counts,
    grid_candidates,
    load_split_prompts,
    pick_control,
    refusal_direction_cos,
)
from .grid import (  # noqa: F401
    REFUSAL_PREFIXES,
    clamp_values,
    grid_search,
    heldout_check,
    make_scorer,
    refusal_judge,
)
