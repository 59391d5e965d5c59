"""Train a Top-k SAE on an activation cache: streamed, shuffled, checkpointed, exactly resumable, data-parallel.

Data order. Each epoch the cache's rows are cut into contiguous chunks (``chunk_rows``), the chunks are permuted
(seeded by ``seed`` and the epoch), groups of ``buffer_chunks`` chunks are read together and shuffled row-wise, and
consecutive runs of ``batch_size`` rows form the global batches (the last partial batch is dropped). Only a buffer is
ever in memory; the order depends on nothing but (seed, epoch), so a checkpoint only needs (epoch, batch).

Data parallel (``torchrun --nproc_per_node N -m saesteer train ...``): gloo on CPU, nccl on CUDA. Rank r trains on
rows ``r::N`` of every global batch; the loss is normalised by the *global* batch variance and gradients are summed
with one all-reduce, so N processes compute the same update as one process with the same global batch (the DDP
contract). Dead-latent counters are all-reduced too. Rank 0 writes checkpoints and the final SAE.
"""

from __future__ import annotations

import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saesteer.activations import ActivationCache, same_layer
from saesteer.core import (
    SaesteerError,
    atomic_write_bytes,
    atomic_write_json,
    check_output_path,
    default_dtype,
    ensure,
    set_threads,
)
from saesteer.core import dist as ddp
from saesteer.core.dist import setup as _dist_setup

from .model import SAEConfig, TopKSAE, lr_for

CKPT_DIR = "checkpoints"
CKPT_FILE = "state.pt"


@dataclass
class TrainConfig:
    """Top-k SAE training run (shared by ``saesteer train`` and the Python API)."""

    acts: str
    """Activation cache folder (``saesteer collect`` output)."""
    out: str
    """Output folder: the trained SAE (our format) plus ``checkpoints/`` and ``metrics.jsonl``."""
    k: int = 32
    """Active latents per token."""
    expansion: int = 8
    """num_latents = expansion × d_model (ignored when num_latents is set)."""
    num_latents: int | None = None
    """Dictionary size; overrides expansion."""
    batch_size: int = 4096
    """Global batch in tokens (split across ranks when data-parallel)."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(num_latents / 2^14)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up steps."""
    decay_frac: float = 0.2
    """Fraction of the run at the end over which the learning rate decays linearly to 0."""
    epochs: int = 1
    """Passes over the cache (ignored when steps is set)."""
    steps: int | None = None
    """Total optimiser steps (overrides epochs)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss."""
    k_aux: int | None = None
    """Dead latents used by AuxK per token; default d_model // 2."""
    dead_window: int = 250_000
    """A latent that has not fired for this many training tokens counts as dead."""
    seed: int = 0
    """Seed for the initialisation and the data order."""
    checkpoint_every: int = 200
    """Write a checkpoint every this many steps (and at the end)."""
    chunk_rows: int = 4096
    """Rows per contiguous chunk when shuffling."""
    buffer_chunks: int = 16
    """Chunks read and shuffled together."""
    init_sample: int = 32768
    """Tokens used to measure the input scale and the geometric median for b_dec."""
    mm_dtype: str = "auto"
    """Precision of the dense encoder matmul used for top-k *selection* (float32, bfloat16 or auto = bfloat16 where
    ``core.default_dtype`` of the device is bfloat16 — CUDA, CPUs with AVX512-BF16 / AMX — else float32); the selected
    values and all gradients stay float32."""
    model: str | None = None
    """If set, the cache must come from this model."""
    layer: int | None = None
    """If set, the cache must come from this layer."""
    resume: bool = False
    """Continue from ``out/checkpoints/state.pt`` (required when it exists, unless overwrite)."""
    overwrite: bool = False
    """Start from scratch even if ``out`` holds a checkpoint or an SAE."""
    stop_at_step: int | None = None
    """Checkpoint and stop after this many steps without finishing (for time-boxed runs; resume later)."""
    threads: int | None = None
    """torch intra-op threads."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto."""
    progress: bool = True
    """Show a progress bar."""


