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
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
from fastapi import Request  # module level: FastAPI resolves the string annotations of the endpoints here

from saesteer.core import SaesteerError, ensure
from saesteer.generation import Row, decode_rows, encode_prompts, eos_token_ids
from saesteer.models import model_name

SteeringFactory = Callable[[Any], ContextManager[Any]]


@dataclass
class ServeConfig:
    """Settings of the chat server (shared by ``saesteer serve`` and :func:`make_app`)."""

    host: str = "127.0.0.1"
    """Interface to listen on (loopback by default)."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """Bearer token clients must send; ``None``: ``SAESTEER_API_KEY`` if set, else no auth."""
    insecure: bool = False
    """Allow a non-loopback ``host`` without an API key (:func:`check_bind`)."""
    docs: bool = False
    """Serve ``/docs``, ``/redoc`` and ``/openapi.json`` (behind the API key like everything but ``/health``)."""
    max_batch: int = 16
    """Most rows decoded together in one batch."""
    batch_wait_ms: float = 25.0
    """How long the worker waits for more requests to join a batch once one has arrived."""
    max_queue: int = 64
    """Requests waiting or running at once; more get 429."""
    max_body_bytes: int = 1_000_000
    """Largest request body; bigger ones get 413."""
    max_messages: int = 64
    """Most messages in one request."""
    max_tokens_limit: int = 512
    """Largest ``max_tokens`` a request may ask for."""
    default_max_tokens: int = 128
    """``max_tokens`` when a request gives none."""
    max_prompt_tokens: int = 2048
    """Largest chat-formatted prompt, in tokens."""
    max_n: int = 8
    """Largest ``n`` (completions per prompt) and most prompts in one ``/v1/completions`` request."""
    steer_max_features: int = 8
    """Most feature edits in one request's ``steering``."""
    steer_max_value: float = 200.0
    """Largest ``|clamp|`` and ``|add|`` value of a per-request feature edit (latent units)."""
    steer_max_scale: float = 20.0
    """Largest ``|scale|`` factor of a per-request feature edit."""
    request_timeout_s: float = 600.0
    """A non-streaming request waiting longer than this gets 504."""
    decode_threads: int | None = None
    """Intra-op threads for decode steps (``GenerationConfig.decode_threads``); ``None``: the process setting."""


class ServedSteering:
    """A served config made of interventions: requests using it can share a batch with differently steered ones."""

    def __init__(self, interventions: list[Any]):
        self.interventions = list(interventions)

    def __call__(self, model: Any) -> ContextManager[Any]:
        from saesteer.steering import steer

        return steer(model, self.interventions)


# --------------------------------------------------------------------------------------------- security helpers
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    h = host.strip().strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool = False) -> None:
    """Refuse to listen on a non-loopback interface without an API key unless ``insecure`` (raises SaesteerError)."""
    if not is_loopback(host) and not api_key and not insecure:
        raise SaesteerError(f"refusing to listen on {host} without an API key: anyone who can reach it could use "
                            "the model; pass --api-key KEY (or SAESTEER_API_KEY), or --insecure if you mean it")


def key_matches(header: str | None, api_key: str) -> bool:
    """``Authorization: Bearer KEY`` with any case of the scheme, compared in constant time."""
    scheme, _, token = (header or "").strip().partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    return hmac.compare_digest(token.strip().encode("utf-8", "surrogatepass"), api_key.encode("utf-8")) and ok_scheme


