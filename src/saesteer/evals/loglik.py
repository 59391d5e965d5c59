"""Batched log-likelihood scoring in lm-evaluation-harness's convention (the engine of the capability evals).

``loglikelihoods(model, tok, [(context, [continuation, ...]), ...])`` returns ``(sum log p(cont | ctx), is_greedy)``
per continuation, exactly as HFLM defines it: the continuation split off the end of ``encode(context +
continuation)``, trailing context whitespace moved into the continuation, inputs longer than the model's context
keeping their last ``max_length + 1`` tokens, float32 log-softmax. Three execution plans, all exact:

1. **single-token choices** (MMLU's ``" A"`` … ``" D"``): ONE forward of the context, the candidates read at its last
   position;
2. **shared prefix** (TruthfulQA's answers after a long primer): the context runs once with a KV cache, the cache is
   repeated per choice (``Cache.reorder_cache``; live steering row states follow through ``models.hooks.select_rows``),
   and only the continuation tokens run for each choice;
3. **one sequence per choice** ``(ctx + cont)[:-1]`` otherwise (truncation needed, one choice, or steering that
   distinguishes prompt from generated positions, which a cached continuation would change).

Batches are LEFT-padded with position ids from the attention mask (the harness right-pads; values agree to float
rounding) so that gates reading the last prompt positions (``policy.apply``) see real tokens. Only the scored
positions go through the LM head (the full ``[batch, seq, vocab]`` logits never exist).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from saesteer.core import SaesteerError, ensure

Request = tuple[str, Sequence[str]]


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) split the harness's way (whitespace moved, split off the whole)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)  # the tokenizer's own special tokens (BOS), as HFLM does
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def max_length(model: Any, tok: Any, default: int = 2048) -> int:
    """The model's context length, looked up the way HFLM does (config, then tokenizer, then 2048)."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    tml = getattr(tok, "model_max_length", None)
    return int(tml) if tml and tml < 10**9 else default


