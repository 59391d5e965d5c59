"""Top-k sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Architecture: ``z = TopK(ReLU(W_enc (x̃ - b_dec) + b_enc))``, ``x̂̃ = Σ_i z_i W_dec[i] + b_dec`` with unit-norm decoder
rows, where ``x̃ = input_scale · x`` is the input rescaled so that E‖x̃‖² = d_in (the scale is measured once on a
sample and stored in the config).

**Unit convention (the one used everywhere, including for clamping).** Parameters live in the *scaled* space, but
every public method works in the model's *raw* residual units: ``encode`` returns latent values divided by
``input_scale``, so a latent with value ``a`` contributes exactly ``a * W_dec[f]`` (a unit-norm row, see
:meth:`TopKSAE.decoder_direction`) to the raw-unit reconstruction, and ``decode`` / ``forward`` return raw units.
Hence ``latent_scale == 1.0`` always: a clamp ``x + (value - a_f(x)) * W_dec[f]`` is correct in raw units with the
values :meth:`encode` reports. Exports to SAELens / sparsify fold the scale into the biases (``b_enc / s``,
``b_dec / s``), which gives the very same raw-unit latents.

The training path (:meth:`TopKSAE.train_forward`) works in scaled units; its encoder is a custom autograd function
whose backward only touches the k (+ k_aux) selected latents per row (a sparse CSR product instead of a dense
matmul), and the decoder is an ``embedding_bag`` over the selected rows.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from saesteer.core import SaesteerError, ensure

from .interface import SAEMethods

_CPU_BLOCK_ROWS = 0  # rows per encoder block on CPU (0: one block)
_DENSE_AUX_FACTOR = 8  # AuxK on dense dead columns when n_dead <= this × k_aux (else sparse entries)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SAEConfig:
    """Shape and provenance of a Top-k SAE (saved as JSON next to the weights)."""

    d_in: int
    """Width of the residual stream the SAE reads (the model's d_model)."""
    num_latents: int
    """Number of latents (dictionary size), e.g. 8 × d_in."""
    k: int = 32
    """Number of active latents per token."""
    model: str = ""
    """Name of the model whose activations the SAE was trained on (empty: unknown)."""
    layer: int = -1
    """Decoder layer whose output (residual stream after that layer) the SAE reads; -1: unknown."""
    hook_name: str = ""
    """Hook name of that layer (``model.layers.L``)."""
    input_scale: float = 1.0
    """Raw inputs are multiplied by this before encoding so that E‖x‖² = d_in; folded back by the public API."""
    dtype: str = "float32"
    """Parameter dtype: float32, float16 or bfloat16."""

    def __post_init__(self) -> None:
        ensure(int(self.d_in) > 0, f"d_in must be positive, got {self.d_in}")
        ensure(int(self.num_latents) > 0, f"num_latents must be positive, got {self.num_latents}")
        ensure(0 < int(self.k) < int(self.num_latents), f"k must be in 1..num_latents-1, got k={self.k} "
               f"with {self.num_latents} latents")
        ensure(math.isfinite(float(self.input_scale)) and float(self.input_scale) > 0,
               f"input_scale must be a positive finite number, got {self.input_scale}")
        ensure(self.dtype in _DTYPES, f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("d_in", "num_latents") if n not in d]
        ensure(not missing, f"SAE config lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def _csr_rows(idx: torch.Tensor, val: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Sparse [n_latents, N] CSR matrix with val[n, j] at (idx[n, j], n)."""
    n, kk = idx.shape
    rows = torch.arange(n, device=idx.device).repeat_interleave(kk)
    flat = idx.reshape(-1)
    # stable: rows stay ascending within each latent. numpy's sort is ~20× faster than torch's on CPU here
    order = (torch.sort(flat, stable=True).indices if flat.device.type != "cpu"
             else torch.from_numpy(flat.numpy().argsort(kind="stable")))
    counts = torch.bincount(flat, minlength=n_latents)
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=idx.device)
    crow[1:] = torch.cumsum(counts, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, rows[order], val.reshape(-1)[order], (n_latents, n),
                                       check_invariants=False)


def _gather_dot(W: torch.Tensor, idx: torch.Tensor, v: torch.Tensor, budget: int = 1 << 20) -> torch.Tensor:
    """out[n, j] = W[idx[n, j]] · v[n], in row chunks whose gathered rows hold about ``budget`` elements (they stay
    in cache; one huge gather would stream gigabytes through memory)."""
    n, kk = idx.shape
    chunk = max(1, budget // max(1, kk * W.shape[1]))
    out = v.new_empty(n, kk, dtype=W.dtype)
    for i in range(0, n, chunk):
        rows = W.index_select(0, idx[i:i + chunk].reshape(-1)).view(-1, kk, W.shape[1])
        torch.sum(rows.mul_(v[i:i + chunk, None, :].to(W.dtype)), -1, out=out[i:i + chunk])
    return out


class _DecoderWeightGrad(torch.autograd.Function):
    """Identity on the decoder output whose backward adds the decoder-weight gradient as one CSR product. With an
    ``embedding_bag`` over the detached weight (whose own backward gives the value gradients in one pass) it avoids
    torch's embedding_bag weight backward, which sorts every index and dominates a CPU training step."""

    @staticmethod
    def forward(ctx, out, W, vals, idx):  # type: ignore[override]
        ctx.save_for_backward(vals, idx)
        ctx.n_latents = W.shape[0]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        vals, idx = ctx.saved_tensors
        return g, _csr_rows(idx, vals.to(g.dtype), ctx.n_latents) @ g.contiguous(), None, None


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``Σ_j vals[n, j] W[idx[n, j]]`` (no bias), differentiable in vals and W, with sparse backward passes."""
    out = F.embedding_bag(idx, W.detach(), per_sample_weights=vals, mode="sum")
    return _DecoderWeightGrad.apply(out, W, vals.detach(), idx) if W.requires_grad else out


class _SparseTopKEncode(torch.autograd.Function):
    """``ReLU(W (x - b_dec) + b_enc)`` → top-k (and top-k_aux among dead latents), with a backward over the selected
    entries only. ``x`` is a constant (activations); ``b_dec`` gets its encoder-side gradient in closed form,
    ``-W^T grad_b_enc`` (Σ over the batch of ``-W^T g_n``), instead of a per-row input gradient.

    AuxK selection comes back sparse (values, latent ids) or, with ``dense_aux``, as a dense ``[N, n_dead]`` matrix
    over the dead latents ``dead_idx`` (zeros where not selected): dense GEMMs on the dead columns beat scattered
    index work when the dead set is small."""

    @staticmethod
    def forward(ctx, x, b_dec, W, b, k, k_aux, dead, mm_dtype, dense_aux, scratch):  # type: ignore[override]
        xc = x - b_dec
        n = xc.shape[0]
        aux = k_aux > 0 and dead is not None
        exact = mm_dtype == W.dtype  # else: low-precision selection, selected values recomputed exactly below
        vals, idx = xc.new_empty(n, k, dtype=mm_dtype), torch.empty(n, k, dtype=torch.long, device=xc.device)
        dead_idx = dead.nonzero().squeeze(1) if aux else idx.new_empty(0)
        dense_aux = aux and dense_aux
        aux_vals = xc.new_empty(n, len(dead_idx)) if dense_aux else xc.new_empty(n, k_aux if aux else 0, dtype=mm_dtype)
        aux_idx = idx.new_empty(n, k_aux if aux and not dense_aux else 0)
        Wm, bm = (W, b) if exact else (W.to(mm_dtype), b.to(mm_dtype))
        # on CPU, optional row blocks keep the pre-activations cache-resident for ReLU / top-k
        block = min(n, _CPU_BLOCK_ROWS) if xc.device.type == "cpu" and _CPU_BLOCK_ROWS else n
        buf = scratch(block, W.shape[0], mm_dtype)  # reused across steps: no fresh pages to fault in
        for i in range(0, n, block):
            rows, sl = xc[i:i + block], slice(i, i + block)
            pre = buf[:rows.shape[0]]
            torch.addmm(bm, rows if exact else rows.to(mm_dtype), Wm.t(), out=pre)
            pre.relu_()
            torch.topk(pre, k, dim=-1, sorted=False, out=(vals[sl], idx[sl]))
            if dense_aux:
                cols = (pre.index_select(1, dead_idx) if exact else
                        torch.addmm(b[dead_idx], rows, W[dead_idx].t()).relu_())
                if k_aux < cols.shape[1]:
                    tv, tp = cols.topk(k_aux, dim=-1, sorted=False)
                    cols = torch.zeros_like(cols).scatter_(1, tp, tv)
                aux_vals[sl] = cols
            elif aux:
                torch.topk(pre.masked_fill_(~dead, float("-inf")), k_aux, dim=-1, sorted=False,
                           out=(aux_vals[sl], aux_idx[sl]))
        del buf
        if not exact:
            vals = _gather_dot(W, idx, xc).add_(b[idx]).relu_()
            if aux and not dense_aux:
                aux_vals = _gather_dot(W, aux_idx, xc).add_(b[aux_idx])
        aux_vals.clamp_min_(0)
        if aux and not dense_aux:
            idx_all, vals_all = torch.cat([idx, aux_idx], 1), torch.cat([vals, aux_vals], 1)
        else:
            idx_all, vals_all = idx, vals
        ctx.dense_aux = dense_aux
        ctx.save_for_backward(xc, W, idx_all, vals_all > 0, dead_idx, aux_vals > 0 if dense_aux else aux_vals[:, :0])
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):  # type: ignore[override]
        xc, W, idx_all, active, dead_idx, aux_active = ctx.saved_tensors
        if ctx.dense_aux:
            g, g_dense = g_vals.to(W.dtype) * active, g_aux.to(W.dtype) * aux_active  # ReLU gates
        else:
            g = (torch.cat([g_vals, g_aux], 1) if g_aux.shape[1] else g_vals).to(W.dtype) * active
            g_dense = None
        grad_x = grad_W = grad_b = grad_b_dec = None
        if ctx.needs_input_grad[0]:  # only when a caller differentiates through the inputs
            grad_x = F.embedding_bag(idx_all, W, per_sample_weights=g, mode="sum")
            if g_dense is not None:
                grad_x += g_dense @ W.index_select(0, dead_idx)
        if ctx.needs_input_grad[2]:
            grad_W = _csr_rows(idx_all, g, W.shape[0]) @ xc
            if g_dense is not None:
                grad_W.index_add_(0, dead_idx, g_dense.t() @ xc)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[1]:
            grad_b = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device).index_add_(
                0, idx_all.reshape(-1), g.reshape(-1))
            if g_dense is not None:
                grad_b.index_add_(0, dead_idx, g_dense.sum(0))
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(grad_b @ W)  # d/db_dec of Σ_n g_n · W (x_n - b_dec)
        return grad_x, grad_b_dec, grad_W, grad_b, None, None, None, None, None, None


class TopKSAE(SAEMethods, nn.Module):
    """Top-k SAE. Public methods take and return raw residual-stream units (see the module docstring).

    Satisfies the common SAE interface of :mod:`saesteer.sae.archs.base` (``arch``, ``source``, ``latent_acts``,
    ``decode_dense``, ``info``)."""

    arch = "topk"
    source = "saesteer"
    path = ""

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        dt = _DTYPES[cfg.dtype]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(cfg.num_latents, cfg.d_in, generator=gen)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.to(device=device, dtype=dt))
        self.W_enc = nn.Parameter(w.clone().to(device=device, dtype=dt))  # encoder = decoder transpose at init
        self.b_enc = nn.Parameter(torch.zeros(cfg.num_latents, device=device, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dt))

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def input_scale(self) -> float:
        return float(self.cfg.input_scale)

    # ----------------------------------------------------------------------------------------------- raw-unit API
    def _flat(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if x.shape[-1] != self.d_in:
            raise SaesteerError(f"input width {x.shape[-1]} does not match the SAE's d_in {self.d_in}")
        return x.reshape(-1, self.d_in).to(self.W_enc.dtype), tuple(x.shape[:-1])

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations of every latent, in raw units, shape ``[..., num_latents]``."""
        flat, lead = self._flat(x)
        pre = F.relu(F.linear(flat * self.input_scale - self.b_dec, self.W_enc, self.b_enc)) / self.input_scale
        return pre.reshape(*lead, self.num_latents)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k latents ``(values [..., k], indices [..., k])``, sorted by value, in raw units."""
        flat, lead = self._flat(x)
        pre = F.relu(F.linear(flat * self.input_scale - self.b_dec, self.W_enc, self.b_enc))
        vals, idx = pre.topk(self.k, dim=-1)
        return (vals / self.input_scale).reshape(*lead, self.k), idx.reshape(*lead, self.k)

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Top-k latents scattered into a dense ``[..., num_latents]`` tensor (zeros elsewhere)."""
        vals, idx = self.encode(x)
        return torch.zeros(*vals.shape[:-1], self.num_latents, dtype=vals.dtype, device=vals.device).scatter_(
            -1, idx, vals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` (raw units, same shape)."""
        return self.decode(*self.encode(x)).to(x.dtype)

    def latent_acts(self, x: torch.Tensor, features: Any) -> torch.Tensor:
        """``[..., m]`` top-k activations of the latents ``features`` (0 where not among the k active ones)."""
        feats = torch.as_tensor(features, dtype=torch.long, device=self.W_enc.device).reshape(-1)
        vals, idx = self.encode(x)
        match = idx.unsqueeze(-2) == feats[:, None]  # [..., m, k]
        return (vals.unsqueeze(-2) * match.to(vals.dtype)).sum(-1)

    def decode_dense(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction in raw units from dense latents ``[..., num_latents]``."""
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec / self.input_scale

    def info(self) -> dict[str, Any]:
        from saesteer.sae.archs.base import sae_info

        return sae_info(self)

    # ----------------------------------------------------------------------------------------------- training
    def _scratch(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A pre-activation buffer kept between training steps (a fresh 100 MB tensor per step costs page faults)."""
        buf = self.__dict__.get("_scratch_buf")
        if buf is None or buf.shape != (rows, cols) or buf.dtype != dtype or buf.device != self.W_enc.device:
            buf = torch.empty(rows, cols, dtype=dtype, device=self.W_enc.device)
            self.__dict__["_scratch_buf"] = buf
        return buf

    def train_forward(
        self,
        xs: torch.Tensor,
        dead: torch.Tensor | None = None,
        k_aux: int = 0,
        total_variance: torch.Tensor | None = None,
        mm_dtype: torch.dtype | None = None,
        dense_aux: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training pass on *scaled* inputs ``xs [N, d_in]``.

        Returns ``fvu`` (Σ‖x - x̂‖² / total_variance), ``auxk`` (AuxK loss: the top ``k_aux`` dead latents, decoded
        without bias, predicting the detached residual, normalised the same way and scaled by min(n_dead/k_aux, 1)),
        ``l2`` (Σ‖x - x̂‖²) and ``indices`` (the top-k indices). ``total_variance`` defaults to Σ‖x - mean(x)‖² of
        this batch (data-parallel callers pass the global batch's).
        """
        if total_variance is None:
            total_variance = (xs - xs.mean(0)).pow(2).sum()
        n_dead = int(dead.sum()) if dead is not None else 0
        ka = min(k_aux, n_dead)
        dense_aux = ka > 0 and (n_dead <= _DENSE_AUX_FACTOR * ka if dense_aux is None else dense_aux)
        vals, idx, aux_vals, aux_idx = _SparseTopKEncode.apply(
            xs, self.b_dec, self.W_enc, self.b_enc, self.k, ka, dead if ka > 0 else None,
            mm_dtype or self.W_enc.dtype, dense_aux, self._scratch)
        recon = sparse_decode(vals, idx, self.W_dec) + self.b_dec
        err = xs - recon
        l2 = err.pow(2).sum()
        out = {"l2": l2, "fvu": l2 / total_variance, "indices": idx, "l0": (vals > 0).sum(-1).float().mean()}
        if ka > 0:
            e_hat = (aux_vals @ self.W_dec.index_select(0, dead.nonzero().squeeze(1)) if dense_aux
                     else sparse_decode(aux_vals, aux_idx, self.W_dec))
            out["auxk"] = min(n_dead / k_aux, 1.0) * (e_hat - err.detach()).pow(2).sum() / total_variance
        else:
            out["auxk"] = l2.new_zeros(())
        return out

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Remove from each decoder row's gradient its component along that row (rows are unit norm)."""
        if self.W_dec.grad is None:
            return
        along = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(along * self.W_dec)

    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor, median_iters: int = 30) -> None:
        """Set ``input_scale`` so that E‖s·x‖² = d_in and ``b_dec`` to the geometric median of the scaled sample."""
        x = x.reshape(-1, self.d_in).float()
        ensure(x.shape[0] > 0, "cannot initialise an SAE from an empty sample")
        ensure(bool(torch.isfinite(x).all()), "the activation sample contains NaN or Inf")
        mean_sq = float(x.pow(2).sum(1).mean())
        ensure(mean_sq > 0, "the activation sample is all zeros")
        self.cfg.input_scale = math.sqrt(self.d_in / mean_sq)
        self.b_dec.copy_(geometric_median(x * self.cfg.input_scale, median_iters).to(self.b_dec.dtype))


@torch.no_grad()
def geometric_median(points: torch.Tensor, iters: int = 30, eps: float = 1e-6) -> torch.Tensor:
    """Geometric median of the rows of ``points`` (Weiszfeld's algorithm, starting at the mean). Distances come from
    ``‖p‖² - 2 p·y + ‖y‖²`` (two matrix-vector products per iteration, no ``[n, d]`` temporaries)."""
    p2 = points.pow(2).sum(1).double()
    y = points.mean(0)
    for _ in range(iters):
        d2 = (p2 - 2 * (points @ y).double() + float(y.double().pow(2).sum())).clamp_min(0)
        w = (1.0 / d2.sqrt().clamp_min(eps)).to(points.dtype)
        y_new = (w @ points) / w.sum()
        if float((y_new - y).norm()) < eps * max(1.0, float(y.norm())):
            return y_new
        y = y_new
    return y


def lr_for(num_latents: int) -> float:
    """Default Adam learning rate, scaled ∝ 1/√(num_latents / 2^14) as in Gao et al. 2024."""
    return 2e-4 / math.sqrt(num_latents / 2**14)
