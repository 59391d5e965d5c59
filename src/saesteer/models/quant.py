"""Weight-only int8 linears: the interactive single-stream path on CPUs (``load_model(..., quantize="int8")``).

A decode step of one sequence is bound by reading the weights (the default model's bf16 linears and LM head are
~1 GB per token); storing them as int8 with one fp scale per output row halves that. On CPU with bf16 activations
the product runs in torch's packed int8 kernel (``torch._weight_int8pack_mm``, the kernel behind gpt-fast's and
torchao's weight-only int8), elsewhere as ``linear(x, W_int8.to(x.dtype)) * scale``. Only ``nn.Linear`` modules are
replaced (attention / MLP projections and the LM head); embeddings, norms and the residual stream — where SAEs read
and steering writes — keep the model's dtype. Batched decoding is faster without it (bf16 GEMMs at 8+ rows beat the
int8 kernel: ``benchmarks/generation.py``), and it changes a few greedy tokens: the same benchmark measures how many
refusal verdicts stay the same.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from saesteer.core import ensure

QUANTIZE_MODES = ("none", "int8")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``w ≈ q * scale[:, None]`` with ``q`` in [-127, 127]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (one scale per output feature) and the original bias."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        dtype = linear.weight.dtype
        self.register_buffer("weight_int8", q.to(linear.weight.device))
        self.register_buffer("scale", scale.to(device=linear.weight.device, dtype=dtype))
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer computes with, as a dense matrix (tests, inspection)."""
        dtype = dtype or self.scale.dtype
        return self.weight_int8.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu" and x2.dtype == torch.bfloat16:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale.to(x2.dtype))
        else:
            y = F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scale.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_model(model: nn.Module, mode: str = "int8") -> int:
    """Replace every ``nn.Linear`` of ``model`` by :class:`Int8Linear` (``mode="int8"``); returns how many.

    ``mode="none"`` leaves the model as it is. The model records ``saesteer_quantize`` (shown by the CLI and the
    server's model card)."""
    ensure(mode in QUANTIZE_MODES, f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return 0
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(lin))
    model.saesteer_quantize = mode
    return len(targets)