class RedactQuery(logging.Filter):
    """Drop query strings (``?api_key=...``) from uvicorn's access log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = args[:2] + (args[2].split("?", 1)[0] + "?<redacted>",) + args[3:]
        return True


def install_log_redaction() -> None:
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuery) for f in logger.filters):
        logger.addFilter(RedactQuery())


# --------------------------------------------------------------------------------------------- engine
@dataclass
class _Request:
    rid: str
    group: str
    """Batch group: ``"mix"`` (interventions; any steering shares a batch) or ``"served:<name>"`` (opaque factory)."""
    rows: list[Row]
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    factory: SteeringFactory | None = None
    interventions: list[Any] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def push(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        for r in self.rows:
            if not r.done:
                r.cancelled = True

    @property
    def cancelled(self) -> bool:
        return all(r.cancelled for r in self.rows)


class Engine:
    """Owns the model; a worker thread batches queued requests and decodes them (one batch at a time)."""

    def __init__(self, model: Any, tok: Any, served: dict[str, SteeringFactory | None], cfg: ServeConfig):
        ensure(len(served) > 0, "no served model names")
        self.model, self.tok, self.served, self.cfg = model, tok, served, cfg
        self.eos = eos_token_ids(model, tok)
        self.inbox: queue.Queue[_Request | None] = queue.Queue()
        self.pending: list[_Request] = []
        self.active = 0
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()
        """Held while a batch runs (steering installed); hold it to use the model from another thread."""
        self.batches_run = 0
        self.batch_sizes: deque[int] = deque(maxlen=256)
        """Rows of the most recent batches (observability and tests)."""
        self.thread = threading.Thread(target=self._loop, name="saesteer-serve-worker", daemon=True)
        self.thread.start()

    # ----------------------------------------------------------------------------------- admission
    def try_admit(self) -> bool:
        with self.lock:
            if self.active >= self.cfg.max_queue:
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.active -= 1

    def submit(self, req: _Request) -> None:
        self.inbox.put(req)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)

    # ----------------------------------------------------------------------------------- worker
    def _take_batch(self) -> list[_Request] | None:
        if not self.pending:
            first = self.inbox.get()
            if first is None:
                return None
            self.pending.append(first)
        deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
        while len(self.pending) < self.cfg.max_batch * 4:
            left = deadline - time.monotonic()
            try:
                item = self.inbox.get(timeout=max(left, 0)) if left > 0 else self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.inbox.put(None)
                break
            self.pending.append(item)
        group = self.pending[0].group
        batch, rows = [], 0
        for r in self.pending:
            if r.group == group and (not batch or rows + len(r.rows) <= self.cfg.max_batch):
                batch.append(r)
                rows += len(r.rows)
        self.pending = [r for r in self.pending if r not in batch]
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [r for r in batch if not r.cancelled]
            for r in batch:
                if r.cancelled:
                    r.push(("done", None, "cancelled"))
            if live:
                with self.model_lock:
                    self._run(live)

    def _steering(self, batch: list[_Request], rows: list[tuple[_Request, int, Row]]) -> ContextManager[Any]:
        """The batch's steering: the opaque factory, or every intervention with per-row scales (1 = this row's)."""
        if batch[0].factory is not None:
            return batch[0].factory(self.model)
        ivs: list[Any] = []
        seen: set[int] = set()
        for r in batch:
            for iv in r.interventions:
                if id(iv) not in seen:
                    seen.add(id(iv))
                    ivs.append(iv)
        if not ivs:
            return contextlib.nullcontext()
        from saesteer.steering import steer

        same = all({id(iv) for iv in r.interventions} == seen for r in batch)
        for iv in ivs:
            iv.set_row_scale(None if same else [1.0 if iv in req.interventions else 0.0 for req, _, _ in rows])
        return steer(self.model, ivs)

    def _count(self, n_rows: int) -> None:
        self.batches_run += 1
        self.batch_sizes.append(n_rows)

    def _run(self, batch: list[_Request]) -> None:
        rows = [(req, j, row) for req in batch for j, row in enumerate(req.rows)]
        for i, (_, _, row) in enumerate(rows):
            row.index = i
        ivs = [iv for req in batch for iv in req.interventions]
        counted, n_done = False, 0
        try:
            with self._steering(batch, rows), torch.inference_mode():
                for events in decode_rows(self.model, self.tok, [row for _, _, row in rows], self.eos, stream=True,
                                          decode_threads=self.cfg.decode_threads):
                    for ev in events:
                        req, j, _ = rows[ev.index]
                        if ev.delta:
                            req.push(("delta", j, ev.delta))
                        if ev.finish_reason is not None:
                            n_done += 1
                            if n_done == len(rows):  # counted before the batch's last client hears it is done
                                self._count(len(rows))
                                counted = True
                            req.push(("done", j, ev.finish_reason))
            if not counted:
                self._count(len(rows))
        except Exception as e:  # noqa: BLE001 - report to every waiting client, keep serving
            msg = str(e) if isinstance(e, SaesteerError) else f"generation failed: {type(e).__name__}: {e}"
            for req in batch:
                if not all(r.done for r in req.rows):
                    req.push(("error", None, msg))
        finally:
            for iv in ivs:
                with contextlib.suppress(Exception):
                    iv.set_row_scale(None)


# --------------------------------------------------------------------------------------------- request parsing
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"developer": "system"}


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _content(c: Any, i: int) -> str:
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    parts = []
    for p in c:  # [{"type": "text", "text": ...}, ...] (the schema checked it is a list of objects)
        if not (p.get("type") == "text" and isinstance(p.get("text"), str)):
            raise _HTTPError(400, f"messages[{i}].content: only text parts are supported", code="unsupported_parameter",
                             param=f"messages[{i}].content")
        parts.append(p["text"])
    return "".join(parts)


def _bad_text(body: Any) -> str | None:
    """Where a string of the decoded JSON holds a lone surrogate (``"\\ud800"``): the tokenizer cannot encode it.

    Iterative: a body nested as deep as ``json.loads`` allows must not overflow the stack here."""
    stack: list[tuple[Any, str]] = [(body, "body")]
    while stack:
        x, path = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(x, dict):
            for k, v in x.items():
                stack.append((k, path))
                stack.append((v, f"{path}.{k}" if isinstance(k, str) and len(path) < 200 else path))
        elif isinstance(x, list):
            stack.extend((v, f"{path}[{i}]" if len(path) < 200 else path) for i, v in enumerate(x))
    return None


def _range(v: Any, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    if v is None:
        return default
    f = float(v)
    if not (lo < f <= hi if lo_open else lo <= f <= hi):  # also NaN / inf (json.loads reads NaN, Infinity)
        raise _HTTPError(400, f"{key} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", param=key)
    return f


def _int_range(v: Any, key: str, default: int, lo: int, hi: int) -> int:
    if v is None:
        return default
    if not lo <= v <= hi:
        raise _HTTPError(400, f"{key} must be between {lo} and {hi}, got {v}", param=key)
    return int(v)


@dataclass
class _Steer:
    config: str | None
    """Name of the served config used (``None``: unsteered)."""
    factory: SteeringFactory | None
    """Opaque served factory (policy / extra), or None."""
    interventions: list[Any]
    echo: dict[str, Any]


def _resolve_steering(st: Any, name: str, served: dict[str, Any], saes: dict[str, Any], cfg: ServeConfig) -> _Steer:
    from saesteer.steering import POSITIONS, Add, Clamp, Scale

    policy = st if isinstance(st, str) else getattr(st, "policy", None)
    feats = list(getattr(st, "features", None) or [])
    positions = getattr(st, "positions", "all")
    config = name
    if policy is not None:
        if policy not in served:
            raise _HTTPError(400, f"unknown steering policy {policy!r}; served: {', '.join(served)}", param="steering")
        if served[name] is not None and name != policy:
            raise _HTTPError(400, f"model {name!r} is steered already; steering.policy {policy!r} would replace it "
                             "(use the unsteered model name with steering.policy)", param="steering")
        config = policy
    factory = served[config]
    opaque = factory is not None and not isinstance(factory, ServedSteering)
    if positions not in POSITIONS:
        raise _HTTPError(400, f"steering.positions must be one of {', '.join(POSITIONS)}, got {positions!r}",
                         param="steering.positions")
    if feats and not saes:
        raise _HTTPError(400, "per-request feature steering is off on this server (it allows no SAE)",
                         code="unsupported_parameter", param="steering.features")
    if feats and opaque:
        raise _HTTPError(400, f"per-request features cannot be combined with {config!r} (a policy); send them with an "
                         "unsteered or spec-steered model", param="steering.features")
    if len(feats) > cfg.steer_max_features:
        raise _HTTPError(400, f"too many steering features: {len(feats)} > {cfg.steer_max_features}",
                         param="steering.features")
    ivs = list(factory.interventions) if isinstance(factory, ServedSteering) else []
    echo_feats = []
    for i, fe in enumerate(feats):
        where = f"steering.features[{i}]"
        sae_name = fe.sae if fe.sae is not None else (next(iter(saes)) if len(saes) == 1 else None)
        if sae_name is None:
            raise _HTTPError(400, f"{where}.sae is required (allowed: {', '.join(saes)})", param=where)
        if sae_name not in saes:
            raise _HTTPError(400, f"{where}: SAE {sae_name!r} is not allowed on this server (allowed: "
                             f"{', '.join(saes)})", param=where)
        given = [(k, getattr(fe, k)) for k in ("clamp", "add", "scale") if getattr(fe, k) is not None]
        if len(given) != 1:
            raise _HTTPError(400, f"{where} needs exactly one of clamp, add, scale", param=where)
        kind, v = given[0]
        lim = cfg.steer_max_scale if kind == "scale" else cfg.steer_max_value
        _range(v, f"{where}.{kind}", 0.0, -lim, lim)
        sae = saes[sae_name]
        try:
            if kind == "clamp":
                iv = Clamp(sae=sae, features=[fe.feature], values=[float(v)], positions=positions)
            elif kind == "scale":
                iv = Scale(sae=sae, features=[fe.feature], factor=float(v), positions=positions)
            else:
                iv = Add(sae=sae, feature=fe.feature, alpha=float(v), positions=positions)
        except SaesteerError as e:
            raise _HTTPError(400, f"{where}: {e}", param=where) from None
        ivs.append(iv)
        echo_feats.append({"sae": sae_name, "feature": fe.feature, kind: float(v)})
    echo = {"policy": config if factory is not None else None, "features": echo_feats, "positions": positions}
    return _Steer(config if factory is not None else None, factory if opaque else None, ivs, echo)


def _validate(schema: Any, body: Any) -> Any:
    from pydantic import ValidationError

    from saesteer.serve.schema import format_validation_error

    if not isinstance(body, dict):
        raise _HTTPError(422, "the request body must be a JSON object")
    bad = _bad_text(body)
    if bad:
        raise _HTTPError(400, f"{bad}: invalid text (a lone UTF-16 surrogate such as \\ud800 cannot be encoded)",
                         param=bad)
    if not isinstance(body.get("model"), str):
        raise _HTTPError(422, "model is required (a string)", param="model")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        raise _HTTPError(422, format_validation_error(e)) from None


def _common(req: Any, cfg: ServeConfig, served: dict[str, Any], saes: dict[str, Any], max_tokens: Any,
            default_max_tokens: int) -> dict[str, Any]:
    if req.model not in served:
        raise _HTTPError(404, f"unknown model {req.model!r}; served: {', '.join(served)}", code="model_not_found",
                         param="model")
    bad = req.unsupported()
    if bad:
        raise _HTTPError(400, f"unsupported parameter(s): {', '.join(bad)} (this server does not implement them)",
                         code="unsupported_parameter", param=bad[0])
    mt = min(default_max_tokens, cfg.max_tokens_limit) if max_tokens is None else max_tokens
    if not 1 <= mt <= cfg.max_tokens_limit:
        raise _HTTPError(400, f"max_tokens must be between 1 and {cfg.max_tokens_limit}, got {mt}", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or not all(stop):
        raise _HTTPError(400, "stop must be a non-empty string or a list of at most 4 non-empty strings", param="stop")
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:
        raise _HTTPError(400, f"seed must fit in 64 bits, got {req.seed}", param="seed")
    stream = bool(req.stream)
    if req.stream_options is not None and not stream:
        raise _HTTPError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return {"model": req.model, "max_tokens": mt, "stop": stop, "seed": req.seed,
            "temperature": _temperature(_range(req.temperature, "temperature", 1.0, 0.0, 2.0)),
            "top_p": _range(req.top_p, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            "n": _int_range(req.n, "n", 1, 1, cfg.max_n), "stream": stream,
            "include_usage": bool(req.stream_options and req.stream_options.include_usage),
            "steer": _resolve_steering(req.steering, req.model, served, saes, cfg)}


MIN_TEMPERATURE = 1e-4
"""Temperatures below this decode greedily (logits / 1e-313 overflow to inf; the limit is the argmax anyway)."""


def _temperature(t: float) -> float:
    return t if t >= MIN_TEMPERATURE else 0.0


def parse_request(body: Any, cfg: ServeConfig, served: dict[str, Any], saes: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Validate a chat-completions body; returns the settings the rows need. Raises ``_HTTPError``."""
    from saesteer.serve.schema import ChatRequest

    req = _validate(ChatRequest, body)
    if req.model not in served:
        raise _HTTPError(404, f"unknown model {req.model!r}; served: {', '.join(served)}", code="model_not_found",
                         param="model")
    if not req.messages:
        raise _HTTPError(422, "messages must be a non-empty list", param="messages")
    if len(req.messages) > cfg.max_messages:
        raise _HTTPError(400, f"too many messages: {len(req.messages)} > {cfg.max_messages}", param="messages")
    conv = []
    for i, m in enumerate(req.messages):
        role = _ROLE_ALIASES.get(m.role, m.role)
        if role not in ROLES:
            raise _HTTPError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}",
                             param=f"messages[{i}].role")
        conv.append({"role": role, "content": _content(m.content, i)})
    p = _common(req, cfg, served, saes or {}, req.max_completion_tokens if req.max_completion_tokens is not None
                else req.max_tokens, cfg.default_max_tokens)
    if req.top_logprobs is not None and not req.logprobs:
        raise _HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = _int_range(req.top_logprobs, "top_logprobs", 0, 0, 20) if req.logprobs else None
    if logprobs is not None and p["stream"]:
        raise _HTTPError(400, "logprobs with stream: true is not supported (ask without streaming)",
                         code="unsupported_parameter", param="logprobs")
    p.update(messages=conv, logprobs=logprobs)
    return p


