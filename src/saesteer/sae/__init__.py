"""SAEs: the Top-k SAE we train (``model``), its trainer, the published architectures and file layouts others train
in (``archs``: SAELens ReLU / JumpReLU / TopK / BatchTopK, Gemma Scope, sparsify, dictionary_learning) behind one
interface, loading / saving / exporting (``formats``), and quality metrics (``quality``).
"""

from .archs import (  # noqa: F401
    ARCHS,
    BaseSAE,
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    detect_format,
    layer_from_hookpoint,
    load_sae,
    sae_info,
    sae_path_exists,
    split_hookpoint,
)
from .formats import (  # noqa: F401
    check_compatible,
    export_saelens,
    export_sparsify,
    save_sae,
)
from .model import (  # noqa: F401
    SAEConfig,
    TopKSAE,
    geometric_median,
    lr_for,
    sparse_decode,
)
from .quality import (  # noqa: F401
    DENSE_THRESHOLD,
    SAEEvalConfig,
    evaluate_sae,
    plot_density,
    run_sae_eval,
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
