"""Per-token SAE latents of prompts and answers: which latents fire where (prompt, post-instruction tokens, answer),
the input of discovery and of feature cards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from saesteer.core import ensure
from saesteer.models import format_chat, run_to_layer, special_token_ids


@dataclass
class SeqLatents:
    """Top-k SAE latents of one token sequence. Masks are over its tokens; post/answer are subsets of valid."""

    text: str
    token_ids: list[int]
    acts: torch.Tensor
    """[T, w] active latents' activations (zeros where not encoded); w = k for Top-k SAEs, else the sequence's
    largest number of active latents per token."""
    idx: torch.Tensor
    """[T, w] their latent ids."""
    valid: torch.Tensor
    """[T] encoded positions (not position 0, not special tokens)."""
    post: torch.Tensor
    """[T] post-instruction positions: chat-template tokens after the user message."""
    answer: torch.Tensor
    """[T] answer tokens."""
    post_resid: torch.Tensor | None = None
    """[d] mean residual over the post-instruction positions (None when there are none)."""

    def feature_acts(self, f: int) -> torch.Tensor:
        """[T] activation of latent ``f`` at each token (0 where it is not in the top-k)."""
        return (self.acts * (self.idx == f)).sum(-1)


def dense_mean(seq: SeqLatents, mask: torch.Tensor, num_latents: int) -> torch.Tensor:
    """Mean dense latent vector over the positions in ``mask`` (zeros when the mask is empty)."""
    n = int(mask.sum())
    out = torch.zeros(num_latents)
    if n:
        out.index_add_(0, seq.idx[mask].flatten(), seq.acts[mask].flatten().float())
    return out / max(n, 1)


def _tokenize(tok: Any, item: Any, max_tokens: int | None) -> tuple[str, list[int], list[bool], list[bool]]:
    """(text, ids, post mask, answer mask) of a plain text or a ``(prompt, answer)`` chat turn."""
    if isinstance(item, str):
        prefix, content, answer = item, None, None
    else:
        content, answer = item
        prefix = format_chat(tok, content)
    post: list[bool]
    try:
        enc = tok(prefix, add_special_tokens=False, return_offsets_mapping=True)
        offs = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        enc, offs = tok(prefix, add_special_tokens=False), None
    ids = list(enc["input_ids"])
    post = [False] * len(ids)
    end = prefix.rfind(content) if content else -1
    if end >= 0:
        end += len(content)
        if offs is not None:
            post = [int(o[0]) >= end for o in offs]
        else:
            n = len(tok(prefix[:end], add_special_tokens=False)["input_ids"])
            post = [i >= n for i in range(len(ids))]
    ans = list(tok(answer, add_special_tokens=False)["input_ids"]) if answer else []
    ids, post, is_ans = ids + ans, post + [False] * len(ans), [False] * len(ids) + [True] * len(ans)
    if max_tokens is not None:
        ids, post, is_ans = ids[:max_tokens], post[:max_tokens], is_ans[:max_tokens]
    return prefix + (answer or ""), ids, post, is_ans


@torch.inference_mode()
def encode_sequences(
    model: Any, tok: Any, sae: Any, layer: int, items: Sequence[Any], batch_size: int = 8,
    include_special: bool = False, max_tokens: int | None = None, max_norm_ratio: float | None = 10.0,
) -> list[SeqLatents]:
    """Run the model to ``layer`` on each item and encode every valid token with the SAE.

    An item is a plain text (encoded as is) or ``(prompt, answer)``: the prompt chat-formatted with the tokenizer's
    template, the answer appended as the assistant's tokens. ``include_special`` also encodes special tokens at
    post-instruction positions. Tokens whose residual norm exceeds ``max_norm_ratio`` × the sequence's median are
    not encoded either: massive-activation tokens (e.g. the first system-prompt word of Qwen's template) give the SAE
    out-of-distribution inputs and absurd latent values that would swamp every max and mean.
    """
    ensure(len(items) > 0, "no texts to encode")
    special = special_token_ids(tok)
    toks = [_tokenize(tok, it, max_tokens) for it in items]
    for text, ids, _, _ in toks:
        ensure(len(ids) > 0, f"text {text[:40]!r} has no tokens")
    dev = next(model.parameters()).device
    sdt = sae.W_dec.dtype
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[SeqLatents | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(toks[i][1]))
    for b0 in range(0, len(order), batch_size):
        rows = order[b0 : b0 + batch_size]
        T = max(len(toks[i][1]) for i in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(toks[i][1])
            ids[r, T - n :] = torch.tensor(toks[i][1])
            mask[r, T - n :] = 1
        h = run_to_layer(model, ids.to(dev), mask.to(dev), layer)
        for r, i in enumerate(rows):
            text, tid, post_l, ans_l = toks[i]
            n = len(tid)
            post = torch.tensor(post_l)
            spec = torch.tensor([t in special for t in tid])
            valid = (~spec | post) if include_special else ~spec
            valid[0] = False
            if max_norm_ratio is not None and bool(valid.any()):
                norms = h[r, T - n :].float().norm(dim=-1).cpu()
                valid &= norms <= max_norm_ratio * norms[valid].median()
            a = j = None
            if bool(valid.any()):
                x = h[r, T - n :][valid.to(h.device)].to(device=sae.W_dec.device, dtype=sdt)
                ensure(bool(torch.isfinite(x).all()), "the model produced non-finite activations")
                a, j = sae.encode(x)  # width k (Top-k) or the most active latents of a row (ReLU / JumpReLU)
            width = a.shape[-1] if a is not None else max(1, int(getattr(sae, "k", 0) or 0))
            acts = torch.zeros(n, width)
            idx = torch.zeros(n, width, dtype=torch.long)
            if a is not None:
                acts[valid], idx[valid] = a.float().cpu(), j.long().cpu()
            hp = h[r, T - n :][(post & valid).to(h.device)]
            resid = hp.float().mean(0).cpu() if hp.shape[0] else None
            out[i] = SeqLatents(text, tid, acts, idx, valid, post & valid, torch.tensor(ans_l) & valid, resid)
    return [s for s in out if s is not None]
