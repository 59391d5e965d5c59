"""Residual-stream activation collection into sharded safetensors, and a memory-mapped reader.

What is kept: the residual stream after decoder layer ``L`` (the output of ``models.hook_module(model, L)``) for every
real token EXCEPT the first token of each document (position 0), BOS, padding and every special / control token
(``<|im_start|>``, ``<|im_end|>``, ...). On these models position 0 and the special tokens are attention sinks whose
residual norm is ~100x the rest (SmolLM2 layer 15: ~2.2e4 vs ~175; Qwen2.5-0.5B layer 12: >1e3 vs ~20); a few of them
dominate an SAE's MSE and wreck training. Massive activations also occur elsewhere (SmolLM2 layer 15: norm 8,212 =
47x the median at position 1 of a document), so a row whose L2 norm exceeds ``max_norm_ratio`` x the running median of
the row norms seen so far (all candidate rows of the batches forwarded, this one included; a log-spaced histogram kept
in the resume state, so a resumed run makes the same decisions) is dropped too and counted in ``n_excluded_norm``.

The forward stops after layer ``L`` (``models.run_to_layer``): no later layers, no LM head. Batches are right-padded
so every document sees positions 0..n-1 exactly as it would alone (the causal mask keeps padding out of real tokens).

Folder layout (see docs/ARCHITECTURE.md): ``meta.json`` plus ``shard_NNNNN.safetensors`` with ``acts`` ``[n, d]``,
``token_ids`` ``[n]`` int32 and ``doc_ids`` ``[n]`` int32. Every shard is written atomically and ``meta.json`` is
rewritten atomically after each shard with ``complete: false`` until the end; re-running the same command resumes
after the last complete shard. Re-running with a larger ``--tokens`` extends a finished cache (same other settings);
with a smaller one it stops at the next shard boundary past that count.

Distributed (``torchrun --nproc_per_node N -m saesteer collect ...``): rank r forwards batches ``r::N`` up to its
share of ``--tokens`` into ``shard_rRRR_NNNNN.safetensors`` of the same folder, keeping its resume state in
``rank_RRR.json``; rank 0 writes the final ``meta.json`` after all ranks finished (see :func:`_collect_dist`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saesteer.core import SaesteerError, atomic_write_bytes, atomic_write_json, ensure, read_json
from saesteer.models import DEFAULT_MODEL

FORMAT, VERSION = "saesteer-activations", 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# fields of CollectConfig that decide the content of a cache (a resume must match them)
_ANSWERS = "chat_mix_answers.json"  # cached model answers of the chat mix (kept across a failed first run)
_IDENTITY = ("model", "layer", "data", "context_len", "batch_size", "dtype", "shard_tokens", "seed", "max_norm_ratio")
_HIST_BINS_PER_OCTAVE = 32  # running-median histogram of row norms: bins 2^(1/32) wide (~2 % resolution)


@dataclass
class CollectConfig:
    """Settings of one activation collection (shared by ``saesteer collect`` and the API)."""

    model: str = DEFAULT_MODEL
    """Built-in model name, local HF folder, local .gguf file or hub id."""
    layer: int = 12
    """Decoder layer whose output (the residual stream after it) is collected; negative counts from the end."""
    data: str = "chat-mix"
    """Data spec: ``chat-mix[:text=600,chat=700,harmful=160,harmless=160,answer=24,repeat=3]`` (the SAE training
    mix, see :mod:`saesteer.data.chatmix`) or any :func:`data.load_prompts` spec; conversations get the chat template."""
    tokens: int = 100_000
    """Number of activation rows (kept tokens) to collect; fewer if the data runs out first."""
    out: str = "runs/acts"
    """Output folder."""
    batch_size: int = 16
    """Documents per forward pass."""
    context_len: int = 256
    """Documents are truncated to this many tokens."""
    dtype: str = "float32"
    """Storage dtype of the activations: float32, float16 or bfloat16 (independent of ``model_dtype``)."""
    model_dtype: str = "auto"
    """dtype the model runs in: float32, bfloat16, float16 or auto (``core.default_dtype``: bfloat16 on CUDA and on CPUs
    with native bf16, else float32); a model passed in runs as it is."""
    shard_tokens: int = 32_768
    """Rows per shard (a shard is written once it holds at least this many)."""
    seed: int = 0
    """Seed for the data sample and document order."""
    max_norm_ratio: float | None = 30.0
    """Drop rows whose L2 norm exceeds this multiple of the running median row norm (massive activations beyond
    position 0, e.g. SmolLM2 L15 at 47x the median); counted in ``meta.json`` as ``n_excluded_norm``. 0 or None keeps
    every row. Not lower by default: on Qwen2.5-Coder-0.5B layer 12, 5 % of chat-mix rows sit at 10-25x the median —
    the system prompt's first tokens, '.', ',' and the newline after ``assistant`` (where the refusal latent fires) —
    and a ratio of 10 would drop them all."""
    threads: int | None = None
    """torch intra-op threads (None: SAESTEER_THREADS or torch's default)."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto."""
    resume: bool = True
    """Continue an interrupted collection with the same settings in ``out``."""
    overwrite: bool = False
    """Replace whatever is in ``out`` (otherwise a different collection there is an error)."""
    progress: bool = True
    """Show a progress bar."""

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _IDENTITY}


