"""Serving: an OpenAI-compatible HTTP server for a steered model.
"""

from .server import (  # noqa: F401
    ROLES,
    Engine,
    ServeConfig,
    make_app,
    parse_request,
    run_server,
    served_models,
)
