"""bf16 linears reordered once into oneDNN's blocked weight layout: the same products as ``F.linear``, faster.

``F.linear`` on bf16 CPU tensors hands oneDNN a plain row-major weight on every call, and oneDNN reorders it into
its blocked layout each time; for the one-row products of a decode step that reorder is most of the cost. Reordering
once, ahead of time — the path inductor's CPU weight prepacking takes (``torch.ops.mkldnn._reorder_linear_weight`` /
``_linear_pointwise``) — gives the same numbers (bit-identical in ``tests/test_packed.py``; the default model's
prompt logits differ from unpacked bf16's by 0.0) at twice the single-stream speed (``benchmarks/generation.py``:
24.1 vs 12.4 tok/s steered batch-1 decode of the default model, 206 vs 172 tok/s at 64 rows). The ``-decode`` modes of
:mod:`.quant` keep their dense weights packed, and ``--quantize packed`` packs every linear without quantizing any
(its LM head is :mod:`.quant`'s rescored head: for steps of <= 4 rows, int4 logits outside the 32 exact candidates).

:class:`PackedLinear` holds the reordered weight (an opaque mkldnn tensor: a packed model cannot be moved, cast or
saved; pack after loading, as ``load_model(quantize="packed")`` does). CPU and bfloat16 only
(:func:`packing_supported` checks the running torch once).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from saesteer.core import ensure


@functools.cache
def packing_supported() -> bool:
    """Whether this torch build packs bf16 linear weights for oneDNN on this CPU and computes ``F.linear``'s numbers
    with them (checked once on a small layer)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        w = torch.randn(24, 64, generator=g).bfloat16()
        b = torch.randn(24, generator=g).bfloat16()
        x = torch.randn(3, 64, generator=g).bfloat16()
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), b, "none", [], "")
        return bool(torch.allclose(y.float(), F.linear(x, w, b).float(), atol=1e-2, rtol=1e-2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def can_pack(weight: torch.Tensor) -> bool:
    """Whether a linear layer with this weight can become a :class:`PackedLinear` here (bf16, CPU, supported)."""
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and packing_supported()


class PackedLinear(nn.Module):
    """``nn.Linear`` (bf16, CPU) whose weight is reordered once into oneDNN's blocked layout; same outputs."""

    def __init__(self, linear: nn.Linear, rows_hint: int = 1) -> None:
        super().__init__()
        w = linear.weight.detach()
        ensure(w.dtype == torch.bfloat16 and w.device.type == "cpu",
               f"packed linears need bfloat16 weights on CPU, got {w.dtype} on {w.device.type} (use --dtype bfloat16)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # the layout oneDNN picks for products of about ``rows_hint`` rows (1: decode steps; others are still exact)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, rows_hint), persistent=False)
        self.register_buffer("bias", linear.bias.detach().to(w.dtype) if linear.bias is not None else None,
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               "bf16 packed for oneDNN"