# --------------------------------------------------------------------------------------------- the cache
def open_cache(path: str | os.PathLike) -> ActivationCache:
    """Open an activation cache (the foundation's memory-mapped reader) and attach its shard lengths."""
    cache = ActivationCache(path)
    cache.lens = [int(s["n_tokens"]) for s in cache.meta["shards"]]  # type: ignore[attr-defined]
    ensure(cache.n_tokens > 0, f"activation cache {cache.path} holds no tokens")
    return cache


def _chunks(lens: list[int], chunk_rows: int) -> list[tuple[int, int, int]]:
    """(shard, local start, local stop) of every contiguous chunk, in cache order."""
    return [(i, a, min(a + chunk_rows, n)) for i, n in enumerate(lens) for a in range(0, n, chunk_rows)]


def epoch_order(lens: list[int], chunk_rows: int, buffer_chunks: int, seed: int, epoch: int) -> np.ndarray:
    """Global row ids of one epoch in training order (deterministic in seed and epoch; see the module doc)."""
    starts = np.cumsum([0, *lens])
    chunks = _chunks(lens, chunk_rows)
    rng = np.random.default_rng([seed, epoch + 1])  # epoch -1: the init sample
    perm = rng.permutation(len(chunks))
    out = []
    for j in range(0, len(perm), buffer_chunks):
        rows = np.concatenate([np.arange(starts[s] + a, starts[s] + b) for s, a, b in
                               (chunks[c] for c in perm[j:j + buffer_chunks])])
        out.append(rows[rng.permutation(len(rows))])
    return np.concatenate(out)


class BatchReader:
    """Reads rows by global id, keeping the most recently used chunks in memory (a buffer's worth, twice)."""

    def __init__(self, cache: ActivationCache, chunk_rows: int, capacity: int):
        self.cache, self.capacity = cache, max(1, capacity)
        self.chunks = _chunks(cache.lens, chunk_rows)
        starts = np.cumsum([0, *cache.lens])
        self.chunk_starts = np.array([starts[s] + a for s, a, _ in self.chunks], dtype=np.int64)
        self.loaded: dict[int, torch.Tensor] = {}

    def _chunk(self, c: int) -> torch.Tensor:
        if c not in self.loaded:
            if len(self.loaded) >= self.capacity:
                self.loaded.pop(next(iter(self.loaded)))
            s, a, b = self.chunks[c]
            self.loaded[c] = self.cache.shard(s)[a:b].to(torch.float32, copy=True)
        return self.loaded[c]

    def rows(self, ids: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(ids), self.cache.d_model)
        cid = np.searchsorted(self.chunk_starts, ids, side="right") - 1
        for c in np.unique(cid):
            m = np.nonzero(cid == c)[0]
            out[torch.from_numpy(m)] = self._chunk(int(c))[torch.from_numpy(ids[m] - self.chunk_starts[c])]
        return out


# --------------------------------------------------------------------------------------------- distributed helpers
def _all_reduce(t: torch.Tensor, world: int, op: str = "sum") -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


# --------------------------------------------------------------------------------------------- checkpoints
_ORDER_KEYS = ("seed", "batch_size", "chunk_rows", "buffer_chunks")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise SaesteerError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); delete it or pass "
                            f"--overwrite") from None
    ensure(isinstance(state, dict) and state.get("format") == "saesteer-train-ckpt",
           f"{path} is not a saesteer training checkpoint")
    return state


def _lr_factor(step: int, total: int, warmup: int, decay_frac: float) -> float:
    f = min(1.0, (step + 1) / max(1, warmup))
    decay_start = total * (1 - decay_frac)
    if decay_frac > 0 and step >= decay_start:
        f *= max(0.0, (total - step) / (total - decay_start))
    return f


