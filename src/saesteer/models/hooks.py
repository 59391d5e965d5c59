"""The hooks saesteer installed on a model, and what the decoder may ask of them.

Steering (:func:`saesteer.steering.steer`) and conditional policies (:mod:`saesteer.gating`) register each set of
forward hooks they install here, with an *owner* object. The decoder (:mod:`saesteer.generation`) then, without
knowing either of them:

- keeps per-row state aligned when finished rows leave the batch (:func:`select_rows` → ``owner.select_rows``);
- tells position-aware owners where a prompt fed in several forwards ends (:func:`set_prompt_len`);
- prefills a shared prompt prefix once only when every hook on the model is registered here and its owner says that
  is exact (:func:`prefix_shareable` → ``owner.prefix_safe()``);
- tells owners which rows a prefill is for, whatever split of forwards computes it (:func:`prefilling` →
  ``owner.begin_prefill(prompts)`` / ``owner.end_prefill()``: an unconditional policy logs its rows there).

An owner implements any of ``select_rows(index)``, ``set_prompt_len(n)``, ``prefix_safe() -> bool`` and
``begin_prefill`` / ``end_prefill`` (absent: no per-row state / not position-aware / not safe / not interested). Hooks installed by other code are counted by
:func:`unregistered_hooks` — torch has no public listing of a module's hooks, so that one function reads its hook
dictionaries — and they turn prefix sharing off.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


@dataclass(eq=False)
class HookSet:
    """One registration: the owner, the torch handles it installed and the objects :func:`active` lists."""

    owner: Any
    handles: list[Any] = field(default_factory=list)
    members: list[Any] = field(default_factory=list)
    fns: list[Callable[..., Any]] = field(default_factory=list)


_LIVE: weakref.WeakKeyDictionary[nn.Module, list[HookSet]] = weakref.WeakKeyDictionary()


def register_forward_hook(module: nn.Module, fn: Callable[..., Any], hs: HookSet, **kw: Any) -> None:
    """``module.register_forward_hook(fn, **kw)``, recorded in ``hs``."""
    hs.handles.append(module.register_forward_hook(fn, **kw))
    hs.fns.append(fn)


def register_forward_pre_hook(module: nn.Module, fn: Callable[..., Any], hs: HookSet, **kw: Any) -> None:
    """``module.register_forward_pre_hook(fn, **kw)``, recorded in ``hs``."""
    hs.handles.append(module.register_forward_pre_hook(fn, **kw))
    hs.fns.append(fn)


def install(model: nn.Module, owner: Any, members: Sequence[Any] = ()) -> HookSet:
    """Register a new (still empty) hook set of ``owner`` on ``model``; add hooks with :func:`register_forward_hook`."""
    hs = HookSet(owner=owner, members=list(members))
    _LIVE.setdefault(model, []).append(hs)
    return hs


def uninstall(model: nn.Module, hs: HookSet) -> None:
    """Remove every hook of ``hs`` and forget it (idempotent)."""
    for h in hs.handles:
        h.remove()
    hs.handles.clear()
    live = _LIVE.get(model)
    if live is not None:
        live[:] = [x for x in live if x is not hs]
        if not live:
            del _LIVE[model]


def hook_sets(model: nn.Module) -> list[HookSet]:
    return list(_LIVE.get(model, ()))


def active(model: nn.Module) -> list[Any]:
    """The members of every live hook set on ``model``, in installation order (nested blocks stack)."""
    return [m for hs in hook_sets(model) for m in hs.members]


def select_rows(model: nn.Module, index: torch.Tensor) -> None:
    """Keep only rows ``index`` (into the current batch) of every owner's per-row state; no-op when none."""
    for hs in hook_sets(model):
        fn = getattr(hs.owner, "select_rows", None)
        if fn is not None:
            fn(index)


def set_prompt_len(model: nn.Module, n: int) -> None:
    """Positions ``< n`` are prompt, whatever split of forwards filled the KV cache."""
    for hs in hook_sets(model):
        fn = getattr(hs.owner, "set_prompt_len", None)
        if fn is not None:
            fn(int(n))


@contextlib.contextmanager
def prefilling(model: nn.Module, prompts: Sequence[Sequence[int]]) -> Iterator[None]:
    """The decoder prefills ``prompts`` (each row's real token ids, in batch order) inside this block, in one forward
    or several (a shared prefix, length groups): owners with ``begin_prefill(prompts)`` hear of it first, and of its
    end through ``end_prefill()``."""
    owners = [hs.owner for hs in hook_sets(model)]
    begun = []
    try:
        for o in owners:
            fn = getattr(o, "begin_prefill", None)
            if fn is not None:
                fn(prompts)
                begun.append(o)
        yield
    finally:
        for o in begun:
            o.end_prefill()


def system_prefix(model: nn.Module) -> str | None:
    """The system text the installed owners ask chat prompts to start with (``owner.system_prefix``; several nested
    owners: joined in installation order, blank-line separated); None when none asks."""
    parts = [p for hs in hook_sets(model) if (p := getattr(hs.owner, "system_prefix", None))]
    return "\n\n".join(dict.fromkeys(parts)) or None


READ_ONLY_HOOK_MODULES = ("transformers.utils.output_capturing",)
"""Modules whose forward hooks only read outputs: transformers installs its output-capturing hooks on the first
``output_hidden_states`` / ``output_attentions`` call and keeps them; they return None (never change an output), so
they do not count against prefix sharing."""


def unregistered_hooks(model: nn.Module) -> int:
    """Forward (pre-)hooks on ``model``'s modules, or global ones, that no registered hook set installed (read-only
    hooks of :data:`READ_ONLY_HOOK_MODULES` not counted)."""
    from torch.nn.modules import module as nn_module

    known = {id(f) for hs in hook_sets(model) for f in hs.fns}
    fns: list[Any] = []
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks"):
        fns += list(getattr(nn_module, name, {}).values())
    for mod in model.modules():
        fns += list(getattr(mod, "_forward_hooks", {}).values()) + list(getattr(mod, "_forward_pre_hooks", {}).values())
    return sum(id(f) not in known and getattr(f, "__module__", None) not in READ_ONLY_HOOK_MODULES for f in fns)


def prefix_shareable(model: nn.Module) -> bool:
    """True when prefilling a common prompt prefix once (and the rest per row) gives the same hidden states: every
    hook is registered here and every owner declares itself position-wise (``prefix_safe()``)."""
    for hs in hook_sets(model):
        fn = getattr(hs.owner, "prefix_safe", None)
        if fn is None or not fn():
            return False
    return unregistered_hooks(model) == 0