def _lm_logp(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp = torch.log_softmax(logits, dim=-1)
    if not torch.isfinite(logp).all():
        raise SaesteerError("the model produced NaN/inf log-probabilities (check the steering strength)")
    return logp


def _can_share(model: Any) -> bool:
    from saesteer.steering import active_interventions

    return all(getattr(iv, "positions", None) in (None, "all") for iv in active_interventions(model))


def plan(tok: Any, requests: Sequence[Request], max_len: int, share: bool) -> tuple[list, list]:
    """``(sequences, groups)``: sequences = ``(ids, [(req, choice, cont ids)])`` for plans 1 and 3; groups =
    ``(ctx ids, [(req, choice, cont ids)])`` for plan 2."""
    seqs: list[tuple[list[int], list[tuple[int, int, list[int]]]]] = []
    groups: list[tuple[list[int], list[tuple[int, int, list[int]]]]] = []
    for r, (context, conts) in enumerate(requests):
        ensure(len(conts) > 0, f"request {r} has no continuations")
        pairs = [encode_pair(tok, context, c) for c in conts]
        ensure(all(len(c) > 0 for _, c in pairs), f"request {r}: a continuation encodes to no tokens")
        ctx = pairs[0][0]
        same_ctx = bool(ctx) and all(p == ctx for p, _ in pairs)
        if same_ctx and all(len(c) == 1 for _, c in pairs):
            seqs.append((ctx[-max_len:], [(r, j, c) for j, (_, c) in enumerate(pairs)]))
        elif share and same_ctx and len(pairs) > 1 and len(ctx) + max(len(c) for _, c in pairs) <= max_len + 1:
            groups.append((ctx, [(r, j, c) for j, (_, c) in enumerate(pairs)]))
        else:
            for j, (p, c) in enumerate(pairs):
                full = p + c
                ensure(len(full) > 1, f"request {r}: context and continuation are too short to score")
                ensure(len(c) <= max_len, f"request {r}: continuation longer than the model's {max_len} positions")
                seqs.append((full[-(max_len + 1):][:-1], [(r, j, c)]))
    return seqs, groups


def count_sequences(tok: Any, requests: Sequence[Request], max_len: int = 10**9, share: bool = True) -> int:
    """Units of work :func:`loglikelihoods` reports to ``progress`` (one per sequence or shared-prefix group)."""
    seqs, groups = plan(tok, requests, max_len, share)
    return len(seqs) + len(groups)


def _left_pad(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from saesteer.models import left_pad

    inp, mask = left_pad(batch, pad)
    return inp, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _score(lp: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    tgt = torch.tensor(cont, device=lp.device)
    return float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


def _token_logprobs(lp: torch.Tensor, cont: list[int]) -> list[float]:
    return lp.gather(1, torch.tensor(cont, device=lp.device)[:, None])[:, 0].tolist()


def _run_sequences(model, body, seqs, batch_size, pad, out, progress, score=_score) -> None:
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    for b0 in range(0, len(order), max(1, batch_size)):
        batch = [seqs[i] for i in order[b0:b0 + batch_size]]
        inp, mask, pos = _left_pad([ids for ids, _ in batch], pad)
        T = inp.shape[1]
        hidden = body(input_ids=inp.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                      use_cache=False).last_hidden_state
        rows, cols, spans = [], [], []
        for i, (_ids, targets) in enumerate(batch):
            n = 1 if len(targets) > 1 else len(targets[0][2])  # several single-token candidates share a position
            spans.append(len(rows))
            rows += [i] * n
            cols += list(range(T - n, T))
        logp = _lm_logp(model, hidden[rows, cols])
        for i, (_ids, targets) in enumerate(batch):
            for r, j, cont in targets:
                out[r][j] = score(logp[spans[i]:spans[i] + len(cont)] if len(targets) == 1 else
                                  logp[spans[i]][None], cont)
        if progress:
            progress(len(batch))


def _run_groups(model, body, groups, batch_size, pad, out, progress) -> None:
    from saesteer.steering import select_rows

    device = next(model.parameters()).device
    order = sorted(range(len(groups)), key=lambda i: -len(groups[i][0]))
    per_batch = max(1, batch_size // 4)  # contexts per prefill; each expands to its choices
    for b0 in range(0, len(order), per_batch):
        batch = [groups[i] for i in order[b0:b0 + per_batch]]
        inp, mask, pos = _left_pad([ctx for ctx, _ in batch], pad)
        res = body(input_ids=inp.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                   use_cache=True)
        first = _lm_logp(model, res.last_hidden_state[:, -1])  # predicts every continuation's first token
        index = [i for i, (_, targets) in enumerate(batch) for _ in targets]
        conts = [c for _, targets in batch for _r, _j, c in targets]
        M = max(len(c) for c in conts) - 1
        rest = None
        if M > 0:
            idx = torch.tensor(index, device=device)
            cache = res.past_key_values
            cache.reorder_cache(idx)
            select_rows(model, idx)  # per-row steering state (gates) follows its context
            cin = torch.full((len(conts), M), pad, dtype=torch.long)
            cmask = torch.zeros((len(conts), M), dtype=torch.long)
            for r, c in enumerate(conts):
                cin[r, : len(c) - 1] = torch.tensor(c[:-1])
                cmask[r, : len(c) - 1] = 1
            full_mask = torch.cat([mask[index], cmask], dim=1)
            cpos = torch.tensor([[len(batch[i][0]) + k for k in range(M)] for i in index])
            h = body(input_ids=cin.to(device), attention_mask=full_mask.to(device), position_ids=cpos.to(device),
                     past_key_values=cache, use_cache=True).last_hidden_state
            rows = [r for r, c in enumerate(conts) for _ in range(len(c) - 1)]
            cols = [k for c in conts for k in range(len(c) - 1)]
            rest = _lm_logp(model, h[rows, cols]) if rows else None
        at = 0
        for i, (_, targets) in enumerate(batch):
            for req, j, c in targets:
                lp = first[i][None]
                if len(c) > 1:
                    lp = torch.cat([lp, rest[at:at + len(c) - 1]])
                    at += len(c) - 1
                out[req][j] = _score(lp, c)
        if progress:
            progress(len(batch))


@torch.inference_mode()
def loglikelihoods(
    model: Any, tok: Any, requests: Sequence[Request], batch_size: int = 8,
    progress: Callable[[int], None] | None = None, share_prefix: bool = True,
) -> list[list[tuple[float, bool]]]:
    """For each ``(context, [continuations])``: ``[(sum log p(continuation | context), is_greedy), ...]``
    (see the module docstring for the three plans; ``share_prefix=False`` disables the KV-cache plan)."""
    max_len = max_length(model, tok)
    seqs, groups = plan(tok, requests, max_len, share_prefix and _can_share(model))
    out: list[list[Any]] = [[None] * len(c) for _, c in requests]
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    _run_sequences(model, body, seqs, batch_size, pad, out, progress)
    _run_groups(model, body, groups, batch_size, pad, out, progress)
    return out



@torch.inference_mode()
def continuation_logprobs(
    model: Any, tok: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Per-token ``log p(cont[t] | ctx, cont[:t])`` for token-id pairs ``(ctx, cont)`` (both non-empty), through the
    engine of plan 3 (one left-padded sequence per pair, longest first; an input longer than the model's context
    keeps its last positions). ``progress(n)`` is called after each batch of n pairs."""
    max_len = max_length(model, tok)
    seqs = []
    for r, (ctx, cont) in enumerate(pairs):
        ensure(len(ctx) > 0 and len(cont) > 0, f"pair {r}: empty context or continuation")
        ensure(len(cont) <= max_len, f"pair {r}: continuation longer than the model's {max_len} positions")
        seqs.append(((list(ctx) + list(cont))[-(max_len + 1):][:-1], [(r, 0, list(cont))]))
    out: list[list[Any]] = [[None] for _ in pairs]
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    _run_sequences(model, body, seqs, batch_size, pad, out, progress, score=_token_logprobs)
    return [o[0] for o in out]