# --------------------------------------------------------------------------------------------- training
def _validate(cfg: TrainConfig, cache: ActivationCache) -> None:
    m = cache.meta
    if cfg.model is not None:
        ensure(m.get("model") == cfg.model, f"cache {cache.path} holds activations of model {m.get('model')!r}, "
                                            f"not {cfg.model!r}")
    if cfg.layer is not None:  # --layer -1 names the cache's absolute layer (n_layers - 1) too
        ensure(same_layer(m, cfg.layer),
               f"cache {cache.path} holds layer {m.get('layer')} activations, not layer {cfg.layer}")
    ensure(cfg.batch_size > 0 and cfg.k > 0, "batch_size and k must be positive")
    ensure(cfg.epochs > 0 or (cfg.steps or 0) > 0, "epochs (or steps) must be positive")
    ensure(cache.n_tokens >= cfg.batch_size, f"the cache holds {cache.n_tokens} tokens, fewer than one batch "
                                             f"({cfg.batch_size})")


def train(cfg: TrainConfig) -> TopKSAE | None:
    """Train (or resume) an SAE; returns it (None when ``stop_at_step`` stopped the run early).

    Under torchrun a rank that stops on a :class:`SaesteerError` releases the process group first, so it exits with
    the CLI's code 2 and its one-line message instead of gloo's SIGABRT.
    """
    try:
        return _train(cfg)
    except SaesteerError:
        ddp.release()
        raise


def selection_dtype(mm_dtype: str, device: str) -> str:
    """``TrainConfig.mm_dtype`` resolved for ``device`` (``auto``: bfloat16 where bf16 is the device's default)."""
    if mm_dtype != "auto":
        return mm_dtype
    return "bfloat16" if default_dtype(str(device)) == "bfloat16" else "float32"


