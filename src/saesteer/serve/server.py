"""OpenAI-compatible chat server for a steered model (FastAPI + uvicorn).

``POST /v1/chat/completions`` (plain and SSE streaming; temperature, top_p, max_tokens, stop, seed), ``GET /v1/models``
(one entry per served steering config, e.g. ``default`` and ``default+refusal-clamp``), ``GET /health``.
Requests that arrive together (within ``batch_wait_ms``) for the same served model are decoded as one batch by a
single worker thread (``generation.decode_rows``), each row with its own settings; finished rows leave the batch.
A client that disconnects mid-stream has its row cancelled at the next step; the server keeps serving.

Bad requests get OpenAI-style error bodies ``{"error": {"message", "type", "code"}}``: 401 without the API key, 404
for an unknown model, 400 for limits (max_tokens, messages, prompt tokens), 413 for a body over ``max_body_bytes``,
422 for malformed JSON or a malformed request, 429 when the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import threading
import time
import uuid
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
    max_batch: int = 16
    """Most requests decoded together in one batch."""
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
    request_timeout_s: float = 600.0
    """A non-streaming request waiting longer than this gets 504."""
    decode_threads: int | None = None
    """Intra-op threads for decode steps (``GenerationConfig.decode_threads``); ``None``: the process setting."""


@dataclass
class _Request:
    rid: str
    served: str
    row: Row
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def push(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


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
        served = self.pending[0].served
        batch = [r for r in self.pending if r.served == served][: self.cfg.max_batch]
        self.pending = [r for r in self.pending if r not in batch]
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [r for r in batch if not r.row.cancelled]
            for r in batch:
                if r.row.cancelled:
                    r.push(("done", "cancelled"))
            if live:
                with self.model_lock:
                    self._run(live)

    def _run(self, batch: list[_Request]) -> None:
        factory = self.served[batch[0].served]
        for i, r in enumerate(batch):
            r.row.index = i
        try:
            ctx = factory(self.model) if factory is not None else contextlib.nullcontext()
            with ctx, torch.inference_mode():
                for events in decode_rows(self.model, self.tok, [r.row for r in batch], self.eos, stream=True,
                                          decode_threads=self.cfg.decode_threads):
                    for ev in events:
                        req = batch[ev.index]
                        if ev.delta:
                            req.push(("delta", ev.delta))
                        if ev.finish_reason is not None:
                            req.push(("done", ev.finish_reason))
            self.batches_run += 1
        except Exception as e:  # noqa: BLE001 - report to every waiting client, keep serving
            msg = str(e) if isinstance(e, SaesteerError) else f"generation failed: {type(e).__name__}: {e}"
            for r in batch:
                if not r.row.done:
                    r.push(("error", msg))


# --------------------------------------------------------------------------------------------- request parsing
ROLES = ("system", "user", "assistant")


def _content(c: Any, i: int) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for p in c:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise _HTTPError(400, f"messages[{i}].content: only text parts are supported", "invalid_request_error")
            parts.append(p["text"])
        return "".join(parts)
    raise _HTTPError(422, f"messages[{i}].content must be a string or a list of text parts", "invalid_request_error")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= float(v) <= hi):
        raise _HTTPError(422 if not isinstance(v, (int, float)) else 400, f"{key} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def parse_request(body: Any, cfg: ServeConfig, served: dict[str, Any]) -> dict[str, Any]:
    """Validate a chat-completions body; returns the settings a :class:`Row` needs. Raises ``_HTTPError``."""
    if not isinstance(body, dict):
        raise _HTTPError(422, "the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str):
        raise _HTTPError(422, "model is required (a string)")
    if name not in served:
        raise _HTTPError(404, f"unknown model {name!r}; served: {', '.join(served)}", "invalid_request_error", "model_not_found")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _HTTPError(422, "messages must be a non-empty list")
    if len(msgs) > cfg.max_messages:
        raise _HTTPError(400, f"too many messages: {len(msgs)} > {cfg.max_messages}")
    conv = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _HTTPError(422, f"messages[{i}] must be an object with role and content")
        if m["role"] not in ROLES:
            raise _HTTPError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        conv.append({"role": m["role"], "content": _content(m["content"], i)})
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is None:
        mt = cfg.default_max_tokens
    if isinstance(mt, bool) or not isinstance(mt, int):
        raise _HTTPError(422, f"max_tokens must be an integer, got {mt!r}")
    if not 1 <= mt <= cfg.max_tokens_limit:
        raise _HTTPError(400, f"max_tokens must be between 1 and {cfg.max_tokens_limit}, got {mt}")
    if body.get("n", 1) != 1:
        raise _HTTPError(400, "only n=1 is supported")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _HTTPError(400, "stop must be a non-empty string or a list of at most 4 non-empty strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _HTTPError(422, f"seed must be an integer, got {seed!r}")
    return {"model": name, "messages": conv, "max_tokens": mt, "stop": stop, "seed": seed,
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0), "top_p": _number(body, "top_p", 1.0, 1e-9, 1.0),
            "stream": bool(body.get("stream", False))}


# --------------------------------------------------------------------------------------------- app
def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status)


def make_app(model: Any, tok: Any, served: dict[str, SteeringFactory | None], cfg: ServeConfig | None = None):
    """The FastAPI app (its ``state.engine`` runs the worker; call ``app.state.engine.close()`` when done)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    cfg = cfg or ServeConfig()
    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("SAESTEER_API_KEY") or None
    engine = Engine(model, tok, served, cfg)
    app = FastAPI(title="saesteer", description="Steered chat model, OpenAI-compatible API")
    app.state.engine = engine
    base = model_name(model)
    created = int(time.time())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "authentication_error",
                              "invalid_api_key")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
                return _error(413, f"request body of {size} bytes exceeds the limit of {cfg.max_body_bytes}")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": base, "served": list(served), "active_requests": engine.active,
                "batches_run": engine.batches_run}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "saesteer",
                                            "root": base} for n in served]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cfg.max_body_bytes:
                return _error(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(422, f"malformed JSON body: {e}")
        try:
            p = parse_request(body, cfg, served)
            ids = encode_prompts(tok, [p["messages"]])[0]
            if len(ids) > cfg.max_prompt_tokens:
                raise _HTTPError(400, f"prompt is {len(ids)} tokens; the limit is {cfg.max_prompt_tokens}",
                                 "invalid_request_error", "context_length_exceeded")
        except _HTTPError as e:
            return _error(e.status, e.message, e.type, e.code)
        except SaesteerError as e:
            return _error(400, str(e))
        if not engine.try_admit():
            return _error(429, f"server busy: {cfg.max_queue} requests in flight; retry later", "rate_limit_error")
        gen = None
        if p["temperature"] > 0:
            seed = p["seed"] if p["seed"] is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
            gen = torch.Generator().manual_seed(seed)
        row = Row(0, ids, p["max_tokens"], tuple(p["stop"]), None, p["temperature"], p["top_p"], gen)
        req = _Request(f"chatcmpl-{uuid.uuid4().hex[:24]}", p["model"], row, len(ids), asyncio.get_running_loop())
        engine.submit(req)
        if p["stream"]:
            return StreamingResponse(_sse(req, engine), media_type="text/event-stream")
        try:
            text, finish = await asyncio.wait_for(_collect(req), timeout=cfg.request_timeout_s)
        except asyncio.TimeoutError:
            return _error(504, "generation timed out", "server_error")
        except _HTTPError as e:
            return _error(e.status, e.message, e.type)
        finally:  # also on cancellation (client gone): stop decoding this row at the next step
            if not row.done:
                row.cancelled = True
            engine.release()
        return JSONResponse({
            "id": req.rid, "object": "chat.completion", "created": int(time.time()), "model": p["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": len(row.out_ids),
                      "total_tokens": req.prompt_tokens + len(row.out_ids)},
        })

    return app


async def _collect(req: _Request) -> tuple[str, str]:
    parts = []
    while True:
        kind, val = await req.events.get()
        if kind == "delta":
            parts.append(val)
        elif kind == "error":
            raise _HTTPError(500, val, "server_error")
        else:
            return "".join(parts), val


async def _sse(req: _Request, engine: Engine):
    def chunk(delta: dict, finish: str | None) -> str:
        obj = {"id": req.rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.served,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(obj)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""}, None)
        while True:
            kind, val = await req.events.get()
            if kind == "delta":
                yield chunk({"content": val}, None)
            elif kind == "error":
                yield f"data: {json.dumps({'error': {'message': val, 'type': 'server_error', 'code': None}})}\n\n"
                break
            else:
                yield chunk({}, val)
                break
        yield "data: [DONE]\n\n"
    finally:  # client gone (or finished): make sure the row stops and the slot is freed
        if not req.row.done:
            req.row.cancelled = True
        engine.release()


