"""Features: per-token SAE latents (``latents``), refusal-feature discovery — paper candidates, contrastive
ranking — (``discovery``), the clamp grid search (``grid``) and feature cards (``cards``).
"""

from .cards import (  # noqa: F401
    CardConfig,
    feature_cards,
    final_norm_weight,
    grid_table_html,
    histogram,
    logit_effects,
    render_html,
    write_cards,
)
from .discovery import (  # noqa: F401
    Discovery,
    DiscoveryConfig,
    Prompt,
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
    clamp_values,
    grid_search,
    heldout_check,
    make_scorer,
    refusal_judge,
)
from .latents import (  # noqa: F401
    SeqLatents,
    dense_mean,
    encode_sequences,
)
