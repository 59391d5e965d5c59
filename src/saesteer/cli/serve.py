"""``saesteer serve``: the OpenAI-compatible chat server for a (steered) model."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from saesteer.core import ensure
from saesteer.models import DEFAULT_MODEL

from ._app import app
from .common import load
from .options import DEVICE_HELP, MODEL_HELP, THREADS_HELP, SteeringOptions, steering_options
from .presets import DTYPE_OPT, QUANTIZE_AUTO_OPT


@app.command()
@steering_options("sae", "feature", "clamp", "alpha", "direction", "layer", "spec")
def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    policy: Optional[Path] = typer.Option(None, help="policy file (conditional steering) served as NAME+<file stem>"),
    steering: SteeringOptions = None,  # type: ignore[assignment]  (served as NAME+refusal-clamp; @steering_options)
    steer_name: Optional[str] = typer.Option(None, "--steer-name", help="suffix of the steered model name"),
    base_name: str = typer.Option("default", "--base-name", help="name of the unsteered model in /v1/models"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (non-loopback needs --api-key or --insecure)"),
    insecure: bool = typer.Option(False, "--insecure", help="allow a non-loopback --host without an API key"),
    docs: bool = typer.Option(False, "--docs", help="serve /docs, /redoc, /openapi.json (behind the API key)"),
    allow_sae: Optional[List[str]] = typer.Option(
        None, "--allow-sae", help="SAE folder (NAME=PATH or PATH; repeatable) that requests may steer with "
        "(extra_body steering.features); --sae is allowed too, as 'sae'"),
    steer_max_features: int = typer.Option(8, help="most per-request steering feature edits"),
    steer_max_value: float = typer.Option(200.0, help="largest |clamp| / |add| of a per-request feature edit"),
    port: int = typer.Option(8000, help="TCP port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SAESTEER_API_KEY",
                                          help="require 'Authorization: Bearer KEY' (env SAESTEER_API_KEY)"),
    max_batch: int = typer.Option(16, help="most requests decoded together"),
    max_queue: int = typer.Option(64, help="requests in flight before 429"),
    max_tokens_limit: int = typer.Option(512, help="largest max_tokens a request may ask for"),
    max_body_bytes: int = typer.Option(1_000_000, help="largest request body (413 above it)"),
    dtype: Optional[str] = DTYPE_OPT,
    quantize: str = QUANTIZE_AUTO_OPT,
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    decode_threads: Optional[int] = typer.Option(None, help="threads for decode steps (1 often wins on a busy CPU)"),
) -> None:
    """Serve MODEL (plus steered variants) at http://HOST:PORT/v1 — chat completions, streaming, /v1/models, /health."""
    from saesteer.serve import ServeConfig, check_bind, run_server, served_models

    ensure(1 <= port <= 65535, f"--port must be in 1..65535, got {port}")
    check_bind(host, api_key, insecure)
    saes: dict[str, str] = {}
    for item in ([f"sae={steering.sae}"] if steering.sae is not None else []) + list(allow_sae or []):
        name, path = item.split("=", 1) if "=" in item else (Path(item).name, item)
        ensure(name not in saes, f"--allow-sae name {name!r} given twice")
        ensure(Path(path).exists(), f"SAE folder not found: {path}")
        saes[name] = path
    ensure(max_batch >= 1 and max_queue >= 1 and max_tokens_limit >= 1, "--max-batch/--max-queue/--max-tokens-limit must be >= 1")
    specs = steering.specs()
    if policy is not None:
        ensure(policy.exists(), f"policy file not found: {policy}")
    m, tok = load(model, device, threads, dtype, quantize)
    name = steer_name or ("refusal-clamp" if steering.sae is not None and steering.clamp else None)
    served = served_models(m, base=base_name, policy=str(policy) if policy else None,
                           specs=[s.to_dict() for s in specs] or None, steer_name=name)
    cfg = ServeConfig(host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                      max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes,
                      decode_threads=decode_threads, insecure=insecure, docs=docs,
                      steer_max_features=steer_max_features, steer_max_value=steer_max_value)
    typer.echo(f"saesteer: serving {', '.join(served)} on http://{host}:{port}/v1"
               + (" (API key required)" if api_key else ""), err=True)
    if saes:
        typer.echo(f"saesteer: per-request steering may use SAE(s) {', '.join(saes)}", err=True)
    run_server(m, tok, served, cfg, saes=saes or None)