# --------------------------------------------------------------------------------------------- token selection
def keep_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: set[int] | torch.Tensor) -> torch.Tensor:
    """Boolean ``[b, t]`` of the rows to keep: real tokens, not the first of each document, not special."""
    first = (attention_mask.cumsum(-1) == 1) & attention_mask.bool()
    special = torch.as_tensor(sorted(special_ids) if isinstance(special_ids, set) else special_ids,
                              dtype=input_ids.dtype, device=input_ids.device)
    return attention_mask.bool() & ~first & ~torch.isin(input_ids, special)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(input_ids, attention_mask)``."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def tokenize_docs(tok: Any, docs: list[tuple[str, bool]], context_len: int) -> list[list[int]]:
    """Token ids of ``(text, templated)`` documents, truncated to ``context_len`` (templated: no extra specials)."""
    out: list[list[int]] = [[] for _ in docs]
    for templated in (False, True):  # one batched (fast, parallel) tokenizer call per kind
        which = [i for i, d in enumerate(docs) if d[1] == templated]
        if which:
            enc = tok([docs[i][0] for i in which], add_special_tokens=not templated, truncation=True,
                      max_length=context_len)["input_ids"]
            for i, ids in zip(which, enc):
                out[i] = list(ids)
    return out


def make_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Group documents of similar length (little padding), then shuffle the batch order (seeded)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    g = torch.Generator().manual_seed(seed)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


# --------------------------------------------------------------------------------------------- norm outliers
def hist_add(hist: dict[str, int], norms: torch.Tensor) -> None:
    """Add row norms to a log2-spaced histogram ``{bin: count}`` (JSON-able: it lives in the resume state)."""
    bins = torch.floor(torch.log2(norms.double().clamp_min(1e-30)) * _HIST_BINS_PER_OCTAVE).long()
    u, c = torch.unique(bins, return_counts=True)
    for b, n in zip(u.tolist(), c.tolist()):
        hist[str(b)] = hist.get(str(b), 0) + n


def hist_median(hist: dict[str, int]) -> float | None:
    """Median of the histogrammed norms (the centre of the median bin); None when empty."""
    total = sum(hist.values())
    if not total:
        return None
    seen = 0
    for b in sorted(hist, key=int):
        seen += hist[b]
        if 2 * seen >= total:
            return float(2 ** ((int(b) + 0.5) / _HIST_BINS_PER_OCTAVE))
    return None  # unreachable


def norm_outliers(rows: torch.Tensor, hist: dict[str, int], ratio: float | None) -> torch.Tensor:
    """Boolean mask of ``rows`` to drop: L2 norm above ``ratio`` x the running median (``hist`` updated with these
    rows first). ``ratio`` 0 / None: nothing is dropped (the histogram is still kept, for ``median_norm``)."""
    norms = rows.float().norm(dim=-1)
    hist_add(hist, norms)
    if not ratio or not rows.shape[0]:
        return torch.zeros(rows.shape[0], dtype=torch.bool)
    return norms > ratio * hist_median(hist)


# --------------------------------------------------------------------------------------------- collection
_MIX_KEYS = {"text": "n_text", "chat": "n_chat", "harmful": "n_harmful", "harmless": "n_harmless",
             "answer": "answer_tokens", "repeat": "repeat_answered"}


