"""Serving: an OpenAI-compatible HTTP server for a steered model (``server``) — chat and text completions,
streaming, log-probabilities, per-request steering mixed in one batch, auth and limits — and its request schema
(``schema``, pydantic).
"""

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
from .server import (  # noqa: F401
    LOOPBACK_NAMES,
    MIN_TEMPERATURE,
    ROLES,
    Engine,
    RedactQuery,
    ServeConfig,
    ServedSteering,
    check_bind,
    install_log_redaction,
    is_loopback,
    key_matches,
    make_app,
    parse_completion,
    parse_request,
    run_server,
    served_models,
)
