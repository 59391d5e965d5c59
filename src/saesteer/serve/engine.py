"""The serving engine: the server's configuration and one worker thread that decodes queued requests in batches —
requests with different intervention steering share a batch (per-row scales), a policy's requests get batches of
their own; finished or cancelled rows leave the batch."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch

from saesteer.core import SaesteerError, ensure
from saesteer.generation import Row, decode_rows, eos_token_ids

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


# --------------------------------------------------------------------------------------------- engine
@dataclass
class PendingRequest:
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
        self.inbox: queue.Queue[PendingRequest | None] = queue.Queue()
        self.pending: list[PendingRequest] = []
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

    def submit(self, req: PendingRequest) -> None:
        self.inbox.put(req)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)

    # ----------------------------------------------------------------------------------- worker
    def _take_batch(self) -> list[PendingRequest] | None:
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

    def _steering(self, batch: list[PendingRequest], rows: list[tuple[PendingRequest, int, Row]]) -> ContextManager[Any]:
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

    def _run(self, batch: list[PendingRequest]) -> None:
        rows = [(req, j, row) for req in batch for j, row in enumerate(req.rows)]
        for i, (_, _, row) in enumerate(rows):
            row.index = i
        ivs = [iv for req in batch for iv in req.interventions]
        counted, n_done = False, 0
        last: list[tuple[PendingRequest, tuple[str, int, Any]]] = []  # told only once the steering is uninstalled
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
                                last.append((req, ("done", j, ev.finish_reason)))
                            else:
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
            for req, msg in last:
                req.push(msg)