def parse_mix_spec(spec: str) -> dict[str, int]:
    """``chat-mix[:text=600,chat=700,harmful=160,harmless=160,answer=24,repeat=3]`` → chat_mix keyword arguments."""
    _, _, body = spec.partition(":")
    kw: dict[str, int] = {}
    for part in filter(None, body.split(",")):
        k, eq, v = part.partition("=")
        ensure(bool(eq) and k.strip() in _MIX_KEYS and v.strip().isdigit(),
               f"bad chat-mix option {part!r}: use KEY=INT with KEY in {', '.join(_MIX_KEYS)}")
        kw[_MIX_KEYS[k.strip()]] = int(v)
    return kw


def load_docs(cfg: CollectConfig, model: Any, tok: Any, out: Path) -> tuple[list[tuple[str, bool]], dict[str, Any]]:
    from saesteer.data import load_prompts

    if cfg.data.split(":")[0] == "chat-mix":
        from saesteer.data import chat_mix

        ans_path = out / _ANSWERS
        answers = read_json(ans_path, "answers cache") if ans_path.exists() else {}
        n_before = len(answers)
        docs = chat_mix(tok, model, seed=cfg.seed, answers=answers, progress=cfg.progress, **parse_mix_spec(cfg.data))
        if len(answers) != n_before:
            atomic_write_json(ans_path, answers)
        kinds: dict[str, int] = {}
        for d in docs:
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        return [(d.text, d.templated) for d in docs], {"mix_docs": kinds}
    from saesteer.data import item_text

    items = load_prompts(cfg.data, seed=cfg.seed)
    docs = [(item_text(it, tok), it.messages is not None) for it in items]
    docs = [d for d in docs if d[0].strip()]
    ensure(len(docs) > 0, f"{cfg.data}: no non-empty documents")
    return docs, {}


def _prepare_out(cfg: CollectConfig) -> tuple[Path, dict[str, Any] | None, bool]:
    """Check the output folder; return (path, existing meta to resume or None, created_by_us)."""
    out = Path(cfg.out).expanduser()
    meta_path = out / "meta.json"
    if out.exists() and not out.is_dir():
        raise SaesteerError(f"output {out} exists and is not a folder")
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    if out.exists() and any(p.name != _ANSWERS for p in out.iterdir()):
        if not meta_path.exists():
            raise SaesteerError(f"output folder {out} is not empty and holds no activation cache (use another --out)")
        meta = read_json(meta_path, "activation cache meta")
        old = meta.get("config", {})
        diff = [k for k in _IDENTITY if k != "layer" and old.get(k) != cfg.identity()[k]]  # older caches: None
        if not same_layer(meta, cfg.layer):
            diff.insert(1, "layer")
        if diff:
            what = ", ".join(f"{k}={(meta if k == 'layer' else old).get(k)!r} vs {cfg.identity()[k]!r}" for k in diff)
            raise SaesteerError(f"{out} holds a different collection ({what}); use another --out or --overwrite")
        if not cfg.resume and not meta.get("complete"):
            raise SaesteerError(f"{out} holds an unfinished collection; resume it or pass --overwrite")
        return out, meta, False
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SaesteerError(f"cannot write to output folder {out}: {e.strerror or e}") from None
    return out, None, created


def collect(cfg: CollectConfig, model: Any = None, tok: Any = None) -> Path:
    """Collect activations per ``cfg`` (``model``/``tok`` may be passed in already loaded). Returns the folder.

    Under ``torchrun --nproc_per_node N`` the batches are split across the N ranks (see :func:`_collect_dist`)."""
    from saesteer.core import set_threads
    from saesteer.core.dist import release, setup

    ensure(cfg.tokens > 0, f"tokens must be > 0, got {cfg.tokens}")
    ensure(cfg.batch_size > 0 and cfg.context_len > 1, "batch_size must be > 0 and context_len > 1")
    ensure(cfg.dtype in _DTYPES, f"dtype must be one of {', '.join(_DTYPES)}, got {cfg.dtype!r}")
    ensure(cfg.shard_tokens > 0, "shard_tokens must be > 0")
    set_threads(cfg.threads)
    rank, world, device = setup(cfg.device)
    if world > 1:
        try:
            return _collect_dist(cfg, model, tok, rank, world, device)
        except SaesteerError:
            release()  # exit with the CLI's code 2, not an abort
            raise
    out, meta, created = _prepare_out(cfg)  # before loading the model: a wrong --out fails fast
    if _already_done(cfg, out, meta):
        return out
    _check_world(out, meta, 1)
    try:
        model, tok, layer, device = _load_model(cfg, model, tok, device)
        return _collect(cfg, model, tok, out, meta, layer, device)
    except BaseException:
        # nothing half-written: a run that wrote no shard leaves no cache behind (only the answers cache, if any)
        cur = read_json(out / "meta.json") if (out / "meta.json").exists() else {}
        if not cur.get("shards"):
            (out / "meta.json").unlink(missing_ok=True)
            if created and not (out / _ANSWERS).exists():
                shutil.rmtree(out, ignore_errors=True)
        raise


