"""OpenAI-compatible server for a steered model (FastAPI + uvicorn).

``POST /v1/chat/completions`` and ``POST /v1/completions`` (raw prompts: text or token ids; plain and SSE streaming;
temperature, top_p, max_tokens, stop, seed, n, logprobs / top_logprobs, ``stream_options.include_usage``),
``GET /v1/models`` (one entry per served steering config, e.g. ``default`` and ``default+refusal-clamp``),
``GET /v1/steering`` (what per-request steering may use), ``GET /health``.

Per-request steering (extension; the ``openai`` client sends it with ``extra_body``): ``"steering": {"policy":
"<served name>"}`` or ``{"features": [{"sae": "<allowed SAE>", "feature": 981, "clamp": 5.0}, ...],
"positions": "all"}``, bounded by the server's limits (allowed SAEs, ``steer_max_features``, value ranges); it is
echoed in the response as ``steering``. Requests whose steering is made of interventions (the unsteered model, a
``served_models(specs=...)`` entry, per-request features) are decoded **in the same batch** whatever their steering:
every intervention of the batch is installed once and its ``row_scale`` is 1 on the rows that asked for it and 0 on the
others (``steering`` per-row machinery). A served *policy* or ``extra`` factory (an opaque context manager) is decoded
in batches of its own, as before. Requests that arrive together (within ``batch_wait_ms``) are decoded as one batch by a
single worker thread (``generation.decode_rows``), each row with its own settings; finished rows leave the batch.
A client that disconnects mid-stream has its rows cancelled at the next step; the server keeps serving.

Every error has an OpenAI-shaped JSON body ``{"error": {"message", "type", "param", "code"}}``: 401 without the API
key, 404 for an unknown model or path, 405 for a wrong method, 400 for limits and for parameters the server does not
implement (``code: unsupported_parameter``), 413 for a body over ``max_body_bytes``, 422 for malformed JSON or a
field of the wrong type, 429 when the queue is full, 500 (``server_error``) for anything unexpected.

Security: the key is compared in constant time (``hmac.compare_digest``), the scheme is case-insensitive, every path
but ``/health`` needs it, the OpenAPI docs are off unless ``ServeConfig.docs`` (and then behind the key too), the
access log never shows query strings, and :func:`check_bind` refuses a non-loopback ``host`` without a key unless
``insecure``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import Any

import torch
from fastapi import Request  # module level: FastAPI resolves the string annotations of the endpoints here

from saesteer.core import SaesteerError, ensure
from saesteer.generation import Row, encode_prompts
from saesteer.models import model_name

from .engine import Engine, PendingRequest, ServeConfig, ServedSteering, SteeringFactory
from .requests import HTTPError, ResolvedSteering, parse_completion, parse_request
from .security import check_bind, install_log_redaction, key_matches

# --------------------------------------------------------------------------------------------- app
_STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                 413: "invalid_request_error", 429: "rate_limit_error"}


def _error(status: int, message: str, type_: str | None = None, code: str | None = None, param: str | None = None,
           headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse

    if type_ is None:
        type_ = "server_error" if status >= 500 else _STATUS_TYPES.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _http_error(e: HTTPError):
    return _error(e.status, e.message, e.type, e.code, e.param)


def _token_str(tok: Any, i: int) -> str:
    return tok.decode([i])


def _trim_logprobs(tok: Any, row: Row) -> list[Any]:
    """The row's log-prob entries, without tokens cut off by a stop string."""
    lps = row.token_logprobs
    if row.finish_reason == "stop" and lps and len(tok.decode(row.out_ids, skip_special_tokens=True)) > len(row.text):
        k = len(lps)
        while k > 0 and len(tok.decode(row.out_ids[:k], skip_special_tokens=True)) > len(row.text):
            k -= 1
        lps = lps[:k]
    return lps


def _chat_logprobs(tok: Any, row: Row) -> dict[str, Any]:
    def entry(i: int, lp: float) -> dict[str, Any]:
        s = _token_str(tok, i)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [entry(t, lp) | {"top_logprobs": [entry(a, b) for a, b in alts]}
                        for t, lp, alts in _trim_logprobs(tok, row)], "refusal": None}