def parse_completion(body: Any, cfg: ServeConfig, served: dict[str, Any], saes: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """Validate a (legacy) completions body: ``prompt`` is a string, a list of strings, token ids or lists of them."""
    from saesteer.serve.schema import CompletionRequest

    req = _validate(CompletionRequest, body)
    p = _common(req, cfg, served, saes or {}, req.max_tokens, 16)
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt or any(len(x) == 0 for x in prompt):
        raise _HTTPError(400, "prompt must be non-empty", param="prompt")
    if len(prompt) * p["n"] > cfg.max_n:
        raise _HTTPError(400, f"{len(prompt)} prompts x n={p['n']} completions is more than {cfg.max_n}", param="prompt")
    if req.logprobs is not None and p["stream"]:
        raise _HTTPError(400, "logprobs with stream: true is not supported (ask without streaming)",
                         code="unsupported_parameter", param="logprobs")
    p.update(prompts=prompt, logprobs=_int_range(req.logprobs, "logprobs", 0, 0, 20) if req.logprobs is not None
             else None)
    return p


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


def _http_error(e: _HTTPError):
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

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": base, "served": list(served), "active_requests": engine.active,
                "batches_run": engine.batches_run}

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
                raise _HTTPError(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _HTTPError(422, f"malformed JSON body: {e}") from None
        except RecursionError:
            raise _HTTPError(422, "malformed JSON body: nested too deeply") from None

    def encode(messages_or_prompts: list[Any], raw: bool) -> list[list[int]]:
        out = []
        for i, p in enumerate(messages_or_prompts):
            if raw and isinstance(p, list):  # token ids
                vocab = len(tok)
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise _HTTPError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                     param="prompt")
                ids = list(p)
            else:
                try:
                    ids = encode_prompts(tok, [p], raw=raw)[0]
                except SaesteerError as e:
                    raise _HTTPError(400, str(e)) from None
                except Exception as e:  # noqa: BLE001 - the tokenizer refused the text
                    raise _HTTPError(400, f"the prompt could not be tokenized: {type(e).__name__}: {e}") from None
            if len(ids) > cfg.max_prompt_tokens:
                raise _HTTPError(400, f"prompt is {len(ids)} tokens; the limit is {cfg.max_prompt_tokens}",
                                 code="context_length_exceeded", param="messages" if not raw else "prompt")
            out.append(ids)
        return out

    def make_request(p: dict[str, Any], ids: list[list[int]], prefix: str) -> _Request:
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
        st: _Steer = p["steer"]
        group = f"served:{st.config}" if st.factory is not None else "mix"
        return _Request(f"{prefix}-{uuid.uuid4().hex[:24]}", group, rows, sum(len(x) for x in ids),
                        asyncio.get_running_loop(), st.factory, st.interventions)

    async def handle(request: Request, chat: bool):
        try:
            body = await read_body(request)
            if chat:
                p = parse_request(body, cfg, served, allowed)
                ids = encode([p["messages"]], raw=False)
            else:
                p = parse_completion(body, cfg, served, allowed)
                ids = encode(p["prompts"], raw=True)
        except _HTTPError as e:
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
        except _HTTPError as e:
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