def _load_model(cfg: CollectConfig, model: Any, tok: Any, device: str) -> tuple[Any, Any, int, str]:
    """(model, tokenizer, checked layer index, device): loads ``cfg.model`` unless a model was passed in."""
    from saesteer.models import check_layer, load_model

    if model is None:
        model, tok = load_model(cfg.model, device=device, dtype=cfg.model_dtype)
    else:
        device = str(next(model.parameters()).device)
    return model, tok, check_layer(model, cfg.layer), device


def _already_done(cfg: CollectConfig, out: Path, meta: dict[str, Any] | None) -> bool:
    """True when ``out`` already holds at least ``cfg.tokens`` (or all the data); marks such a cache complete."""
    if meta is not None and (meta["n_tokens"] >= cfg.tokens or (meta.get("complete") and meta.get("exhausted"))):
        if not meta.get("complete"):  # an interrupted run that had already passed the (new, smaller) target
            meta.update(complete=True, n_tokens_requested=cfg.tokens)
            atomic_write_json(out / "meta.json", meta)
        return True
    return False


def _check_world(out: Path, meta: dict[str, Any] | None, world: int) -> None:
    """A cache grows only with the number of processes that started it (each rank resumes its own part)."""
    if meta is None:
        return
    was = int(meta.get("world_size", 1))
    ensure(was == world, f"{out} was collected by {was} process(es), this run has {world}: continue it with the "
                         f"same number of processes (torchrun --nproc_per_node {was}) or pass --overwrite")


def _plan(cfg: CollectConfig, tok: Any, docs: list[tuple[str, bool]]) -> tuple[list[list[int]], list[list[int]]]:
    """(token ids per document, batches of document indices in collection order)."""
    seqs = tokenize_docs(tok, docs, cfg.context_len)
    return seqs, make_batches([len(s) for s in seqs], cfg.batch_size, cfg.seed)


def _new_meta(cfg: CollectConfig, model: Any, layer: int, n_docs: int, extra: dict[str, Any]) -> dict[str, Any]:
    from saesteer import __version__
    from saesteer.models import d_model, model_name, n_layers

    return {  # the layer as the absolute index (--layer -1 is stored as n_layers - 1), in meta and its config
        "format": FORMAT, "version": VERSION, "model": model_name(model), "layer": layer, "n_layers": n_layers(model),
        "hook_name": f"model.layers.{layer}", "d_model": d_model(model), "dtype": cfg.dtype,
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "n_tokens": 0,
        "shards": [], "data_spec": cfg.data, "complete": False, "next_batch": 0, "n_docs": n_docs,
        "context_len": cfg.context_len, "excluded": "position 0, BOS, padding, all special tokens" + (
            f" and rows with norm > {cfg.max_norm_ratio:g} x the running median" if cfg.max_norm_ratio else ""),
        "n_excluded_norm": 0,
        "config": {**cfg.identity(), "layer": layer}, "saesteer_version": __version__, "norm_sum": 0.0, "norm_max": 0.0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
    }


def _collect(cfg: CollectConfig, model: Any, tok: Any, out: Path, meta: dict[str, Any] | None, layer: int,
             device: str) -> Path:
    docs, extra = load_docs(cfg, model, tok, out)
    seqs, batches = _plan(cfg, tok, docs)
    if meta is None:
        meta = _new_meta(cfg, model, layer, len(docs), extra)
    else:
        meta["complete"] = False  # extending: readers must not see a "complete" cache that is still growing
    atomic_write_json(out / "meta.json", meta)
    next_batch, tok_run, dt = _run_batches(cfg, model, tok, out, layer, device, seqs, batches, meta,
                                           out / "meta.json", "shard_", cfg.tokens, cfg.progress)
    done = meta["n_tokens"]
    meta["complete"] = True
    meta["exhausted"] = next_batch >= len(batches)  # the data ran out (a larger --tokens cannot extend it)
    meta["n_tokens_requested"] = cfg.tokens
    meta["mean_norm"] = meta["norm_sum"] / max(meta["n_tokens"], 1)
    meta["median_norm"] = hist_median(meta.get("norm_hist", {}))
    meta["tokens_per_s_last_run"] = tok_run / dt
    atomic_write_json(out / "meta.json", meta)
    if done < cfg.tokens and cfg.progress:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]data ran out: collected {done:,} of {cfg.tokens:,} tokens")
    return out


