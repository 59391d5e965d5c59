"""Experiments: clamp sweeps, policy comparisons with tables / goals / Pareto plots, and HTML reports.
"""

from .compare import (  # noqa: F401
    CAP_METRICS,
    GROUPS,
    CompareConfig,
    gate_fired,
    goals,
    held_out_exclusions,
    markdown_table,
    pareto_front,
    pareto_plot,
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
from .sweep import (  # noqa: F401
    EVAL_KEYS,
    SweepConfig,
    condition_rows,
    excluded_ids,
    plan_conditions,
    run_sweep,
    slug,
)