def _usage(req: _Request) -> dict[str, int]:
    done = sum(len(r.out_ids) for r in req.rows)
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": done, "total_tokens": req.prompt_tokens + done}


async def _collect(req: _Request) -> tuple[list[str], list[str]]:
    parts: list[list[str]] = [[] for _ in req.rows]
    finish: list[str | None] = [None] * len(req.rows)
    while any(f is None for f in finish):
        kind, j, val = await req.events.get()
        if kind == "delta":
            parts[j].append(val)
        elif kind == "error":
            raise _HTTPError(500, val, "server_error")
        elif j is None:  # the whole request was dropped
            finish = [f or val for f in finish]
        else:
            finish[j] = val
    return ["".join(p) for p in parts], [str(f) for f in finish]


async def _sse(req: _Request, engine: Engine, p: dict[str, Any], created: int, chat: bool):
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
        ivs = pol.build(model)
        pol.check(model, ivs)
        _add(served, f"{base}+{steer_name or Path(policy).stem}", lambda m: pol.apply(m, ivs))
    if specs is not None:
        from saesteer.steering import build_all, load_specs

        _add(served, f"{base}+{steer_name or 'steered'}", ServedSteering(build_all(load_specs(specs), model)))
    for k, f in (extra or {}).items():
        _add(served, k, f)
    return served


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