def _train(cfg: TrainConfig) -> TopKSAE | None:
    from .formats import save_sae

    set_threads(cfg.threads)
    check_output_path(cfg.out)
    rank, world, device = _dist_setup(cfg.device)
    cache = open_cache(cfg.acts)
    _validate(cfg, cache)
    ensure(cfg.batch_size % world == 0, f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    mm_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(selection_dtype(cfg.mm_dtype, device))
    ensure(mm_dtype is not None, f"mm_dtype must be float32, bfloat16 or auto, got {cfg.mm_dtype!r}")
    out = Path(cfg.out)
    ckpt_path = out / CKPT_DIR / CKPT_FILE
    d = cache.d_model
    n_lat = cfg.num_latents or cfg.expansion * d
    sae = TopKSAE(SAEConfig(d_in=d, num_latents=n_lat, k=cfg.k, model=str(cache.meta.get("model", "")),
                            layer=int(cache.meta.get("layer", -1)),
                            hook_name=str(cache.meta.get("hook_name", "")), input_scale=1.0), seed=cfg.seed)
    state = None
    if ckpt_path.exists() and not cfg.overwrite:
        ensure(cfg.resume, f"{out} holds a checkpoint: pass --resume to continue it or --overwrite to restart")
        state = load_checkpoint(ckpt_path)
        ensure(state["sae_cfg"]["d_in"] == d, f"checkpoint d_in {state['sae_cfg']['d_in']} does not match the "
                                              f"cache's d_model {d}")
        ensure(state["sae_cfg"]["num_latents"] == n_lat and state["sae_cfg"]["k"] == cfg.k,
               "checkpoint num_latents / k differ from the requested ones")
        for key in _ORDER_KEYS:
            ensure(state["order"][key] == getattr(cfg, key), f"checkpoint was made with {key}="
                                                             f"{state['order'][key]}, not {getattr(cfg, key)}")
        ensure(state["order"]["n_tokens"] == cache.n_tokens, "checkpoint was made on a different cache")
    elif not cfg.overwrite and (out / "saesteer.json").exists():
        raise SaesteerError(f"{out} already holds an SAE (pass --overwrite to replace it)")
    k_aux = cfg.k_aux if cfg.k_aux is not None else d // 2
    ensure(k_aux >= 0, "k_aux must be non-negative")
    reader = BatchReader(cache, cfg.chunk_rows, 2 * cfg.buffer_chunks)
    if state is None:
        sample_ids = epoch_order(cache.lens, cfg.chunk_rows, cfg.buffer_chunks, cfg.seed, -1)[:cfg.init_sample]
        sample = reader.rows(np.sort(sample_ids))
        ensure(bool(torch.isfinite(sample).all()), f"activation cache {cache.path} contains NaN or Inf values")
        sae.init_from_sample(sample)
        del sample
    else:
        sae.cfg.input_scale = float(state["sae_cfg"]["input_scale"])
        sae.load_state_dict(state["sae"])
    sae.to(device)
    lr = cfg.lr or lr_for(n_lat)
    opt = _adam(sae.parameters(), lr)
    since_fired = torch.zeros(n_lat, dtype=torch.long, device=device)
    step = 0
    if state is not None:
        opt.load_state_dict(state["opt"])
        since_fired.copy_(state["since_fired"])
        step = int(state["step"])
        torch.set_rng_state(state["rng_torch"])
    if world > 1:
        import torch.distributed as dist

        for p in sae.parameters():
            dist.broadcast(p.data, 0)
    bpe = cache.n_tokens // cfg.batch_size
    total = cfg.steps or cfg.epochs * bpe
    local_n = cfg.batch_size // world
    s = float(sae.cfg.input_scale)

    def checkpoint() -> None:
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "format": "saesteer-train-ckpt", "version": 1, "sae_cfg": sae.cfg.to_dict(),
                "sae": {k: v.detach().cpu() for k, v in sae.state_dict().items()}, "opt": opt.state_dict(),
                "step": step, "since_fired": since_fired.cpu(), "rng_torch": torch.get_rng_state(),
                "order": {**{k: getattr(cfg, k) for k in _ORDER_KEYS}, "n_tokens": cache.n_tokens},
                "train_cfg": {k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))}})
        ddp.barrier(world)

    if rank == 0:
        _mkdir(out / CKPT_DIR)
        trim_metrics(out / CKPT_DIR / "metrics.jsonl", step)  # a resume rewrites the steps after its checkpoint
    metrics_f = open(out / CKPT_DIR / "metrics.jsonl", "a") if rank == 0 else None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.description}"), disable=not (cfg.progress and rank == 0))
    t0, tok0, last = time.perf_counter(), step * cfg.batch_size, {}

    def rate(now: int) -> float:  # training rows (tokens) per second of this run, for the bar
        return (now * cfg.batch_size - tok0) / max(time.perf_counter() - t0, 1e-9)

    stopped = False
    # one prefetch worker (the only one touching the reader during the loop); shut down on every exit, errors too
    with ThreadPoolExecutor(1) as prefetch, progress:
        task = progress.add_task("", total=total, completed=step)
        while step < total:
            epoch, b = divmod(step, bpe)
            order = epoch_order(cache.lens, cfg.chunk_rows, cfg.buffer_chunks, cfg.seed, epoch)
            nxt = None
            while b < bpe and step < total:
                x = (nxt.result() if nxt is not None else reader.rows(_batch_ids(order, b, cfg.batch_size, rank, world)))
                x = x.to(device)
                # read the next batch (disk / page cache → fp32 chunks) in the background while this step computes
                nxt = (prefetch.submit(reader.rows, _batch_ids(order, b + 1, cfg.batch_size, rank, world))
                       if b + 1 < bpe and step + 1 < total else None)
                xs = x.mul_(s)
                xd = xs.double()  # fp64 batch statistics; a NaN/Inf row makes them non-finite (no separate scan)
                stats = _all_reduce(torch.cat([xd.sum(0), xd.pow(2).sum().reshape(1)]), world)
                del xd
                if not bool(torch.isfinite(stats).all()):
                    raise SaesteerError(f"NaN or Inf in the activation cache (epoch {epoch}, batch {b})")
                mean = stats[:d] / cfg.batch_size
                tv = (stats[d] - cfg.batch_size * mean.pow(2).sum()).float()
                for g in opt.param_groups:
                    g["lr"] = lr * _lr_factor(step, total, cfg.warmup_steps, cfg.decay_frac)
                dead = since_fired >= cfg.dead_window
                o = sae.train_forward(xs, dead=dead, k_aux=k_aux, total_variance=tv, mm_dtype=mm_dtype)
                (o["fvu"] + cfg.auxk_alpha * o["auxk"]).backward()
                if world > 1:
                    flat = torch.cat([p.grad.reshape(-1) for p in sae.parameters()])
                    _all_reduce(flat, world)
                    i = 0
                    for p in sae.parameters():
                        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
                        i += p.numel()
                sae.remove_parallel_grads()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sae.normalize_decoder()
                fired = torch.zeros(n_lat, dtype=torch.long, device=device)
                fired[o["indices"].reshape(-1)] = 1
                fired = _all_reduce(fired, world, "max")
                since_fired += cfg.batch_size
                since_fired[fired.bool()] = 0
                red = _all_reduce(torch.stack([o["l2"].detach().double(), o["l0"].detach().double() * local_n]),
                                  world)
                step += 1
                b += 1
                last = {"step": step, "epoch": epoch, "fvu": float(red[0]) / float(tv),
                        "l0": float(red[1]) / cfg.batch_size, "dead_frac": float(dead.float().mean()),
                        "auxk": float(o["auxk"].detach()), "lr": opt.param_groups[0]["lr"]}
                if step % 10 == 0 or step == total:
                    progress.update(task, completed=step, description=f"fvu {last['fvu']:.4f} L0 {last['l0']:.1f} "
                                                                      f"dead {100 * last['dead_frac']:.1f}% "
                                                                      f"{rate(step):,.0f} tok/s")
                    if metrics_f:
                        metrics_f.write(json.dumps(last) + "\n")
                        metrics_f.flush()
                if step % cfg.checkpoint_every == 0 or step == total:
                    checkpoint()
                if cfg.stop_at_step is not None and step >= cfg.stop_at_step and step < total:
                    checkpoint()
                    stopped = True
                    break
            if stopped:
                break
    if metrics_f:
        metrics_f.close()
    if stopped:
        ddp.release()
        return None
    dt = time.perf_counter() - t0
    sae.__dict__.pop("_scratch_buf", None)  # the training pre-activation buffer
    sae.cpu()
    if rank == 0:
        save_sae(sae, out)
        atomic_write_json(out / "train_summary.json", {
            **last, "steps": step, "tokens": step * cfg.batch_size, "world_size": world, "seconds": dt,
            "tokens_per_s": (step * cfg.batch_size - tok0) / dt if dt > 0 else None,
            "dead_frac_final": float((since_fired >= cfg.dead_window).float().mean()), "lr": lr,
            "config": {k: v for k, v in asdict(cfg).items()}})
    ddp.teardown(world)
    return sae


def _batch_ids(order: np.ndarray, b: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """Rows of global batch ``b`` that this rank trains on."""
    return order[b * batch_size:(b + 1) * batch_size][rank::world]


def _adam(params: Any, lr: float) -> torch.optim.Adam:
    """Adam (eps as in sparsify) with torch's fused kernel where the device has one (~4x faster than the per-tensor
    loop on CPU; same update up to float rounding), else the foreach implementation."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=6.25e-10)


def trim_metrics(path: Path, step: int) -> None:
    """Keep only the lines of ``metrics.jsonl`` up to ``step`` (the checkpoint a run starts from; 0 for a fresh run),
    dropping a torn last line too, so that a resumed run appends without repeating steps. Atomic."""
    if not path.exists():
        return
    kept, changed = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            ok = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line + "\n")
        else:
            changed = True
    if changed:
        atomic_write_bytes(path, "".join(kept).encode("utf-8"))


def _mkdir(p: Path) -> bool:
    p.mkdir(parents=True, exist_ok=True)
    return True
