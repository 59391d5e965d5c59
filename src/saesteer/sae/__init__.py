"""SAEs: the Top-k SAE we train, its trainer, the file formats of other libraries, and its quality metrics.
"""

from .formats import (  # noqa: F401
    check_compatible,
    detect_format,
    export_saelens,
    export_sparsify,
    load_sae,
    save_sae,
)
from .quality import (  # noqa: F401
    DENSE_THRESHOLD,
    SAEEvalConfig,
    evaluate_sae,
    plot_density,
    run_sae_eval,
)
from .topk import (  # noqa: F401
    SAEConfig,
    TopKSAE,
    geometric_median,
    lr_for,
    sparse_decode,
)
from .trainer import (  # noqa: F401
    CKPT_DIR,
    CKPT_FILE,
    BatchReader,
    TrainConfig,
    epoch_order,
    load_checkpoint,
    open_cache,
    save_checkpoint,
    train,
)