def _run_batches(cfg: CollectConfig, model: Any, tok: Any, out: Path, layer: int, device: str,
                 seqs: list[list[int]], batches: list[list[int]], state: dict[str, Any], state_file: Path,
                 prefix: str, budget: int, progress: bool) -> tuple[int, int, float]:
    """Forward ``batches[state["next_batch"]:]`` until ``state["n_tokens"]`` reaches ``budget``, writing a shard
    ``<prefix>NNNNN.safetensors`` (atomically) and then ``state`` to ``state_file`` (atomically) whenever
    ``shard_tokens`` rows are pending. Returns (next batch, rows collected by this run, seconds)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from safetensors.torch import save as st_save

    from saesteer.models import run_to_layer, special_token_ids

    specials = torch.tensor(sorted(special_token_ids(tok)), dtype=torch.long)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    acts_buf: list[torch.Tensor] = []
    ids_buf: list[torch.Tensor] = []
    doc_buf: list[torch.Tensor] = []

    def flush() -> None:
        acts = torch.cat(acts_buf).to(_DTYPES[cfg.dtype])
        if not bool(torch.isfinite(acts).all()):
            raise SaesteerError(f"non-finite activations (NaN/Inf) at layer {layer}; try --dtype float32")
        norms = acts.float().norm(dim=-1)
        i = len(state["shards"])
        name = f"{prefix}{i:05d}.safetensors"
        blob = st_save({"acts": acts.contiguous(), "token_ids": torch.cat(ids_buf).to(torch.int32),
                        "doc_ids": torch.cat(doc_buf).to(torch.int32)})
        atomic_write_bytes(out / name, blob)
        state["shards"].append({"file": name, "n_tokens": int(acts.shape[0])})
        state["n_tokens"] += int(acts.shape[0])
        state["norm_sum"] += float(norms.sum())
        state["norm_max"] = max(state["norm_max"], float(norms.max()))
        state["next_batch"] = next_batch
        atomic_write_json(state_file, state)
        acts_buf.clear(), ids_buf.clear(), doc_buf.clear()

    done = state["n_tokens"]
    next_batch = state["next_batch"]
    pending = 0
    t0, tok_run = time.perf_counter(), 0
    cols = [TextColumn("[bold]collect L{task.fields[layer]}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tok"),
            TextColumn("{task.fields[rate]:.0f} tok/s"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, disable=not progress) as bar:
        task = bar.add_task("collect", total=budget, completed=done, layer=layer, rate=0.0)
        while next_batch < len(batches) and done + pending < budget:
            idx = batches[next_batch]
            ids, mask = pad_right([seqs[i] for i in idx], pad_id)
            keep = keep_mask(ids, mask, specials)
            room = budget - done - pending
            # the last batch: forward only the documents whose rows are taken (the first whose running count reaches
            # ``room``, and those before it)
            n_docs = min(len(idx), int(torch.searchsorted(keep.sum(1).cumsum(0), room)) + 1)
            width = int(mask[:n_docs].sum(1).max())
            ids, mask, keep = (t[:n_docs, :width].to(device) for t in (ids, mask, keep))
            rows = run_to_layer(model, ids, mask, layer)[keep].float().cpu()
            doc = torch.tensor(idx[:n_docs], dtype=torch.int32)[:, None].expand(-1, width).to(device)[keep].cpu()
            tid = ids[keep].cpu()
            drop = norm_outliers(rows, state.setdefault("norm_hist", {}), cfg.max_norm_ratio)
            if bool(drop.any()):
                kept = (~drop).nonzero().squeeze(-1)
                # excluded rows count only up to where this batch's rows are taken (the rest are never looked at)
                end = int(kept[room - 1]) if kept.numel() > room else drop.numel()
                state["n_excluded_norm"] = state.get("n_excluded_norm", 0) + int(drop[:end].sum())
                rows, doc, tid = rows[kept], doc[kept], tid[kept]
            take = min(rows.shape[0], room)
            acts_buf.append(rows[:take]), ids_buf.append(tid[:take]), doc_buf.append(doc[:take])
            pending += take
            tok_run += take
            next_batch += 1
            if pending >= cfg.shard_tokens:
                flush()
                done, pending = done + pending, 0
            bar.update(task, completed=done + pending, rate=tok_run / max(time.perf_counter() - t0, 1e-9))
        if pending:
            flush()
    return next_batch, tok_run, max(time.perf_counter() - t0, 1e-9)


# --------------------------------------------------------------------------------------------- distributed
def _collect_dist(cfg: CollectConfig, model: Any, tok: Any, rank: int, world: int, device: str) -> Path:
    """``torchrun --nproc_per_node N -m saesteer collect ...``: every rank builds the same documents and batches and
    forwards batches ``rank, rank + N, ...`` up to its share of ``--tokens``, writing ``shard_rRRR_NNNNN`` shards
    into the one cache folder and its resume state to ``rank_RRR.json``; rank 0 writes ``meta.json`` (shards of all
    ranks in rank order, ``world_size``, ``complete: true``) once every rank has finished. A resume must use the
    same number of processes; each rank continues after its own last complete shard."""
    from saesteer.core import dist as dist

    dist.agree({**cfg.identity(), "tokens": cfg.tokens, "out": str(Path(cfg.out).expanduser().resolve()),
                "overwrite": cfg.overwrite, "resume": cfg.resume}, world, "collect settings")
    out, meta, created = dist.on_rank0(lambda: _prepare_out(cfg), rank, world)
    if dist.on_rank0(lambda: _already_done(cfg, out, meta), rank, world):
        dist.teardown(world)
        return out
    _check_world(out, meta, world)
    try:
        model, tok, layer, device = _load_model(cfg, model, tok, device)
        mix = cfg.data.split(":")[0] == "chat-mix"  # rank 0 first: it answers the mix's prompts once, caching them
        if mix and rank != 0:
            dist.barrier(world)
        docs, extra = load_docs(cfg, model, tok, out)
        if mix and rank == 0:
            dist.barrier(world)
        seqs, batches = _plan(cfg, tok, docs)
        digest = hashlib.sha256(json.dumps(seqs).encode()).hexdigest()
        dist.agree(digest, world, "tokenized documents (data, tokenizer and model answers must be the same)")
    except BaseException:
        if rank == 0 and meta is None and created and not (out / _ANSWERS).exists():
            shutil.rmtree(out, ignore_errors=True)  # nothing was collected yet: leave nothing behind
        raise
    if rank == 0:
        if meta is None:
            meta = {**_new_meta(cfg, model, layer, len(docs), extra), "world_size": world}
            meta.pop("next_batch")
        meta["complete"] = False
        atomic_write_json(out / "meta.json", meta)
    dist.barrier(world)
    state_file = out / f"rank_{rank:03d}.json"
    state = read_json(state_file, "rank state") if state_file.exists() else {
        "rank": rank, "world_size": world, "shards": [], "n_tokens": 0, "next_batch": 0, "norm_sum": 0.0,
        "norm_max": 0.0}
    ensure(state.get("rank") == rank and state.get("world_size") == world, f"{state_file} belongs to another run")
    mine = batches[rank::world]
    _, tok_run, dt = _run_batches(cfg, model, tok, out, layer, device, seqs, mine, state, state_file,
                                  f"shard_r{rank:03d}_", dist.share(cfg.tokens, rank, world), cfg.progress and rank == 0)
    state.update(exhausted=state["next_batch"] >= len(mine), tokens_per_s_last_run=tok_run / dt)
    atomic_write_json(state_file, state)
    states = dist.gather(state, world)
    if rank == 0:
        meta.update(
            shards=[s for st in states for s in st["shards"]], n_tokens=sum(st["n_tokens"] for st in states),
            norm_sum=sum(st["norm_sum"] for st in states), norm_max=max(st["norm_max"] for st in states),
            n_excluded_norm=sum(st.get("n_excluded_norm", 0) for st in states),
            complete=True, exhausted=all(st["exhausted"] for st in states), n_tokens_requested=cfg.tokens,
            tokens_per_s_last_run=sum(st["tokens_per_s_last_run"] for st in states),
            ranks=[{k: st[k] for k in ("rank", "n_tokens", "next_batch", "exhausted")} for st in states])
        meta["mean_norm"] = meta["norm_sum"] / max(meta["n_tokens"], 1)
        atomic_write_json(out / "meta.json", meta)
    dist.teardown(world)
    return out


from .cache import ActivationCache, same_layer  # noqa: E402,F401  (the reader lives in its own module)