# --------------------------------------------------------------------------------------------- wiring
def served_models(
    model: Any, base: str = "default", policy: str | None = None, specs: Any = None, steer_name: str | None = None,
    extra: dict[str, SteeringFactory] | None = None,
) -> dict[str, SteeringFactory | None]:
    """Model names → steering factories: ``base`` (unsteered) plus one steered entry per policy / spec list.

    ``policy``: a policy file (``saesteer.gating.policy.load_policy``; its interventions are built once). ``specs``: steering
    specs (``steering.load_specs`` input: a path, a dict or a list) served as ``base+<steer_name or 'steered'>``.
    ``extra``: more names mapped to ``callable(model) -> context manager``.
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
        from saesteer.steering import build_all, load_specs, steer

        ivs2 = build_all(load_specs(specs), model)
        _add(served, f"{base}+{steer_name or 'steered'}", lambda m: steer(m, ivs2))
    for k, f in (extra or {}).items():
        _add(served, k, f)
    return served


def _add(served: dict[str, Any], name: str, factory: SteeringFactory) -> None:
    ensure(name not in served, f"served model name {name!r} given twice (use --steer-name to tell them apart)")
    served[name] = factory


def run_server(model: Any, tok: Any, served: dict[str, SteeringFactory | None], cfg: ServeConfig) -> None:
    """Serve until interrupted (uvicorn, one process; the model lives in the worker thread)."""
    import uvicorn

    app = make_app(model, tok, served, cfg)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_keep_alive=30)
    finally:
        app.state.engine.close()