def _completion_logprobs(tok: Any, row: Row) -> dict[str, Any]:
    lps = _trim_logprobs(tok, row)
    tokens = [_token_str(tok, t) for t, _, _ in lps]
    offsets, pos = [], 0
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    top: list[dict[str, float]] = []
    for _, _, alts in lps:
        d: dict[str, float] = {}
        for a, b in alts:
            d.setdefault(_token_str(tok, a), b)
        top.append(d)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in lps], "top_logprobs": top, "text_offset": offsets}


def make_app(model: Any, tok: Any, served: dict[str, SteeringFactory | None], cfg: ServeConfig | None = None,
             saes: dict[str, Any] | None = None):
    """The FastAPI app (its ``state.engine`` runs the worker; call ``app.state.engine.close()`` when done).

    ``saes``: name -> SAE (object, or a path ``formats.load_sae`` reads) that per-request ``steering.features`` may
    edit; none: per-request feature steering is off (``steering.policy`` still selects a served config).
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from saesteer.steering import check_sae_compatible

    cfg = cfg or ServeConfig()
    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("SAESTEER_API_KEY") or None
    allowed: dict[str, Any] = {}
    for k, s in (saes or {}).items():
        if isinstance(s, (str, os.PathLike)):
            from saesteer.sae import load_sae

            s = load_sae(s)
        layer = s.trained_layer
        ensure(layer is not None, f"SAE {k!r} records no layer; per-request steering needs one")
        check_sae_compatible(s, model, layer)
        allowed[k] = s
    engine = Engine(model, tok, served, cfg)
    docs = {} if cfg.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="saesteer", description="Steered chat model, OpenAI-compatible API", **docs)
    app.state.engine = engine
    base = model_name(model)
    created = int(time.time())
    log = logging.getLogger("saesteer.serve.server")

    @app.exception_handler(StarletteHTTPException)
    async def http_exc(_request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, f"{msg}: {_request.method} {_request.url.path}", code=code,
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_exc(_request: Request, exc: RequestValidationError):
        return _error(422, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def any_exc(_request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", _request.method, _request.url.path)
        return _error(500, f"internal server error ({type(exc).__name__})", "server_error")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/health":
            if api_key is not None and not key_matches(request.headers.get("authorization"), api_key):
                return _error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                              code="invalid_api_key")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
                return _error(413, f"request body of {size} bytes exceeds the limit of {cfg.max_body_bytes}")
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001 - an OpenAI-shaped 500, never a plain-text one
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return _error(500, f"internal server error ({type(e).__name__})", "server_error")

    dtype = next((p.dtype for p in engine.model.parameters()), None)
    weights = {"dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
               "quantize": getattr(engine.model, "saesteer_quantize", "none")}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": base, "served": list(served), "active_requests": engine.active,
                "batches_run": engine.batches_run, "weights": weights}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "saesteer",
                                            "root": base} for n in served]}

    @app.get("/v1/steering")
    async def steering_info():
        return {"object": "steering.limits", "policies": [n for n, f in served.items() if f is not None],
                "saes": {k: {"layer": s.trained_layer, "num_latents": int(s.num_latents)} for k, s in allowed.items()},
                "max_features": cfg.steer_max_features, "max_abs_value": cfg.steer_max_value,
                "max_abs_scale": cfg.steer_max_scale, "mixed_batches": True}

    async def read_body(request: Request) -> Any:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cfg.max_body_bytes:
                raise HTTPError(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(422, f"malformed JSON body: {e}") from None
        except RecursionError:
            raise HTTPError(422, "malformed JSON body: nested too deeply") from None

    def encode(messages_or_prompts: list[Any], raw: bool, system_prefix: str | None = None) -> list[list[int]]:
        out = []
        for i, p in enumerate(messages_or_prompts):
            if raw and isinstance(p, list):  # token ids
                vocab = len(tok)
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise HTTPError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                     param="prompt")
                ids = list(p)
            else:
                try:
                    ids = encode_prompts(tok, [p], raw=raw, system_prefix=system_prefix)[0]
                except SaesteerError as e:
                    raise HTTPError(400, str(e)) from None
                except Exception as e:  # noqa: BLE001 - the tokenizer refused the text
                    raise HTTPError(400, f"the prompt could not be tokenized: {type(e).__name__}: {e}") from None
            if len(ids) > cfg.max_prompt_tokens:
                raise HTTPError(400, f"prompt is {len(ids)} tokens; the limit is {cfg.max_prompt_tokens}",
                                 code="context_length_exceeded", param="messages" if not raw else "prompt")
            out.append(ids)
        return out

    def make_request(p: dict[str, Any], ids: list[list[int]], prefix: str) -> PendingRequest:
        rows = []
        base_seed = p["seed"] if p["seed"] is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
        for pi, x in enumerate(ids):
            for j in range(p["n"]):
                gen = None
                if p["temperature"] > 0:
                    k = pi * p["n"] + j
                    gen = torch.Generator().manual_seed((base_seed + k) % 2**63)
                rows.append(Row(0, x, p["max_tokens"], tuple(p["stop"]), None, p["temperature"], p["top_p"], gen,
                                logprobs=p["logprobs"]))
        st: ResolvedSteering = p["steer"]
        group = f"served:{st.config}" if st.factory is not None else "mix"
        return PendingRequest(f"{prefix}-{uuid.uuid4().hex[:24]}", group, rows, sum(len(x) for x in ids),
                        asyncio.get_running_loop(), st.factory, st.interventions)

    async def handle(request: Request, chat: bool):
        try:
            body = await read_body(request)
            if chat:
                p = parse_request(body, cfg, served, allowed)
                # a served policy's system prompt is formatted in here: the decoder never sees these messages
                ids = encode([p["messages"]], raw=False, system_prefix=getattr(p["steer"].factory, "system_prefix", None))
            else:
                p = parse_completion(body, cfg, served, allowed)
                ids = encode(p["prompts"], raw=True)
        except HTTPError as e:
            return _http_error(e)
        if not engine.try_admit():
            return _error(429, f"server busy: {cfg.max_queue} requests in flight; retry later", "rate_limit_error")
        try:
            req = make_request(p, ids, "chatcmpl" if chat else "cmpl")
        except Exception:
            engine.release()
            raise
        created_at = int(time.time())  # one value for every chunk of this response
        engine.submit(req)
        if p["stream"]:
            return StreamingResponse(_sse(req, engine, p, created_at, chat), media_type="text/event-stream")
        try:
            texts, finishes = await asyncio.wait_for(_collect(req), timeout=cfg.request_timeout_s)
        except asyncio.TimeoutError:
            return _error(504, "generation timed out", "server_error")
        except HTTPError as e:
            return _http_error(e)
        finally:  # also on cancellation (client gone): stop decoding these rows at the next step
            req.cancel()
            engine.release()
        choices = []
        for j, (row, text, fin) in enumerate(zip(req.rows, texts, finishes)):
            if chat:
                c = {"index": j, "message": {"role": "assistant", "content": text}, "finish_reason": fin,
                     "logprobs": _chat_logprobs(tok, row) if p["logprobs"] is not None else None}
            else:
                c = {"index": j, "text": text, "finish_reason": fin,
                     "logprobs": _completion_logprobs(tok, row) if p["logprobs"] is not None else None}
            choices.append(c)
        return JSONResponse({
            "id": req.rid, "object": "chat.completion" if chat else "text_completion", "created": created_at,
            "model": p["model"], "choices": choices, "usage": _usage(req), "steering": p["steer"].echo,
        })

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    return app


def _usage(req: PendingRequest) -> dict[str, int]:
    done = sum(len(r.out_ids) for r in req.rows)
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": done, "total_tokens": req.prompt_tokens + done}


async def _collect(req: PendingRequest) -> tuple[list[str], list[str]]:
    parts: list[list[str]] = [[] for _ in req.rows]
    finish: list[str | None] = [None] * len(req.rows)
    while any(f is None for f in finish):
        kind, j, val = await req.events.get()
        if kind == "delta":
            parts[j].append(val)
        elif kind == "error":
            raise HTTPError(500, val, "server_error")
        elif j is None:  # the whole request was dropped
            finish = [f or val for f in finish]
        else:
            finish[j] = val
    return ["".join(p) for p in parts], [str(f) for f in finish]


async def _sse(req: PendingRequest, engine: Engine, p: dict[str, Any], created: int, chat: bool):
    include_usage = p["include_usage"]

    def chunk(j: int, delta: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({} if delta is None else
                                                                                    {"content": delta})
            choice = {"index": j, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": j, "text": delta or "", "logprobs": None, "finish_reason": finish}
        obj = {"id": req.rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
               "model": p["model"], "choices": [choice]}
        if include_usage:
            obj["usage"] = None
        return f"data: {json.dumps(obj)}\n\n"

    open_rows = set(range(len(req.rows)))
    try:
        if chat:
            for j in range(len(req.rows)):
                yield chunk(j, None, None, first=True)
        failed = False
        while open_rows:
            kind, j, val = await req.events.get()
            if kind == "delta":
                yield chunk(j, val, None)
            elif kind == "error":
                err = {"error": {"message": val, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                failed = True
                break
            else:
                for k in ([j] if j is not None else sorted(open_rows)):
                    if k in open_rows:
                        open_rows.discard(k)
                        yield chunk(k, None, val)
        if include_usage and not failed:
            obj = {"id": req.rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                   "model": p["model"], "choices": [], "usage": _usage(req)}
            yield f"data: {json.dumps(obj)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # client gone (or finished): make sure the rows stop and the slot is freed
        req.cancel()
        engine.release()


# --------------------------------------------------------------------------------------------- wiring
def served_models(
    model: Any, base: str = "default", policy: str | None = None, specs: Any = None, steer_name: str | None = None,
    extra: dict[str, SteeringFactory] | None = None,
) -> dict[str, SteeringFactory | None]:
    """Model names → steering factories: ``base`` (unsteered) plus one steered entry per policy / spec list.

    ``policy``: a policy file (``saesteer.gating.policy.load_policy``; its interventions are built once). ``specs``: steering
    specs (``steering.load_specs`` input: a path, a dict or a list) served as ``base+<steer_name or 'steered'>``
    (a :class:`ServedSteering`: its requests share batches with differently steered ones).
    ``extra``: more names mapped to ``callable(model) -> context manager`` (decoded in batches of their own).
    """
    from pathlib import Path

    served: dict[str, SteeringFactory | None] = {base: None}
    if policy is not None:
        from saesteer.gating import load_policy

        pol = load_policy(policy)
        _add(served, f"{base}+{steer_name or Path(policy).stem}", ServedPolicy(pol, model))
    if specs is not None:
        from saesteer.steering import build_all, load_specs

        _add(served, f"{base}+{steer_name or 'steered'}", ServedSteering(build_all(load_specs(specs), model)))
    for k, f in (extra or {}).items():
        _add(served, k, f)
    return served


class ServedPolicy:
    """A served policy file: its interventions built once; ``system_prefix`` (the policy's system prompt) is put
    first in the chat messages of every request to it."""

    def __init__(self, policy: Any, model: Any) -> None:
        cache: dict[str, Any] = {}
        self.policy, self.ivs, self.low = policy, policy.build(model, cache), policy.build_low(model, cache)
        policy.check(model, self.ivs + self.low)
        self.system_prefix = policy.system

    def __call__(self, model: Any) -> Any:
        return self.policy.apply(model, self.ivs, self.low)


def _add(served: dict[str, Any], name: str, factory: SteeringFactory) -> None:
    ensure(name not in served, f"served model name {name!r} given twice (use --steer-name to tell them apart)")
    served[name] = factory


def run_server(model: Any, tok: Any, served: dict[str, SteeringFactory | None], cfg: ServeConfig,
               saes: dict[str, Any] | None = None) -> None:
    """Serve until interrupted (uvicorn, one process; the model lives in the worker thread)."""
    import uvicorn

    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("SAESTEER_API_KEY") or None
    check_bind(cfg.host, api_key, cfg.insecure)
    app = make_app(model, tok, served, cfg, saes=saes)
    install_log_redaction()
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_keep_alive=30)
    finally:
        app.state.engine.close()
