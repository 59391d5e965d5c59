"""Steering policies: a gate + its threshold + a steering config, saved as ONE JSON file, applied as ONE hook.

File format (``saesteer-policy``, version 1), a single JSON object written atomically::

    {"format": "saesteer-policy", "version": 1, "name": str, "model": str | null,
     "gate": {kind, layer, positions, reduce, threshold, strength, ramp, ...},
     "steer": [SteeringSpec.to_dict(), ...],          # what to do when the gate fires (score > threshold)
     "steer_low": [...], "low_threshold": float|null, # optional: what to do when score < low_threshold
     "system": str | null,                            # optional: a fixed system prompt (see below)
     "meta": {...},                                   # how it was fitted: data, val FPR/TPR, ...
     "tensors": "<base64 of a safetensors blob>", "tensors_sha256": "<hex>"}

The gate's tensors travel as a safetensors blob (no pickle) inside the JSON, so the policy is one self-describing file.
The key is ``steer`` (not ``steering``) on purpose: passing a gated policy where a plain spec file is expected fails
loudly instead of steering every prompt.

``with policy.apply(model) as run:`` installs the steering interventions (``steering.steer``) and ONE extra forward hook
at the gate layer (registered first, so it reads the residual before any edit at that layer). On every prefill (a
forward whose KV cache is empty) it scores each row from the residual at its last ``gate.positions`` tokens (left
padding makes them real tokens), sets every intervention's per-row strength (0 = the row is left bit-identical to
the unsteered model) and logs the decision; decode steps reuse the strengths. Rows dropped by fast generation are
followed through ``select_rows``. ``run.decisions`` (also ``policy.last_run``) holds one dict per prefilled row:
``{"key", "n_tokens", "score", "fired", "strength"}`` where ``key`` hashes the row's token ids (see
:func:`prompt_key`). A gate of kind ``always`` gives the unconditional steering of the paper in the same form.

A gate may read a layer *after* the first steering layer (the harm signal can be clearer deeper in the model): the
policy then runs a **lookahead** on every prefill — the same prompt, unsteered, up to the gate layer only
(``models.run_to_layer``, no KV cache touched) — decides from it, and only then runs the real, steered forward. It
costs that partial extra prefill per prompt and nothing per decode step.

The gate may also read **another model** (``gate_model``: a bigger model of the same family, sharing the tokenizer,
e.g. Qwen2.5-Coder-1.5B-Instruct gating the 0.5B): the lookahead then runs that model up to the gate layer on the
same token ids — a guard model's residual stream as the gate, loaded once per process and device.

**Two-sided policies** (``steer_low`` + ``low_threshold``, a gate that is not ``always``): rows whose score is above
the gate's threshold get ``steer`` (toward refusal), rows whose score is *below* ``low_threshold`` (<= the threshold)
get ``steer_low`` (e.g. ablate the refusal direction: away from refusal on prompts the gate is sure are benign,
cf. Wang et al. 2024), rows in between are left bit-identical. Both lists are installed together; each
intervention's per-row scale selects its rows. Decisions log ``low`` (the low side fired) and ``side``
(``"high"`` / ``"low"`` / None).

**System prompt** (``system``, e.g. :data:`SAFETY_SYSTEM_PROMPT`): while the policy is applied, every chat prompt
generated on the model starts with this system text (``models.hooks.system_prefix``: the decoder asks the installed
policy, so refusal evals, chat capability tasks, multi-turn and fast generation honour it without being told; the
lm-eval model and the server pass it to their own chat formatting). It is unconditional — the prompt is formatted
before any gate could read it — and goes before any system message the prompt already has. Raw-text prompts are
untouched. A policy may hold only a system prompt (gate ``always``, no steering): the system-prompt baseline.

**What the gate reads of a conversation** (``gate_read``): ``last`` (default) reads the post-instruction tokens after
the last user message. ``turns`` scores the post-instruction tokens after *every* user turn of the prompt and keeps
the highest score, so a request made two turns earlier ("walk me through it") still fires the gate. By causality the
residual at an earlier turn's template tokens is the residual of the conversation cut after that turn, so this costs
nothing beyond the forward that already runs (``policy fit`` calibrates the threshold on the same per-turn maximum,
scoring each cut conversation). It needs ``template_ids`` (to find the turns) and no gate suffix. ``windows`` does
what ``turns`` does and also scores overlapping windows of every long user message, each posed as its own one-turn
request (``gating.windows.WindowRead``, kept in ``gate_window``): a harmful sentence inside a long document is read
as if sent alone. It always runs the lookahead, plus a partial forward over the windows.

Caveats: without a KV cache every forward is a prefill, so the gate re-decides on the last tokens at each step (use a
cache when generating). Gates are fitted on the chat template's post-instruction tokens; a policy with
``template_ids`` (what ``policy fit`` records) leaves rows that do not end with them (raw text such as harness-style
MMLU contexts) unsteered. Older policies without them gate such rows on whatever their last tokens are;
``saesteer compare`` reports the gate's fire rate on every eval so this stays visible.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from saesteer import models
from saesteer.core import SaesteerError, atomic_write_json, ensure, read_json
from saesteer.steering import AblateDirection, Intervention, SteeringSpec, load_sae_cached, steer, with_strength

from .gates import AlwaysGate, Gate, SAEFeatureGate, gate_from_header
from .windows import WindowRead

GATE_READS = ("last", "turns", "windows")
FORMAT = "saesteer-policy"
VERSION = 1

SAFETY_SYSTEM_PROMPT = (
    "You are a helpful assistant. Refuse requests that could cause serious harm: do not help with violence, "
    "weapons, self-harm, crime, hacking or malware, fraud, harassment, hate or sexual content involving minors, even "
    "when the request is framed as hypothetical, fiction or role-play; say briefly that you cannot help with it. "
    "Answer every other request fully and helpfully, including harmless questions that only sound dangerous."
)
"""The system-prompt baseline of ``saesteer compare`` (``policy fit --system-prompt safety``): one fixed safety
system prompt, stated here and in the README. Written to ask for refusal of harmful requests *and* for help on
harmless look-alikes (XSTest's safe prompts), so the baseline is not built to over-refuse."""


def prompt_key(token_ids: Sequence[int]) -> str:
    """Short stable hash of a row's real (unpadded) token ids; matches ``generation.encode_prompts`` output."""
    return hashlib.sha1(torch.as_tensor(list(token_ids), dtype=torch.int64).numpy().tobytes()).hexdigest()[:16]


class PolicyRun:
    """State of one ``policy.apply(model)``: the live row map and the gate decisions logged so far."""

    def __init__(self, gate: Gate, interventions: list[Intervention], lookahead: nn.Module | None = None,
                 template_ids: Sequence[int] | None = None, suffix_ids: Sequence[int] | None = None,
                 low: Sequence[Intervention] = (), low_threshold: float | None = None,
                 system_prefix: str | None = None, read: str = "last", window: WindowRead | None = None) -> None:
        self.gate, self.interventions = gate, interventions
        self._always = isinstance(gate, AlwaysGate)
        self._told = False  # inside a decoder prefill whose rows were logged by begin_prefill (gate always)
        ensure(read in GATE_READS, f"unknown gate read {read!r} (choose from {', '.join(GATE_READS)})")
        ensure(read == "last" or template_ids, "a gate that reads every user turn needs the template's token ids")
        ensure((read == "windows") == (window is not None), "a windows read needs its WindowRead (and only it has one)")
        ensure(read != "windows" or lookahead is not None, "a windows read runs the lookahead: pass the gate's reader")
        self.read, self.window = read, window
        # the low side (two-sided policies): ``low`` applied to rows whose score is below ``low_threshold``
        self.low, self.low_threshold = list(low), low_threshold
        self.system_prefix = system_prefix  # asked for by the decoder (models.hooks.system_prefix)
        # token ids appended to every prompt for the gate's read only (a prompted probe); needs the lookahead
        self.suffix_ids = torch.as_tensor(list(suffix_ids), dtype=torch.long) if suffix_ids else None
        # rows whose last tokens are not these (the chat template's post-instruction tokens) are never steered
        self.template_ids = torch.as_tensor(list(template_ids), dtype=torch.long) if template_ids else None
        self.lookahead = lookahead  # the model (gate after a steering layer) or the gate model the gate reads
        self._nested = False  # inside the lookahead forward: every policy hook stands aside
        self._decided = False  # this prefill's decision came from the lookahead
        self.decisions: list[dict[str, Any]] = []
        self.last: list[dict[str, Any]] = []
        self._prefill = True
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self.live: torch.Tensor | None = None  # indices (into ``last``) of the rows still in the batch

    # the body pre-hook: tells prefill from decode and keeps the prompt ids ------------------------------------------
    def pre_hook(self, _mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._nested:
            return None
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        self._prefill = past == 0
        self._decided = False
        if self._prefill:
            self._ids = kwargs.get("input_ids", args[0] if args else None)
            self._mask = kwargs.get("attention_mask")
            if self.lookahead is not None:
                self._look_ahead()
        return None

    def _look_ahead(self) -> None:
        """Decide from an unsteered forward up to the gate layer before the real (steered) prefill runs."""
        judged = self._lookahead_judge(self.lookahead)
        self._apply(*judged)
        self._log(*judged)
        self._decided = True

    def _lookahead_judge(self, reader: nn.Module) -> tuple:
        """The gate's verdict on the prefill's rows (``self._ids`` / ``self._mask``) from an unsteered forward of
        ``reader`` up to the gate layer: :meth:`_judge`'s tuple."""
        ids = self._ids
        ensure(isinstance(ids, torch.Tensor) and ids.ndim == 2,
               "a policy whose gate reads a layer after the steering layer needs input_ids (not inputs_embeds)")
        mask = self._mask if isinstance(self._mask, torch.Tensor) else None
        off = torch.zeros(ids.shape[0], device=ids.device)
        for iv in self.interventions + self.low:
            iv.set_row_scale(off)  # scale 0: the lookahead sees the unsteered residual, bit for bit
        chat = self._chat_rows(ids.shape[0])
        rows = None
        if chat is not None and not bool(chat.all()):  # raw-text rows are never steered: read only the chat rows
            rows = torch.nonzero(chat).flatten()
            if rows.numel() == 0:
                return self._judge(None, rows=rows)
            ids = ids[rows.to(ids.device)]
            mask = mask[rows.to(mask.device)] if mask is not None else None
        if self.suffix_ids is not None:  # the gate reads the prompt followed by the policy's fixed suffix
            n, suf = ids.shape[0], self.suffix_ids.to(ids.device)
            ids = torch.cat([ids, suf.expand(n, -1)], 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones(n, suf.numel(), dtype=mask.dtype, device=mask.device)], 1)
        self._nested = True
        try:
            h = models.run_to_layer(reader, ids, mask, self.gate.layer)
            extra = self.window_scores(ids, mask, reader=reader) if self.window is not None else None
        finally:
            self._nested = False
        return self._judge(h, rows=rows, ids=ids, read_mask=mask, extra=extra)

    # answer reuse (generation.reuse): which rows would this policy leave untouched? ----------------------------------
    def covers(self, member: Any) -> bool:
        """True for the interventions whose per-row strengths this run sets (vouched for by :meth:`untouched_rows`)."""
        return any(member is iv for iv in self.interventions + self.low)

    @torch.no_grad()
    def untouched_rows(self, model: nn.Module, prompt_ids: Sequence[Sequence[int]], batch_size: int = 32) -> list[int]:
        """Positions of the prompts (token ids) that neither side of the policy would steer, decided as a prefill
        would (the gate read by an unsteered forward up to its layer). Their decisions are logged (``last`` holds
        exactly them, in the returned order); the others are left to their real prefill, which logs them then."""
        reader = self.lookahead if self.lookahead is not None else model
        dev = next(model.parameters()).device
        saved = (self._ids, self._mask)
        keep: list[int] = []
        recs: list[dict[str, Any]] = []
        try:
            for j in range(0, len(prompt_ids), batch_size):
                ids, mask = models.left_pad(prompt_ids[j:j + batch_size])
                self._ids, self._mask = ids.to(dev), mask.to(dev)
                judged = self._lookahead_judge(reader)
                for r, rec in enumerate(self._records(*judged)):
                    if not rec["fired"] and not rec.get("low"):
                        keep.append(j + r)
                        recs.append(rec)
        finally:
            self._ids, self._mask = saved
        self.last = recs
        self.decisions.extend(recs)
        self.live = None
        return keep

    @torch.no_grad()
    def window_scores(self, ids: torch.Tensor, mask: torch.Tensor | None = None, batch_size: int = 32,
                      reader: nn.Module | None = None) -> torch.Tensor:
        """Per row of ``ids`` (left padded, ``mask`` 1 on real tokens), the highest gate score over the windows of its
        long user messages (``WindowRead.views``; -inf for a row with none), read by the lookahead model unsteered."""
        reader = reader if reader is not None else self.lookahead
        assert self.window is not None and reader is not None
        n, P = ids.shape[0], self.gate.positions
        views, owner = [], []
        for i in range(n):
            real = ids[i] if mask is None else ids[i][mask[i].bool()]
            for v in self.window.views(real.tolist()):
                views.append(v)
                owner.append(i)
        out = torch.full((n,), float("-inf"))
        if not views:
            return out
        dev = ids.device
        s = []
        for j in range(0, len(views), batch_size):
            chunk = views[j:j + batch_size]
            vid, vmask = models.left_pad(chunk)  # left padding, as every prompt the gate reads
            off = torch.zeros(len(chunk), device=dev)
            for iv in self.interventions + self.low:
                iv.set_row_scale(off)  # the windows are read unsteered
            h = models.run_to_layer(reader, vid.to(dev), vmask.to(dev), self.gate.layer)
            s.append(self.gate.score(h[:, -P:]).float().cpu())
        return out.scatter_reduce(0, torch.as_tensor(owner), torch.cat(s), reduce="amax")
    # the gate hook ---------------------------------------------------------------------------------------------------
    def gate_hook(self, _mod: nn.Module, _inp: Any, out: Any) -> None:
        if not self._prefill or self._nested or self._decided or self._told:
            return None
        judged = self._judge(models.layer_output(out))
        self._apply(*judged)
        self._log(*judged)
        return None

    def _judge(self, h: torch.Tensor | None, rows: torch.Tensor | None = None, ids: torch.Tensor | None = None,
               read_mask: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> tuple:
        """The gate's verdict on the batch from residuals ``h``: ``(scores, fired, strength, mask, chat, low)``; with
        ``rows``, ``h`` holds only those rows of the batch (the chat rows: the others are never steered, their score
        is logged as None). ``ids`` / ``read_mask``: the token ids and
        mask ``h`` was computed from, when not the prefill's own (the lookahead's rows); ``extra``: further scores per
        read row that the gate's score is the maximum with (a windows read's)."""
        P = self.gate.positions
        mask = self._mask if isinstance(self._mask, torch.Tensor) and self._mask.ndim == 2 else None
        if mask is not None:
            ensure(bool(mask[:, -P:].bool().all()),
                   "policy gates need left padding (the last prompt tokens of some row are padding)")
        if h is not None:
            h = h.unsqueeze(0) if h.ndim == 2 else h
            ensure(h.shape[1] >= P, f"policy gate reads the last {P} prompt tokens but the prompt has {h.shape[1]}")
            with torch.no_grad():
                if self.read in ("turns", "windows"):
                    rid, rmask = (self._ids, mask) if ids is None else (ids, read_mask)
                    ensure(isinstance(rid, torch.Tensor) and rid.ndim == 2,
                           "a gate that reads every user turn needs input_ids (not inputs_embeds)")
                    rmask = rmask if isinstance(rmask, torch.Tensor) and rmask.ndim == 2 else None
                    sc = self.turn_scores(h.detach(), rid, rmask)
                    if extra is not None:
                        sc = torch.maximum(sc, extra.to(sc.dtype))
                    scores, fired, strength = self.gate.decide_scores(sc)
                else:
                    scores, fired, strength = (t.cpu() for t in self.gate.decide(h[:, -P:].detach()))
        if rows is not None:  # scatter into the whole batch; unread rows: no score, never fired
            n = self._ids.shape[0]
            part = (scores, fired, strength) if h is not None else None
            scores, fired, strength = torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.bool), torch.zeros(n)
            if part is not None:
                scores[rows], fired[rows], strength[rows] = part
        n = scores.shape[0]
        chat = self._chat_rows(n)
        if chat is not None:
            fired, strength = fired & chat, torch.where(chat, strength, torch.zeros_like(strength))
        low = None
        if self.low_threshold is not None:  # NaN scores (unread rows) compare False: never steered low
            low = scores < self.low_threshold
            if chat is not None:
                low = low & chat
        return scores, fired, strength, mask, chat, low

    def _apply(self, scores: torch.Tensor, fired: torch.Tensor, strength: torch.Tensor, mask: torch.Tensor | None,
               chat: torch.Tensor | None, low: torch.Tensor | None) -> None:
        """Set every intervention's per-row strength from a verdict of :meth:`_judge`."""
        dev = self._ids.device if isinstance(self._ids, torch.Tensor) else "cpu"
        if low is not None:
            for iv in self.low:
                iv.set_row_scale(low.float().to(dev))
        for iv in self.interventions:
            iv.set_row_scale(strength.to(dev))

    def turn_scores(self, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per row, the highest gate score over the post-instruction tokens after each user turn (``read="turns"``).

        ``h`` ``[n, T, d]`` holds the residuals of ``ids`` ``[n, T]`` (left padded, ``mask`` 1 on real tokens). A turn
        ends wherever the template's post-instruction ids occur on real tokens; the row's own last positions always
        count (a row without the template is scored on them, as ``read="last"`` does)."""
        P, t = self.gate.positions, self.template_ids
        ensure(t is not None, "a gate that reads every user turn needs the template's token ids")
        ensure(ids.shape == h.shape[:2], f"gate residuals {tuple(h.shape[:2])} do not match the token ids {tuple(ids.shape)}")
        n, T, L = ids.shape[0], ids.shape[1], t.numel()
        ends = torch.zeros(n, T, dtype=torch.bool)
        if T >= L:
            hit = (ids.cpu().unfold(1, L, 1) == t).all(-1)  # [n, T-L+1]: template starting at j, ending at j+L-1
            ends[:, L - 1:] = hit
        ends[:, :P - 1] = False  # an end must leave room for the P positions read
        if mask is not None:  # all P positions read must be real tokens
            real = mask.cpu().bool()
            ok = real.clone()
            for k in range(1, P):  # position e is usable when e, e-1, ..., e-P+1 are real
                ok[:, k:] &= real[:, : T - k]
            ends &= ok
        ends[:, -1] = True
        row, pos = torch.nonzero(ends, as_tuple=True)
        idx = pos.unsqueeze(1) + torch.arange(-P + 1, 1).unsqueeze(0)  # [m, P]
        win = h[row.to(h.device).unsqueeze(1), idx.to(h.device)]  # [m, P, d]
        s = self.gate.score(win).float().cpu()
        out = torch.full((n,), float("-inf"))
        return out.scatter_reduce(0, row, s, reduce="amax")

    def _chat_rows(self, n: int) -> torch.Tensor | None:
        """Which rows end with the template's post-instruction tokens (None: no template check)."""
        ids, t = self._ids, self.template_ids
        if t is None or not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != n:
            return None
        if ids.shape[1] < t.numel():
            return torch.zeros(n, dtype=torch.bool)
        return (ids[:, -t.numel():].cpu() == t).all(dim=1)

    def _log(self, scores: torch.Tensor, fired: torch.Tensor, strength: torch.Tensor, mask: torch.Tensor | None,
             chat: torch.Tensor | None = None, low: torch.Tensor | None = None,
             real: Sequence[Sequence[int]] | None = None) -> None:
        rows = self._records(scores, fired, strength, mask, chat, low, real)
        self.last = rows
        self.decisions.extend(rows)
        self.live = torch.arange(len(rows))

    def _records(self, scores: torch.Tensor, fired: torch.Tensor, strength: torch.Tensor, mask: torch.Tensor | None,
                 chat: torch.Tensor | None = None, low: torch.Tensor | None = None,
                 real: Sequence[Sequence[int]] | None = None) -> list[dict[str, Any]]:
        """One decision record per row (see the module docstring); ``real``: each row's real token ids, when they are
        not the prefill's own (``self._ids`` without padding)."""
        ids = self._ids if isinstance(self._ids, torch.Tensor) and self._ids.ndim == 2 else None
        rows = []
        for i in range(scores.shape[0]):
            sc = float(scores[i])
            d: dict[str, Any] = {"score": None if math.isnan(sc) else sc, "fired": bool(fired[i]),
                                 "strength": float(strength[i])}
            if chat is not None:
                d["chat"] = bool(chat[i])  # False: not a chat prompt, left unsteered whatever the score
            if low is not None:  # two-sided: which side fired (None: neither, the row is untouched)
                d["low"] = bool(low[i])
                d["side"] = "high" if d["fired"] else "low" if d["low"] else None
            if real is not None:
                d.update(key=prompt_key(real[i]), n_tokens=len(real[i]))
            elif ids is not None and ids.shape[0] == scores.shape[0]:
                row = ids[i] if mask is None else ids[i][mask[i].bool()]
                d.update(key=prompt_key(row.tolist()), n_tokens=int(row.numel()))
            rows.append(d)
        return rows

    # an unconditional policy under the decoder's prefill (models.hooks.prefilling) --------------------------------------
    def prefix_safe(self) -> bool:
        """An unconditional policy (gate ``always``) decides nothing per row and logs its rows from the decoder's prompt
        ids (:meth:`begin_prefill`), so the decoder may prefill a shared prefix once (a system prompt's tokens); a gate
        reads each row's whole prompt, so a gated policy is not position-wise."""
        return self._always and self.lookahead is None and self.low_threshold is None

    def begin_prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        """Log every row of the coming prefill as fired at full strength (gate ``always``), from its real token ids,
        as the gate hook would; the steering runs unscaled (position-wise). Gated policies ignore this."""
        if not self.prefix_safe():
            return
        self._told = True
        for iv in self.interventions:
            iv.set_row_scale(None)
        n = len(prompts)
        self._log(torch.ones(n), torch.ones(n, dtype=torch.bool), torch.ones(n), None, real=prompts)

    def end_prefill(self) -> None:
        self._told = False

    # row bookkeeping, called through models.hooks.select_rows ----------------------------------------------------------------
    def select_rows(self, index: torch.Tensor) -> None:
        if self.live is not None:
            self.live = self.live[torch.as_tensor(index, dtype=torch.long).cpu()]

    def set_row_scale(self, scale: Any) -> None:  # steering.set_row_scale(model, ...) iterates us too: nothing to do
        return None

    # summaries -------------------------------------------------------------------------------------------------------
    def fire_rate(self) -> float:
        return sum(d["fired"] for d in self.decisions) / len(self.decisions) if self.decisions else float("nan")

    def low_rate(self) -> float:
        """Fraction of rows steered by the low side (NaN: no decisions, or a one-sided policy)."""
        if not self.decisions or self.low_threshold is None:
            return float("nan")
        return sum(bool(d.get("low")) for d in self.decisions) / len(self.decisions)

    def by_key(self) -> dict[str, dict[str, Any]]:
        """Latest decision per prompt key (map prompts with ``prompt_key(encode_prompts(tok, [p])[0])``)."""
        return {d["key"]: d for d in self.decisions if "key" in d}


@dataclass
class Policy:
    """A gate, its threshold (inside the gate) and the steering applied to the rows it lets through."""

    gate: Gate
    """The gate (``gates.make_gate`` / ``gate_from_header``); kind ``always`` = unconditional steering."""
    steering: list[SteeringSpec]
    """What to apply when the gate fires (``steering.SteeringSpec``: clamp an SAE latent, add a direction, ...);
    may be empty when the policy has a low side or a system prompt."""
    name: str = ""
    """Label in comparison tables (default: the file stem)."""
    model: str | None = None
    """Model the policy was fitted on (checked loosely: a warning-free mismatch is an error only for gates)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """How it was fitted (data specs, sizes, validation FPR/TPR, held-out stats)."""
    template_ids: list[int] | None = None
    """The chat template's post-instruction token ids (``<|im_end|>\\n<|im_start|>assistant\\n``). When set, a row
    whose prompt does not end with them (raw text, e.g. harness-style MMLU contexts) is never steered: the gate is
    defined on those tokens. None: gate every row on its last tokens, whatever they are."""
    gate_model: str | None = None
    """Model whose residual stream the gate reads (None: the steered model). It must share the steered model's
    tokenizer (same token ids); its layer ``gate.layer`` is read by an unsteered lookahead on every prefill."""
    gate_suffix: str | None = None
    """Text appended after each chat-formatted prompt for the gate's read only (e.g. an assistant prefix asking for a
    verdict: a prompted probe); the gate reads its last tokens in an unsteered lookahead, generation never sees it."""
    gate_suffix_ids: list[int] | None = None
    """``gate_suffix`` as token ids of the (shared) tokenizer; these are what the lookahead appends."""
    steering_low: list[SteeringSpec] = field(default_factory=list)
    """Two-sided policies: what to apply to rows whose gate score is below ``low_threshold`` (e.g. ablate the refusal
    direction on prompts the gate is sure are benign). Empty: one-sided."""
    low_threshold: float | None = None
    """Score below which ``steering_low`` applies (<= the gate's threshold; rows in between are untouched)."""
    system: str | None = None
    """A fixed system prompt put before every chat prompt generated under the policy (e.g.
    :data:`SAFETY_SYSTEM_PROMPT`); unconditional, whatever the gate decides."""
    gate_read: str = "last"
    """What the gate reads of a conversation: ``last`` = the post-instruction tokens after the last user message;
    ``turns`` = the highest score over those after every user turn (needs ``template_ids``, no gate suffix);
    ``windows`` = ``turns`` and windows of every long user message (needs ``gate_window``)."""
    gate_window: WindowRead | None = None
    """How a ``windows`` read cuts long user messages (``WindowRead``: window size, stride, the template's markers)."""
    last_run: PolicyRun | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        ensure(isinstance(self.gate, Gate), "policy gate must be a saesteer.gating.gates.Gate")
        ensure(isinstance(self.steering, list) and isinstance(self.steering_low, list),
               "policy steering must be a list of SteeringSpec")
        ensure(self.system is None or (isinstance(self.system, str) and self.system.strip() != ""),
               "a policy's system prompt must be a non-empty string or None")
        ensure(len(self.steering) > 0 or len(self.steering_low) > 0 or self.system is not None,
               "a policy needs at least one steering spec (or a low side, or a system prompt)")
        ensure(bool(self.steering_low) == (self.low_threshold is not None),
               "a two-sided policy needs both its low-side steering and its low threshold")
        if self.low_threshold is not None:
            self.low_threshold = float(self.low_threshold)
            ensure(not isinstance(self.gate, AlwaysGate), "an unconditional policy (gate always) has no low side")
            ensure(not math.isnan(self.low_threshold) and self.low_threshold <= self.gate.threshold,
                   f"the low threshold ({self.low_threshold}) must be a number <= the gate threshold "
                   f"({self.gate.threshold}): a row may not be steered both ways")
        ensure((self.gate_suffix is None) == (self.gate_suffix_ids is None), "a gate suffix needs its text and its ids")
        ensure(self.gate_read in GATE_READS,
               f"unknown gate read {self.gate_read!r} (choose from {', '.join(GATE_READS)})")
        ensure((self.gate_read == "windows") == (self.gate_window is not None),
               "a windows gate read needs its gate_window (and no other read has one)")
        if self.gate_read in ("turns", "windows"):
            ensure(not isinstance(self.gate, AlwaysGate), "an unconditional policy (gate always) reads no turns")
            ensure(bool(self.template_ids), "a gate that reads every user turn needs template_ids (fit with --chat-only)")
            ensure(self.gate_suffix_ids is None, "a gate that reads every user turn cannot also read a gate suffix")
        if self.gate_suffix_ids is not None:
            ensure(len(self.gate_suffix_ids) >= self.gate.positions,
                   f"the gate reads {self.gate.positions} positions but its suffix has {len(self.gate_suffix_ids)} tokens")

    @property
    def last_decisions(self) -> list[dict[str, Any]] | None:
        """Gate decisions of the latest prefill (one dict per row, batch order); read by ``evals.refusal``."""
        return self.last_run.last if self.last_run is not None else None

    def with_strength(self, multiplier: float, name: str | None = None) -> "Policy":
        """A copy whose steering (the high side) is at ``multiplier`` times its strength
        (:func:`saesteer.steering.with_strength`); gate, low side and system prompt are kept."""
        import dataclasses

        ensure(len(self.steering) > 0, f"policy {self.name!r} has no steering whose strength could change")
        return dataclasses.replace(self, steering=[with_strength(s, multiplier) for s in self.steering],
                                   name=self.name if name is None else name, meta=dict(self.meta), last_run=None)

    # ------------------------------------------------------------------------------------------------- (de)serialise
    def to_json(self) -> dict[str, Any]:
        from safetensors.torch import save

        blob = save(self.gate.tensors()) if self.gate.tensors() else b""
        return {"format": FORMAT, "version": VERSION, "name": self.name, "model": self.model,
                "gate": self.gate.header(), "gate_model": self.gate_model, "template_ids": self.template_ids,
                "gate_suffix": self.gate_suffix, "gate_suffix_ids": self.gate_suffix_ids,
                "steer": [s.to_dict() for s in self.steering], "steer_low": [s.to_dict() for s in self.steering_low],
                "low_threshold": _num_out(self.low_threshold), "system": self.system, "gate_read": self.gate_read,
                "gate_window": self.gate_window.to_dict() if self.gate_window is not None else None, "meta": self.meta,
                "tensors": base64.b64encode(blob).decode("ascii"), "tensors_sha256": hashlib.sha256(blob).hexdigest()}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj: Any, where: str = "policy") -> "Policy":
        ensure(isinstance(obj, dict), f"{where}: a policy file holds a JSON object")
        ensure(obj.get("format") == FORMAT, f"{where}: not a saesteer policy (format {obj.get('format')!r})")
        ensure(obj.get("version") == VERSION, f"{where}: unsupported policy version {obj.get('version')!r} (this saesteer reads {VERSION})")
        for k in ("gate", "steer", "tensors"):
            ensure(k in obj, f"{where}: missing field {k!r}")
        try:
            blob = base64.b64decode(obj["tensors"], validate=True)
        except (ValueError, TypeError):
            raise SaesteerError(f"{where}: the tensors field is not valid base64") from None
        if "tensors_sha256" in obj:
            ensure(hashlib.sha256(blob).hexdigest() == obj["tensors_sha256"], f"{where}: tensor checksum mismatch (file corrupted?)")
        tensors: dict[str, torch.Tensor] = {}
        if blob:
            from safetensors.torch import load

            try:
                tensors = load(blob)
            except Exception as e:  # safetensors raises its own error types for corrupt blobs
                raise SaesteerError(f"{where}: corrupt tensor blob: {e}") from None
        ensure(isinstance(obj["gate"], dict), f"{where}: gate must be a JSON object")
        gate = gate_from_header(obj["gate"], tensors)
        low = obj.get("steer_low") or []
        system = obj.get("system")
        ensure(system is None or isinstance(system, str), f"{where}: system must be a string or null")
        ensure(isinstance(obj["steer"], list) and isinstance(low, list), f"{where}: steer and steer_low must be lists")
        ensure(bool(obj["steer"] or low or system), f"{where}: steer must be a non-empty list of specs")
        specs = [SteeringSpec.from_dict(s) for s in obj["steer"]]
        tids = obj.get("template_ids")
        ensure(tids is None or (isinstance(tids, list) and all(isinstance(i, int) and i >= 0 for i in tids)),
               f"{where}: template_ids must be a list of token ids or null")
        gm = obj.get("gate_model")
        ensure(gm is None or (isinstance(gm, str) and gm), f"{where}: gate_model must be a model name or null")
        sx, sids = obj.get("gate_suffix"), obj.get("gate_suffix_ids")
        ensure(sx is None or isinstance(sx, str), f"{where}: gate_suffix must be a string or null")
        ensure(sids is None or (isinstance(sids, list) and sids and all(isinstance(i, int) and i >= 0 for i in sids)),
               f"{where}: gate_suffix_ids must be a non-empty list of token ids or null")
        return cls(gate=gate, steering=specs, name=str(obj.get("name") or ""), model=obj.get("model"),
                   meta=dict(obj.get("meta") or {}), gate_model=gm, template_ids=tids or None,
                   gate_suffix=sx, gate_suffix_ids=sids, steering_low=[SteeringSpec.from_dict(s) for s in low],
                   low_threshold=_num_in(obj.get("low_threshold"), f"{where}: low_threshold"), system=system,
                   gate_read=str(obj.get("gate_read") or "last"),
                   gate_window=WindowRead.from_dict(obj["gate_window"], where) if obj.get("gate_window") else None)

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        p = Path(path)
        pol = cls.from_json(read_json(p, "policy file"), where=str(p))
        pol.name = pol.name or p.stem
        return pol

    # ------------------------------------------------------------------------------------------------- apply
    def build(self, model: nn.Module, sae_cache: dict[str, Any] | None = None) -> list[Intervention]:
        """The steering interventions (SAEs loaded once; an SAE gate gets its SAE from the same cache)."""
        cache = {} if sae_cache is None else sae_cache
        ivs = [iv for s in self.steering for iv in s.build(model, cache)]
        if isinstance(self.gate, SAEFeatureGate) and self.gate.sae is None:
            ensure(self.gate.sae_path is not None, "sae gate has neither an SAE nor an sae_path")
            self.gate.attach(load_sae_cached(self.gate.sae_path, cache))
        return ivs

    def build_low(self, model: nn.Module, sae_cache: dict[str, Any] | None = None) -> list[Intervention]:
        """The low side's interventions (two-sided policies; empty otherwise)."""
        cache = {} if sae_cache is None else sae_cache
        return [iv for s in self.steering_low for iv in s.build(model, cache)]

    def reader(self, model: nn.Module) -> nn.Module:
        """The model the gate reads: ``model`` itself, or the loaded ``gate_model`` (same device)."""
        if self.gate_model is None or isinstance(self.gate, AlwaysGate):
            return model
        gm = load_gate_model(self.gate_model, str(next(model.parameters()).device))[0]
        nv, gv = model.get_input_embeddings().weight.shape[0], gm.get_input_embeddings().weight.shape[0]
        ensure(nv == gv, f"gate model {self.gate_model!r} has {gv} token embeddings, the steered model {nv}: "
               "a gate model must share the steered model's tokenizer")
        return gm

    def check(self, model: nn.Module, interventions: Sequence[Intervention]) -> int:
        """Validate the gate against the model it reads; returns the gate layer (see :meth:`needs_lookahead`)."""
        return self._check_reader(self.reader(model))

    def _check_reader(self, reader: nn.Module) -> int:
        g = models.check_layer(reader, self.gate.layer)
        if not isinstance(self.gate, AlwaysGate):
            d = self.gate.d_in
            dm = models.d_model(reader)
            ensure(d is None or d == dm, f"policy gate reads width {d}, the gate model's residual is {dm}")
        return g

    def needs_lookahead(self, model: nn.Module, interventions: Sequence[Intervention]) -> bool:
        """True when the gate reads a layer after some layer that steers prompt tokens: the prompt would be steered
        before the gate could decide, so the decision comes from an unsteered lookahead forward instead."""
        if isinstance(self.gate, AlwaysGate):
            return False
        if self.gate_model is not None or self.gate_suffix_ids is not None or self.gate_read == "windows":
            return True  # another model or another text (the suffix, the windows): always an extra (partial) prefill
        g = models.check_layer(model, self.gate.layer)
        return any(g > _first_edit(iv, model) for iv in interventions if (iv.positions or "all") != "generated")

    @contextlib.contextmanager
    def apply(self, model: nn.Module, interventions: Sequence[Intervention] | None = None,
              low: Sequence[Intervention] | None = None) -> Iterator[PolicyRun]:
        """Install the policy on ``model`` for the ``with`` block (hooks always removed); yields a :class:`PolicyRun`.
        ``interventions`` / ``low``: the steering / low-side interventions already built (default: built here)."""
        cache: dict[str, Any] = {}  # SAEs loaded once for both sides
        ivs = list(interventions) if interventions is not None else self.build(model, cache)
        low = list(low) if low is not None else self.build_low(model, cache)
        if isinstance(self.gate, SAEFeatureGate) and self.gate.sae is not None:
            self.gate.sae.to(next(model.parameters()).device)
        reader = self.reader(model)
        layer = self._check_reader(reader)
        if self.gate_suffix_ids is not None:
            nv = reader.get_input_embeddings().weight.shape[0]
            ensure(max(self.gate_suffix_ids) < nv, f"gate suffix token id {max(self.gate_suffix_ids)} is out of range "
                   f"for a vocabulary of {nv}")
        gated = not isinstance(self.gate, AlwaysGate)
        run = PolicyRun(self.gate, ivs, lookahead=reader if self.needs_lookahead(model, ivs + low) else None,
                        template_ids=self.template_ids if gated else None,
                        suffix_ids=self.gate_suffix_ids if gated else None, low=low,
                        low_threshold=self.low_threshold, system_prefix=self.system,
                        read=self.gate_read if gated else "last", window=self.gate_window if gated else None)
        self.last_run = run
        with steer(model, ivs + low):
            hs = models.hooks.install(model, run, members=[run])
            try:
                models.hooks.register_forward_pre_hook(models.model_body(model), run.pre_hook, hs, with_kwargs=True,
                                                       prepend=True)
                if run.lookahead is None:  # otherwise the lookahead decides: no hook here
                    models.hooks.register_forward_hook(models.hook_module(model, layer), run.gate_hook, hs, prepend=True)
                yield run
            finally:
                models.hooks.uninstall(model, hs)
                for iv in ivs + low:
                    iv.set_row_scale(None)


_GATE_MODELS: dict[tuple[str, str], tuple[nn.Module, Any]] = {}


def load_gate_model(name: str, device: str = "cpu") -> tuple[nn.Module, Any]:
    """A policy's gate model and tokenizer, loaded once per process and device (``models.load_model``)."""
    key = (name, device)
    if key not in _GATE_MODELS:
        _GATE_MODELS[key] = models.load_model(name, device=device)
    return _GATE_MODELS[key]


def check_same_tokenizer(tok: Any, gate_tok: Any, gate_model: str) -> None:
    """A gate model reads the steered model's token ids, so both tokenizers must map text to the same ids."""
    ensure(tok.get_vocab() == gate_tok.get_vocab(),
           f"gate model {gate_model!r} has another tokenizer than the steered model: a gate model must share it")


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file."""
    return Policy.load(path)


def policy_summary(p: Policy) -> dict[str, Any]:
    """What ``saesteer policy show`` prints."""
    g = p.gate
    thr = g.threshold
    out = {"name": p.name, "model": p.model, "gate_model": p.gate_model, "gate": g.kind, "layer": g.layer, "positions": g.positions,
           "reduce": g.reduce, "threshold": thr if math.isfinite(thr) else str(thr), "strength": g.strength,
           "gate_suffix": p.gate_suffix, "gate_read": p.gate_read, "system_prompt": p.system,
           **({"gate_window": {"size": p.gate_window.size, "stride": p.gate_window.stride, "split": p.gate_window.split}}
              if p.gate_window else {}),
           "steer": [s.to_dict() for s in p.steering]}
    if p.steering_low:
        out.update(steer_low=[s.to_dict() for s in p.steering_low], low_threshold=_num_out(p.low_threshold))
    if isinstance(g, SAEFeatureGate) and g.fitted:
        out["gate_features"] = g.features.tolist()
        out["gate_feature_auroc"] = [round(float(a), 4) for a in g.auroc]
    out.update({k: v for k, v in p.meta.items() if k in ("val", "heldout", "train", "fpr", "low", "match")})
    return out


def _first_edit(iv: Intervention, model: nn.Module) -> int:
    """The first layer an intervention edits; -1 for an every-layer direction ablation, which edits the embeddings."""
    return -1 if isinstance(iv, AblateDirection) and iv.layer is None else min(iv.layers(model))


def _num_out(x: float | None) -> float | str | None:
    """A threshold for JSON: finite numbers as is, infinities as ``"inf"`` / ``"-inf"``."""
    return x if x is None or math.isfinite(x) else ("-inf" if x < 0 else "inf")


def _num_in(x: Any, what: str) -> float | None:
    if x is None:
        return None
    try:
        return float(x)  # also reads "inf" / "-inf"
    except (TypeError, ValueError):
        raise SaesteerError(f"{what} must be a number or null, got {x!r}") from None


def policy_label(p: Policy) -> str:
    """A short description of what a policy does, for tables: ``system prompt + clamp f2262=10 | low: ablate_direction
    refusal``."""
    from saesteer.steering import spec_name

    parts = (["system prompt"] if p.system else []) + [spec_name(s) for s in p.steering]
    label = " + ".join(parts)
    if p.steering_low:
        label += " | low: " + " + ".join(spec_name(s) for s in p.steering_low)
    return label
