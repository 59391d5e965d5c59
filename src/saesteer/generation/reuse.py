"""AnswerStore: reuse the unsteered model's greedy answers for the rows a conditional policy leaves untouched.

A gated policy steers only the prompts its gate fires on; every other row is, by construction, the unsteered model
(scale 0: bit-identical within its batch). Regenerating those rows in each gated condition of a comparison repeats
the unsteered condition's work, and most of a comparison's tokens are such rows (HumanEval and GSM8K answers, benign
prompts). ``saesteer compare`` therefore records every greedy answer of the unsteered condition here
(``with store.recording(model)``) and, while a gated policy is evaluated (``with store.serving(model)``), lets
:func:`generate_rows` take a row's answer from the store when

* the store holds an answer to the same prompt token ids under the same generation settings (:func:`settings_key`:
  greedy only; token budget, stop strings, early-stop rule, EOS ids, raw / chat, special-token handling, model name
  and dtype), and
* every hook on the model is vouched for by an owner that reports the row untouched: a policy's ``PolicyRun``
  decides the rows first with its gate (an unsteered partial forward up to the gate layer, as its lookahead does),
  logs those decisions, and vouches for the rows neither side of it fires on, and for its own interventions. Any
  other hook (a plain steering spec, a second policy) turns reuse off for the call.

Such a row's answer is then the unsteered condition's answer to the very same prompt, so its paired difference
against unsteered is exactly zero rather than batch-composition rounding. Rows the gate fires on are generated as
usual. The store is one JSONL file written atomically after each recording call (a resumed comparison keeps it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from saesteer.core import atomic_write_text

FORMAT = "saesteer-answers"


def _fn_key(fn: Any) -> str | None:
    """A stable name for an early-stop callable: its owner's ``cache_key()`` (e.g. ``PrefixJudge``), else None (an
    unknown rule: no reuse)."""
    if fn is None:
        return ""
    owner = getattr(fn, "__self__", None)
    key = getattr(owner, "cache_key", None)
    if not callable(key):
        return None
    return f"{type(owner).__module__}.{getattr(fn, '__qualname__', '')}:{key()}"


def settings_key(model: Any, cfg: Any, eos: Sequence[int]) -> str | None:
    """What besides the prompt ids decides a greedy answer; None when the answer is not reproducible (sampling, an
    early-stop rule without a cache key)."""
    if cfg.temperature > 0:
        return None
    stop_when = _fn_key(cfg.stop_when)
    if stop_when is None:
        return None
    try:
        dtype = str(next(model.parameters()).dtype)
    except (StopIteration, AttributeError):
        dtype = ""
    from saesteer.models import model_name

    parts = [model_name(model), dtype, cfg.max_new_tokens, list(cfg.stop), stop_when, sorted(int(i) for i in eos),
             bool(cfg.raw), bool(cfg.skip_special_tokens)]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()


def answer_key(prompt_ids: Sequence[int], settings: str) -> str:
    return hashlib.sha1(json.dumps([settings, [int(i) for i in prompt_ids]]).encode()).hexdigest()


class AnswerStore:
    """Greedy answers by (prompt ids, settings); a hook-set owner on the model while recording or serving."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.answers: dict[str, dict[str, Any]] = {}
        self.mode: str | None = None  # "record" | "serve" while installed
        self.hits = 0  # answers served so far
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue  # never written by us half-way (atomic writes), but a hand-edited file may be odd
                if isinstance(d, dict) and isinstance(d.get("key"), str) and isinstance(d.get("out_ids"), list):
                    self.answers[d["key"]] = d

    def __len__(self) -> int:
        return len(self.answers)

    # the hook-set owner protocol (models.hooks): no hooks, position-wise, nothing per row
    def prefix_safe(self) -> bool:
        return True

    @contextlib.contextmanager
    def _installed(self, model: Any, mode: str) -> Iterator["AnswerStore"]:
        from saesteer.models import hooks as model_hooks

        hs = model_hooks.install(model, self)
        self.mode = mode
        try:
            yield self
        finally:
            self.mode = None
            model_hooks.uninstall(model, hs)

    def recording(self, model: Any) -> contextlib.AbstractContextManager["AnswerStore"]:
        """Record every greedy answer :func:`generate_rows` produces on ``model`` in the block (no steering hooks may be
        installed: recorded answers must be the unsteered model's)."""
        return self._installed(model, "record")

    def serving(self, model: Any) -> contextlib.AbstractContextManager["AnswerStore"]:
        """Offer the stored answers to :func:`generate_rows` on ``model`` in the block (for rows every hook owner
        vouches untouched)."""
        return self._installed(model, "serve")

    def record(self, rows: Sequence[Any], settings: str) -> None:
        for r in rows:
            if r.finish_reason in ("stop", "length"):
                k = answer_key(r.prompt_ids, settings)
                self.answers[k] = {"key": k, "out_ids": list(r.out_ids), "text": r.text,
                                   "finish_reason": r.finish_reason}
        if self.path is not None and rows:
            atomic_write_text(self.path, "".join(json.dumps(d) + "\n" for d in self.answers.values()))

    def get(self, prompt_ids: Sequence[int], settings: str) -> dict[str, Any] | None:
        return self.answers.get(answer_key(prompt_ids, settings))


def stores(model: Any, mode: str) -> list[AnswerStore]:
    from saesteer.models import hooks as model_hooks

    return [hs.owner for hs in model_hooks.hook_sets(model) if isinstance(hs.owner, AnswerStore) and hs.owner.mode == mode]


def unsteered(model: Any) -> bool:
    """No hook but the stores' on ``model``: what it generates now is the unsteered model's."""
    from saesteer.models import hooks as model_hooks

    return not any(hs.handles for hs in model_hooks.hook_sets(model) if not isinstance(hs.owner, AnswerStore))


def reusable_rows(model: Any, rows: Sequence[Any], settings: str | None, batch_size: int) -> list[tuple[int, dict]]:
    """``(position in rows, stored answer)`` for the rows whose answer a serving store may supply (see the module
    docstring); the vouching owner has logged its decisions for exactly these rows, in this order."""
    from saesteer.models import hooks as model_hooks

    serving = stores(model, "serve")
    if settings is None or not serving:
        return []
    cand = []
    for i, r in enumerate(rows):
        a = next(filter(None, (s.get(r.prompt_ids, settings) for s in serving)), None)
        if a is not None:
            cand.append((i, a))
    if not cand:
        return []
    sets = [hs for hs in model_hooks.hook_sets(model) if not isinstance(hs.owner, AnswerStore)]
    vouch = [hs.owner for hs in sets if callable(getattr(hs.owner, "untouched_rows", None))]
    if len(vouch) != 1:  # none: nothing decides which rows are untouched; several: not supported
        return []
    owner = vouch[0]
    for hs in sets:  # every other hook set must be made of the vouching owner's own interventions
        if hs.owner is not owner and hs.handles and not (hs.members and all(owner.covers(m) for m in hs.members)):
            return []
    keep = owner.untouched_rows(model, [rows[i].prompt_ids for i, _ in cand], batch_size)
    for s in serving:
        s.hits += len(keep)
    return [cand[j] for j in keep]
