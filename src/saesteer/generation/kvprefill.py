"""Prefill of one generation batch, with the rows' common token prefix computed once (used by ``generation``).

Chat prompts of one model share a long token prefix: the template's opening tokens and the system prompt (24 of
the ~40 tokens of a typical Qwen2.5 chat prompt), or a few-shot header for raw capability prompts. Prefilling that
prefix once (batch 1) and repeating its KV cache over the rows removes most of the prefill work of a batch; the
rest of each prompt is then prefilled on top of it, left-padded *after* the shared part::

    cache slots:  [ shared prefix (P) | padding | row's own tokens ]      attention mask 1 | 0 | 1
    position ids:   0 .. P-1                      P .. len(prompt)-1     (as without sharing)

Where the rest of the prompts differ much in length, it is prefilled in groups of similar length
(:func:`length_groups`), each padded only to its own longest row, and the groups' caches are joined. Every row
sees the same tokens at the same positions as a plain left-padded prefill, so greedy outputs equal
``model.generate`` (up to float rounding of different matmul shapes, as any change of batch or padding).

Sharing and grouping are used only where it cannot change what hooks see (:func:`saesteer.models.hooks.prefix_shareable`):
every forward hook on the model was registered in :mod:`saesteer.models.hooks` by an owner that declares itself
position-wise (steering without per-row scales, an unconditional policy, which logs its rows from the prompt ids it is
told of, :func:`saesteer.models.hooks.prefilling`; a policy gate reads each row's whole prompt and is not). The owners are
told the full prompt length (:func:`~saesteer.models.hooks.set_prompt_len`), so ``positions="prompt"`` and
``"generated"`` edit the same positions as with one prefill.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from saesteer.models import hooks as model_hooks

MIN_SHARED = 4
"""Shortest common prefix (tokens) worth a separate forward."""
GROUP_OVERHEAD = 64
"""Cost of one more prefill forward, in padded tokens (weights streamed again, smaller matmuls)."""


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the rows' longest common token prefix, leaving every row at least one token of its own."""
    if len(prompts) < 2:
        return 0
    n = len(os.path.commonprefix([list(p) for p in prompts]))
    return min(n, min(map(len, prompts)) - 1)


def _plain_dynamic(cache: Any) -> bool:
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def length_groups(lengths: Sequence[int], overhead: int | None = None) -> list[list[int]]:
    """Row indices split into groups of similar length, minimising padded tokens + ``overhead`` per group
    (default :data:`GROUP_OVERHEAD`)."""
    overhead = GROUP_OVERHEAD if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    L = [lengths[i] for i in order]
    best, cut = [0] + [float("inf")] * len(L), [0] * (len(L) + 1)
    for j in range(1, len(L) + 1):
        for i in range(j):
            c = best[i] + (j - i) * L[i] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], len(L)
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _layers_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_from(model: torch.nn.Module, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def prefill(
    forward: Callable[..., Any], model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad: int,
    device: torch.device, share: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, dict]:
    """Prefill the rows; returns ``(last_logits [B, V], attention_mask, last_position [B, 1], cache, info)``.

    ``info``: ``shared`` (prefix tokens computed once) and ``groups`` (forwards of the rest of the prompts).
    """
    with model_hooks.prefilling(model, prompts):  # owners hear of the rows first (an unconditional policy logs them)
        return _prefill(forward, model, prompts, pad, device, share)


def _prefill(forward: Callable[..., Any], model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad: int,
             device: torch.device, share: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, dict]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    sharing = share and _plain_dynamic(cache) and model_hooks.prefix_shareable(model)
    P = shared_prefix_len(prompts) if sharing else 0
    P = P if P >= MIN_SHARED else 0
    B, width = len(prompts), max(len(p) for p in prompts) - P
    total = P + width
    ids = torch.full((B, total), pad, dtype=torch.long)
    mask = torch.zeros((B, total), dtype=torch.long)
    ids[:, :P] = torch.tensor(list(prompts[0][:P]), dtype=torch.long)
    mask[:, :P] = 1
    for i, p in enumerate(prompts):
        ids[i, total - (len(p) - P):] = torch.tensor(p[P:])
        mask[i, total - (len(p) - P):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as transformers' generate
    kw = dict(use_cache=True, logits_to_keep=1)
    if P:
        forward(input_ids=ids[:1, :P], attention_mask=mask[:1, :P], position_ids=pos[:1, :P], past_key_values=cache, **kw)
    if sharing:
        model_hooks.set_prompt_len(model, total)  # every position up to ``total`` is prompt, whatever the split
    groups = length_groups([len(p) - P for p in prompts]) if sharing else [list(range(B))]
    info = {"shared": P, "groups": len(groups)}
    if len(groups) == 1:
        cache.batch_repeat_interleave(B)
        out = forward(input_ids=ids[:, P:], attention_mask=mask, position_ids=pos[:, P:], past_key_values=cache, **kw)
        return out.logits[:, -1, :], mask, pos[:, -1:], cache, info
    prefix = _layers_kv(cache) if P else None
    logits = None
    merged = []
    for g in groups:  # each group is padded to its own longest row only
        w = max(len(prompts[i]) - P for i in g)
        idx = torch.tensor(g, device=device)
        sub = _cache_from(model, [(k.expand(len(g), -1, -1, -1).contiguous(), v.expand(len(g), -1, -1, -1).contiguous())
                                  for k, v in prefix]) if P else DynamicCache(config=model.config)
        gmask = torch.cat([mask[idx, :P], mask[idx, total - w:]], dim=1)
        out = forward(input_ids=ids[idx, total - w:], attention_mask=gmask, position_ids=pos[idx, total - w:],
                      past_key_values=sub, **kw)
        lg = out.logits[:, -1, :]
        if logits is None:
            logits = lg.new_empty((B, lg.shape[-1]))
        logits[idx] = lg
        merged.append((idx, w, _layers_kv(sub)))
    kv = []
    for layer in range(len(merged[0][2])):
        k0 = merged[0][2][layer][0]
        K = k0.new_zeros((B, k0.shape[1], total, k0.shape[3]))
        V = K.clone()
        for idx, w, lkv in merged:
            K[idx, :, total - w:] = lkv[layer][0][:, :, P:]
            V[idx, :, total - w:] = lkv[layer][1][:, :, P:]
            if P:
                K[idx, :, :P] = lkv[layer][0][:, :, :P]
                V[idx, :, :P] = lkv[layer][1][:, :, :P]
        kv.append((K, V))
    return logits, mask, pos[:, -1:], _cache_from(model, kv), info
