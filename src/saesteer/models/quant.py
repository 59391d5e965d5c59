"""Weight-only quantized linears: the interactive single-stream path on CPUs (``load_model(..., quantize=...)``).

A decode step of one sequence is bound by reading the weights (the default model's bf16 linears and LM head are
~1 GB per token). Modes:

* ``int8``: every ``nn.Linear`` stores int8 weights with one scale per output row (symmetric). On CPU with bf16
  activations the product runs in torch's packed int8 kernel (``torch._weight_int8pack_mm``, the kernel behind
  gpt-fast's and torchao's weight-only int8), elsewhere as ``linear(x, W_int8.to(x.dtype)) * scale``.
* ``int4``: the projections inside the decoder layers store 4-bit weights in groups of 64 input features (asymmetric:
  a scale and a zero point per group, as gpt-fast / torchao ``int4_weight_only``), run on CPU by torch's packed int4
  kernel (``torch._weight_int4pack_mm_for_cpu``), elsewhere dequantized per call; the LM head — whose errors move the
  argmax directly — stays int8.

* ``packed`` (bf16 on CPU): no quantized projection — every linear keeps its bf16 weight, reordered once into
  oneDNN's blocked layout (:mod:`.packed`), which computes the same numbers as ``F.linear`` faster; with fused q/k/v
  and gate/up and, for steps of <= :data:`DECODE_ROWS` rows, the rescored LM head below.

* ``int8-decode`` / ``int4-decode``: the same quantized weights, used only where they pay — inputs of at most
  :data:`DECODE_ROWS` rows (the decode steps of one or a few conversations) — while the model's own bf16 / fp32
  weights, kept beside them (bf16 on CPU: reordered for oneDNN as in ``packed``, the same numbers, faster), serve
  prefill and batched decoding. Prompts are read exactly as without quantization (most of what decides a refusal
  verdict), and the quantized copies cost half (int8) or a quarter (int4) of the linears' bf16 memory again. ``auto`` (the default of ``chat`` and ``serve``) is :data:`AUTO_QUANTIZE` on CPUs
  running bf16 and ``none`` elsewhere (:func:`resolve_quantize`); ``benchmarks/generation.py`` and
  ``benchmarks/quant_capability.py`` measure speed, refusal verdicts and HumanEval for each mode.

Except in plain ``int4`` mode, an LM head whose dense weight is kept anyway (tied to the input embedding, or a
``-decode`` or ``packed`` mode) becomes a :class:`RescoredHead`: int4 logits over the vocabulary find the top :data:`RESCORE_TOP`
candidates, whose logits are then recomputed exactly from the dense weight — greedy decoding picks the same token as
the dense head unless the dense argmax falls outside the int4 top 32, at half the int8 head's bytes (the head is a
quarter of a 0.5B model's weights). Sampling and logprobs see int4 logits outside those candidates.

Except in plain ``int4`` mode, the projections that read the same input run as one matmul (q / k / v, and the MLP's
gate / up, :class:`FusedLinears`): per-row scales (int8) and per-row groups (int4) make the fused weights the very
same numbers, and a one-row step makes 4 quantized calls per layer instead of 7.

Only ``nn.Linear`` modules are replaced; embeddings, norms and the residual stream — where SAEs read and steering
writes — keep the model's dtype. Quantize after the model is on its device (``load_model`` does). Batched decoding is
faster without it (bf16 GEMMs at 8+ rows beat these kernels), and it changes some greedy tokens:
``benchmarks/generation.py`` measures the speed and how many refusal verdicts stay the same as float32's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from saesteer.core import ensure

from .packed import PackedLinear, can_pack, packing_supported

QUANTIZE_MODES = ("none", "packed", "int8", "int4", "int8-decode", "int4-decode")
QUANTIZE_CHOICES = ("auto", *QUANTIZE_MODES)
INT4_GROUP = 64
DECODE_ROWS = 4
"""The ``-decode`` modes use their quantized weights for inputs of at most this many rows (decode steps of <= 4
sequences; ``benchmarks/int8_rows.py``: int8 steps are faster than bf16 up to 4-6 rows here)."""
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling projections that read the same input and are fused in the int8 modes (Llama, Qwen2, Gemma, Mistral ...;
Phi-3's ``qkv_proj`` / ``gate_up_proj`` are fused already)."""


AUTO_QUANTIZE = "int8-decode"
"""What ``--quantize auto`` means on a CPU running bf16."""


