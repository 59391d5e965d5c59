"""Experiments: clamp sweeps (``sweep``), policy comparisons with tables / goals / Pareto plots (``compare``), HTML
reports (``report``), and the one results format they share (``results``: ``results.jsonl``, folder names, pooling).
"""

from .acceptance import acceptance, acceptance_table, baseline_kind  # noqa: F401
from .compare import (  # noqa: F401
    CAP_METRICS,
    GROUPS,
    CompareConfig,
    gate_fired,
    goals,
    held_out_exclusions,
    low_side_rate,
    markdown_table,
    pareto_front,
    pareto_plot,
    policy_conditions,
    run_compare,
    table_cells,
    write_report,
)
from .report import (  # noqa: F401
    COLORS,
    conditions,
    examples,
    highlight,
    load_run,
    make_report,
    plot_categories,
    plot_clamp,
    plot_tradeoff,
    render_html,
)
from .results import RESULTS, pooled, read_results, results_file, slug, write_results  # noqa: F401
from .sweep import (  # noqa: F401
    EVAL_KEYS,
    SweepConfig,
    condition_rows,
    excluded_ids,
    plan_conditions,
    run_sweep,
)
