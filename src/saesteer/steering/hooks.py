"""Installing interventions on a model: :func:`steer` registers their forward hooks (through
:mod:`saesteer.models.hooks`, so decoding keeps per-row state aligned and knows when a shared prompt prefix is exact)
and removes them on exit; the position tracker tells prompt from generated positions."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from saesteer import models
from saesteer.core import ensure
from saesteer.models import hooks as model_hooks

from .interventions import POSITIONS, AblateDirection, Intervention


class PositionTracker:
    """Reads the KV-cache length at each forward of the model body, to tell prompt from generated positions.

    A caller that feeds one prompt in several forwards (``saesteer.generation.decode.kvprefill``: a shared prefix, then the rest)
    tells it where the prompt ends with :meth:`set_prompt_len`."""

    def __init__(self) -> None:
        self.past = 0
        self.seq = 0
        self.prompt_len: int | None = None

    def pre_hook(self, _mod: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        self.seq = int(x.shape[1]) if x is not None and x.ndim >= 2 else 0
        cache = kwargs.get("past_key_values")
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        self.past = past
        if past == 0:
            self.prompt_len = self.seq
        elif self.prompt_len is None:
            self.prompt_len = past

    def set_prompt_len(self, n: int) -> None:
        """Positions ``< n`` are prompt, whatever split the forwards that fill the cache use."""
        self.prompt_len = int(n)

    def mask(self, positions: str, seq: int) -> torch.Tensor | None:
        """``[seq]`` bool on the CPU (no device sync to test it), or None for every position."""
        if positions == "all":
            return None
        pos = torch.arange(self.past, self.past + seq)
        prompt_len = self.prompt_len if self.prompt_len is not None else seq
        return pos < prompt_len if positions == "prompt" else pos >= prompt_len


@contextlib.contextmanager
def steer(model: nn.Module, interventions: Sequence[Intervention] | Intervention, positions: str = "all") -> Iterator[list]:
    """Install ``interventions`` as forward hooks for the duration of the ``with`` block; yields them.

    Interventions at the same layer apply in list order. Hooks are removed on exit, also on exceptions;
    :func:`active_interventions` lists every live intervention (nested ``steer`` blocks stack).
    """
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    ivs = list(interventions)
    ensure(positions in POSITIONS, f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    for iv in ivs:
        ensure(isinstance(iv, Intervention), f"not an intervention: {type(iv).__name__}")
        p = iv.positions or positions
        ensure(p in POSITIONS, f"positions must be one of {', '.join(POSITIONS)}, got {p!r}")
        iv.prepare(model)
    tracker = PositionTracker()
    by_layer: dict[int, list[Intervention]] = {}
    embed_ivs: list[Intervention] = []
    for iv in ivs:
        for L in iv.layers(model):
            by_layer.setdefault(L, []).append(iv)
        if isinstance(iv, AblateDirection) and iv.layer is None:
            embed_ivs.append(iv)

    def make_hook(group: list[Intervention]):
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
            h = models.layer_output(out)
            squeeze = h.ndim == 2
            x = h.unsqueeze(0) if squeeze else h
            for iv in group:
                x = iv.apply(x, tracker.mask(iv.positions or positions, x.shape[1]))
            x = x.squeeze(0) if squeeze else x
            return models.replace_layer_output(out, x)

        return hook

    session = _Session(tracker, ivs)
    hs = model_hooks.install(model, session, members=ivs)
    try:
        model_hooks.register_forward_pre_hook(models.model_body(model), tracker.pre_hook, hs, with_kwargs=True)
        for L, group in sorted(by_layer.items()):
            model_hooks.register_forward_hook(models.hook_module(model, L), make_hook(group), hs)
        if embed_ivs:
            model_hooks.register_forward_hook(model.get_input_embeddings(), make_hook(embed_ivs), hs)
        yield ivs
    finally:
        model_hooks.uninstall(model, hs)


class _Session:
    """The owner of one :func:`steer` block's hooks, as :mod:`saesteer.models.hooks` sees it."""

    def __init__(self, tracker: PositionTracker, ivs: list[Intervention]) -> None:
        self.tracker, self.ivs = tracker, ivs

    def select_rows(self, index: torch.Tensor) -> None:
        for iv in self.ivs:
            iv.select_rows(index)

    def set_prompt_len(self, n: int) -> None:
        self.tracker.set_prompt_len(n)

    def prefix_safe(self) -> bool:
        """Position-wise edits are exact under a shared-prefix prefill unless a row scale differs per row."""
        return all(iv.row_scale is None for iv in self.ivs)


def active_interventions(model: nn.Module) -> list[Intervention]:
    """Every live intervention on ``model`` (from every :func:`steer` block and policy), in installation order."""
    return [m for m in model_hooks.active(model) if isinstance(m, Intervention)]


def select_rows(model: nn.Module, index: torch.Tensor) -> None:
    """Keep only rows ``index`` of every live hook owner's per-row state (no-op when nothing is installed)."""
    model_hooks.select_rows(model, index)


def set_row_scale(model: nn.Module, scale: torch.Tensor | Sequence[float] | None) -> None:
    """Set the same per-row scale on every live intervention."""
    for iv in active_interventions(model):
        iv.set_row_scale(scale)