def resolve_quantize(mode: str | None, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> str:
    """``auto`` -> :data:`AUTO_QUANTIZE` on CPU in bfloat16 (torch's packed kernels take bf16 activations), else
    ``none``; any other mode is returned as is (checked)."""
    mode = mode or "none"
    ensure(mode in QUANTIZE_CHOICES, f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {mode!r}")
    if mode != "auto":
        return mode
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return AUTO_QUANTIZE if torch.device(device).type == "cpu" and dtype == torch.bfloat16 else "none"


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``w ≈ q * scale[:, None]`` with ``q`` in [-127, 127]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` computing ``cat([l(x) for l in linears], -1)`` (same input width; a missing bias is zeros)."""
    ref = linears[0]
    ensure(all(lin.in_features == ref.in_features for lin in linears), "fused linears must share their input")
    big = nn.Linear(ref.in_features, sum(lin.out_features for lin in linears),
                    bias=any(lin.bias is not None for lin in linears), device="meta")
    big.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), requires_grad=False)
    if big.bias is not None:
        big.bias = nn.Parameter(torch.cat([lin.bias.detach() if lin.bias is not None else
                                           lin.weight.new_zeros(lin.out_features) for lin in linears]),
                                requires_grad=False)
    return big


def _dense_linear(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2 @ w.T + bias`` for a 2-D input. Always 2-D: ``F.linear`` on a non-contiguous 3-D input (the LM head's
    ``hidden[:, -1:]``) with a weight that is not a Parameter takes ``bmm`` over a materialised ``[B, in, out]`` copy
    of the weight — 20 s instead of 0.05 s for a 64-row prefill's LM head here."""
    return F.linear(x2, w.to(x2.dtype), None if bias is None else bias.to(x2.dtype))


class _QuantLinear(nn.Module):
    """What the quantized linears share: the original bias, the ``max_rows`` switch to the kept dense weight (the
    ``-decode`` modes; ``None``: quantized for every input, dense weight dropped), and the reshape around the
    subclass's 2-D quantized product :meth:`_matmul`."""

    def __init__(self, linear: nn.Linear, max_rows: int | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.max_rows = linear.in_features, linear.out_features, max_rows
        self.register_buffer("bias", linear.bias.detach() if linear.bias is not None else None)
        # the kept weight of the -decode modes: reordered for oneDNN where it can be (bf16 on CPU: the same numbers,
        # faster prompts and batches; :mod:`.packed`), else as it is
        pack = max_rows is not None and can_pack(linear.weight)
        self.dense_packed = PackedLinear(linear) if pack else None
        self.register_buffer("dense", linear.weight.detach() if max_rows is not None and not pack else None,
                             persistent=False)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.max_rows is not None and x2.shape[0] > self.max_rows:
            y = self.dense_packed(x2) if self.dense_packed is not None else _dense_linear(x2, self.dense, self.bias)
        else:
            y = self._matmul(x2)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _repr(self, kind: str) -> str:
        rows = f" (rows <= {self.max_rows}; dense above)" if self.max_rows is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind}{rows}")


class Int8Linear(_QuantLinear):
    """``nn.Linear`` with int8 weights (one scale per output feature) and the original bias.

    ``max_rows``: use the int8 weights only for inputs of at most this many rows and the original (dense) weight,
    kept, for larger ones (``int8-decode``); ``None``: int8 for everything and the dense weight is dropped."""

    def __init__(self, linear: nn.Linear, max_rows: int | None = None) -> None:
        super().__init__(linear, max_rows)
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", q.to(linear.weight.device))
        self.register_buffer("scale", scale.to(device=linear.weight.device, dtype=linear.weight.dtype))

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer computes with, as a dense matrix (tests, inspection)."""
        dtype = dtype or self.scale.dtype
        return self.weight_int8.to(dtype) * self.scale.to(dtype)[:, None]

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device.type == "cpu" and x2.dtype == torch.bfloat16:
            return torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale.to(x2.dtype))
        return F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scale.to(x2.dtype)

    def extra_repr(self) -> str:
        return self._repr("int8")


class FusedLinears(nn.Module):
    """One layer standing in for sibling linears that read the same input (q / k / v; gate / up): the first of them
    to be called on an input computes every output at once, the others take theirs from it. Each original attribute
    holds a :class:`FusedPart`; a part called on any other input computes the fused product afresh (always right)."""

    def __init__(self, layer: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.layer, self.sizes = layer, list(sizes)
        self._x: torch.Tensor | None = None
        self._outs: list[torch.Tensor | None] = []

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self._x is not x or self._outs[i] is None:
            # views of the fused output (no copies): the models split their last dim with .view, which a slice allows
            self._x, self._outs = x, list(self.layer(x).split(self.sizes, -1))
        out, self._outs[i] = self._outs[i], None
        if all(o is None for o in self._outs):
            self._x = None  # every part has taken its output: hold nothing between calls
        return out


class FusedPart(nn.Module):
    """Output ``index`` of a :class:`FusedLinears` (registered under the first part only)."""

    def __init__(self, group: FusedLinears, index: int) -> None:
        super().__init__()
        if index == 0:
            self.group = group
        else:
            object.__setattr__(self, "_group", group)  # one owner in the module tree: moved / listed once
        self.index = index
        self.in_features, self.out_features = group.layer.in_features, group.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group if self.index == 0 else self._group
        return group.output(self.index, x)

    def extra_repr(self) -> str:
        return f"part {self.index} of {self.in_features} -> {self.out_features} (fused)"


def quantize_groups(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups along the input dim: ``w ≈ (q - 8) * scale + zero`` per (row, group), ``q`` in 0..15.
    Returns ``q`` (int32 [out, in]), ``scale`` and ``zero`` ([out, in / group])."""
    n, k = w.shape
    ensure(k % group == 0, f"int4 groups of {group} need in_features divisible by {group}, got {k}")
    wg = w.detach().float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).reshape(n, k)
    return q, scale, lo + 8 * scale


class Int4Linear(_QuantLinear):
    """``nn.Linear`` with 4-bit group-quantized weights (:func:`quantize_groups`) and the original bias; ``max_rows``
    as :class:`Int8Linear`'s."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP, max_rows: int | None = None) -> None:
        super().__init__(linear, max_rows)
        self.group = group
        dev, dtype = linear.weight.device, linear.weight.dtype
        q, scale, zero = quantize_groups(linear.weight, group)
        self.packed = dev.type == "cpu"
        if self.packed:  # torch's CPU int4 layout: two nibbles per byte, [out, in / 2]
            self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        else:  # one value per byte; dequantized per call
            self.register_buffer("weight_int4", q.to(device=dev, dtype=torch.uint8))
        # [in / group, out, 2]: the layout of torch's int4 kernels
        self.register_buffer("scale_zero", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dev, dtype))

    def _dense(self, dtype: torch.dtype) -> torch.Tensor:
        q = self.weight_int4.to(dtype).reshape(self.out_features, -1, self.group)
        sz = self.scale_zero.to(dtype).transpose(0, 1)  # [out, groups, 2]
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(self.out_features, self.in_features)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer computes with, as a dense matrix (tests, inspection)."""
        dtype = dtype or self.scale_zero.dtype
        if not self.packed:
            return self._dense(dtype)
        eye = torch.eye(self.in_features, dtype=self.scale_zero.dtype, device=self.scale_zero.device)
        w = torch._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group, self.scale_zero)
        return w.t().to(dtype)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight_int4, self.group,
                                                     self.scale_zero.to(x2.dtype))
        return F.linear(x2, self._dense(x2.dtype))

    def extra_repr(self) -> str:
        return self._repr(f"int4 groups of {self.group}")


RESCORE_TOP = 32
"""Candidates of :class:`RescoredHead` whose logits are recomputed exactly."""


class RescoredHead(nn.Module):
    """LM head: int4 logits (:class:`Int4Linear`) over the vocabulary, then the exact logits (``x @ W[i]``, the dense
    weight kept — the tied embedding) of the top ``top`` candidates written over theirs. ``max_rows``: inputs of more
    rows get the dense product (``int8-decode``); ``None``: every input takes the rescored path."""

    def __init__(self, linear: nn.Linear, max_rows: int | None = None, top: int = RESCORE_TOP) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rows, self.top = max_rows, top
        self.int4 = Int4Linear(linear)
        self.register_buffer("dense", linear.weight.detach(), persistent=False)
        self.register_buffer("bias", linear.bias.detach() if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.max_rows is not None and x2.shape[0] > self.max_rows:
            return _dense_linear(x2, self.dense, self.bias).reshape(*lead, self.out_features)
        y = self.int4(x2)  # int4 bias included
        idx = y.topk(min(self.top, self.out_features), dim=-1).indices  # [rows, top]
        exact = torch.einsum("rd,rkd->rk", x2, self.dense[idx].to(x2.dtype))
        if bias is not None:
            exact = exact + bias[idx]
        return y.scatter(-1, idx, exact.to(y.dtype)).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        rows = f", rows <= {self.max_rows} (dense above)" if self.max_rows is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 + exact top {self.top}{rows}"


def _tied(model: nn.Module, head: nn.Module | None) -> bool:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return isinstance(head, nn.Linear) and emb is not None and head.weight is getattr(emb, "weight", None)


def _fuse_siblings(model: nn.Module, max_rows: int | None, int4_group: int | None = None, packed: bool = False) -> None:
    """Replace each group of :data:`FUSED` sibling ``nn.Linear`` s (same input width) by one fused int8 layer (int4
    with ``int4_group``, where the width allows; a bf16 :class:`.packed.PackedLinear` with ``packed``)."""
    for owner in list(model.modules()):
        for names in FUSED:
            lins = [getattr(owner, n, None) for n in names]
            if not all(isinstance(lin, nn.Linear) for lin in lins) or len({lin.in_features for lin in lins}) != 1:
                continue
            big = concat_linears(lins)
            four = int4_group is not None and big.in_features % int4_group == 0
            layer = (PackedLinear(big) if packed else Int4Linear(big, int4_group, max_rows) if four
                     else Int8Linear(big, max_rows))
            group = FusedLinears(layer, [lin.out_features for lin in lins])
            for i, n in enumerate(names):
                setattr(owner, n, FusedPart(group, i))


def quantize_model(model: nn.Module, mode: str = "int8", fuse: bool = True, rescore: bool = True,
                   int4_group: int = INT4_GROUP, int4_names: tuple[str, ...] | None = None) -> int:
    """Replace every ``nn.Linear`` of ``model`` by :class:`Int8Linear` (``mode="int8"``) or :class:`Int4Linear`
    (``"int4"``: the LM head and any layer whose input width is not a multiple of the group stay int8); the
    ``-decode`` modes use those weights only for inputs of at most :data:`DECODE_ROWS` rows and keep the original
    weights for the rest. ``"packed"`` (bf16 on CPU): every linear keeps its bf16 weight, reordered once for oneDNN
    (:class:`.packed.PackedLinear`, the same numbers), and the LM head is rescored as in the ``-decode`` modes.
    Returns how many linears were replaced.

    Except in plain ``int4`` mode: with ``fuse``, sibling projections (:data:`FUSED`) become one layer, and with
    ``rescore`` the LM head on CPU becomes a :class:`RescoredHead` where its dense weight is kept anyway (tied to the
    embedding, or a ``-decode`` mode). ``int4_group`` / ``int4_names``: the int4 group size, and (plain ``int4``) which
    projections by attribute name (e.g. ``("gate_proj", "up_proj")``; None = all) go int4 — the rest int8.

    ``mode="none"`` leaves the model as it is. The model records ``saesteer_quantize`` (shown by the CLI and the
    server's ``/health``)."""
    ensure(mode in QUANTIZE_MODES, f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return 0
    packed = mode == "packed"
    max_rows = DECODE_ROWS if mode.endswith("-decode") or packed else None
    four = mode.startswith("int4")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if packed:  # checked before any layer changes: no half-packed model
        ensure(packing_supported(), "--quantize packed needs a torch build whose oneDNN packs bf16 weights on this CPU")
        ensure(all(can_pack(m.weight) for _, m in targets),
               "--quantize packed needs a bfloat16 model on CPU (use --dtype bfloat16)")
    if fuse and mode != "int4":
        _fuse_siblings(model, max_rows, int4_group if four else None, packed=packed)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        int4 = (four and lin is not head and lin.in_features % int4_group == 0
                and (int4_names is None or child in int4_names))
        rescored = (mode != "int4" and lin is head and rescore and (_tied(model, lin) or max_rows is not None)
                    and lin.weight.device.type == "cpu" and lin.in_features % INT4_GROUP == 0)
        setattr(parent, child, Int4Linear(lin, int4_group, max_rows) if int4 else RescoredHead(lin, max_rows)
                if rescored else PackedLinear(lin) if packed else Int8Linear(lin, max_rows))
    model.saesteer_quantize = mode
    return len(targets)
