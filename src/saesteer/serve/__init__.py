"""Serving: an OpenAI-compatible HTTP server for a steered model — the app and its routes (``server``), the batching
engine (``engine``), request parsing and per-request steering (``requests``), security helpers (``security``) and
the pydantic request schema (``schema``).
"""

from .engine import (  # noqa: F401
    Engine,
    PendingRequest,
    ServeConfig,
    ServedSteering,
    SteeringFactory,
)
from .requests import (  # noqa: F401
    MIN_TEMPERATURE,
    ROLES,
    HTTPError,
    ResolvedSteering,
    parse_completion,
    parse_request,
)
from .schema import (  # noqa: F401
    HARMLESS,
    ChatRequest,
    CompletionRequest,
    FeatureEdit,
    Message,
    SteeringRequest,
    StreamOptions,
    TextPart,
    format_validation_error,
)
from .security import (  # noqa: F401
    LOOPBACK_NAMES,
    RedactQuery,
    check_bind,
    install_log_redaction,
    is_loopback,
    key_matches,
)
from .server import (  # noqa: F401
    make_app,
    run_server,
    served_models,
)
