"""The decoder layers of any supported architecture: where the residual stream after layer L is read and written."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from saesteer.core import SaesteerError, ensure

_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def model_body(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``model.model`` for most architectures): where a forward starts."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return body if isinstance(body, nn.Module) else model


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama, Qwen2, Mistral, Gemma, Phi-3, GPT-2, NeoX, OPT style)."""
    for path in _LAYER_PATHS:
        obj: Any = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise SaesteerError(f"cannot find the decoder layers of {type(model).__name__} (tried {', '.join(_LAYER_PATHS)})")


def n_layers(model: nn.Module) -> int:
    return len(get_layers(model))


def d_model(model: nn.Module) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", cfg)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise SaesteerError(f"cannot tell the residual width of {type(model).__name__}")


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate a layer index (negative counts from the end) and return it as non-negative."""
    n = n_layers(model)
    if not -n <= layer < n:
        raise SaesteerError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")
    return layer % n


def hook_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is the residual stream after decoder layer ``layer``."""
    return get_layers(model)[check_layer(model, layer)]


def hook_name(layer: int) -> str:
    """SAELens/HF-style hook name of the residual stream after ``layer`` (``model.layers.L``)."""
    return f"model.layers.{layer}"


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states from a decoder layer's output (a tensor in transformers 5, a tuple before)."""
    return out[0] if isinstance(out, tuple) else out


def replace_layer_output(out: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


class _StopForward(Exception):
    pass


@torch.inference_mode()
def run_to_layer(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int
) -> torch.Tensor:
    """Residual stream after ``layer``; the forward stops there (later layers and the LM head never run)."""
    return run_to_layers(model, input_ids, attention_mask, [layer])[layer]


@torch.inference_mode()
def run_to_layers(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Residual stream after each of ``layers`` (``{layer: [batch, seq, d]}``) from one forward that stops after the
    deepest of them."""
    ensure(len(layers) > 0, "run_to_layers needs at least one layer")
    captured: dict[int, torch.Tensor] = {}
    last = max(layers)

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            captured[layer] = layer_output(out)
            if layer == last:
                raise _StopForward
        return hook

    handles = [hook_module(model, layer).register_forward_hook(make_hook(layer)) for layer in sorted(set(layers))]
    try:
        body = getattr(model, model.base_model_prefix, model)
        body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured
