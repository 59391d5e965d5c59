"""Memory-mapped reader of an activation cache folder (written by :func:`saesteer.activations.collect`).

Shards are safetensors files; each tensor is opened as a read-only ``numpy.memmap`` at its offset in the file, so a
cache of any size is streamed from disk / the page cache and never loaded into RAM as a whole. Batches gather their
rows shard by shard from a seeded global permutation (8 bytes per token of index memory).
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from saesteer.core import SaesteerError, ensure, read_json

FORMAT = "saesteer-activations"
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}


def _open_tensor(path: Path, name: str) -> np.memmap | None:
    """Memory-map tensor ``name`` of a safetensors file (None when absent). Raises on a truncated/corrupt file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            ensure(8 + hlen <= size, f"shard {path} is truncated or corrupt (bad header)")
            header = json.loads(f.read(hlen))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaesteerError(f"shard {path} is unreadable or corrupt ({type(e).__name__})") from None
    if name not in header:
        return None
    info = header[name]
    ensure(info.get("dtype") in _NP, f"shard {path}: unsupported dtype {info.get('dtype')} for {name}")
    start, end = info["data_offsets"]
    ensure(8 + hlen + end <= size, f"shard {path} is truncated ({size} bytes, header needs {8 + hlen + end})")
    shape = tuple(info["shape"])
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=_NP[info["dtype"]])  # type: ignore[return-value]
    arr = np.memmap(path, dtype=_NP[info["dtype"]], mode="r", offset=8 + hlen + start, shape=shape)
    arr.st_dtype = info["dtype"]  # type: ignore[attr-defined]
    return arr


def _to_torch(arr: np.ndarray, st_dtype: str) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only memmaps: we never write through the tensor
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.bfloat16) if st_dtype == "BF16" else t


class ActivationCache:
    """An activation cache folder: ``meta.json`` + ``shard_NNNNN.safetensors``."""

    def __init__(self, path: str | Path, allow_incomplete: bool = False):
        self.path = Path(path).expanduser()
        ensure(self.path.is_dir(), f"activation cache not found: {self.path}")
        meta = read_json(self.path / "meta.json", "activation cache meta")
        ensure(isinstance(meta, dict) and meta.get("format") == FORMAT,
               f"{self.path}/meta.json is not a saesteer activation cache (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        for k in ("d_model", "n_tokens", "shards", "layer", "model"):
            ensure(k in meta, f"{self.path}/meta.json is corrupt: no {k!r}")
        ensure(meta.get("version") == 1, f"unsupported activation cache version {meta.get('version')}")
        if not meta.get("complete") and not allow_incomplete:
            raise SaesteerError(f"activation cache {self.path} is incomplete (re-run the same collect command to resume)")
        self.meta: dict[str, Any] = meta
        self._acts: list[np.memmap] = []
        self._st_dtype = "F32"
        counts = []
        for s in meta["shards"]:
            f = self.path / s["file"]
            ensure(f.exists(), f"activation cache {self.path}: shard {s['file']} is missing")
            a = _open_tensor(f, "acts")
            ensure(a is not None, f"shard {f} has no 'acts' tensor")
            ensure(a.ndim == 2 and a.shape[1] == meta["d_model"] and a.shape[0] == s["n_tokens"],
                   f"shard {f} has shape {tuple(a.shape)}, meta says [{s['n_tokens']}, {meta['d_model']}]")
            self._st_dtype = getattr(a, "st_dtype", "F32")
            self._acts.append(a)
            counts.append(int(s["n_tokens"]))
        ensure(sum(counts) == meta["n_tokens"], f"{self.path}: shards hold {sum(counts)} tokens, meta says {meta['n_tokens']}")
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    # ------------------------------------------------------------------ properties
    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def d_model(self) -> int:
        return int(self.meta["d_model"])

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])

    @property
    def n_shards(self) -> int:
        return len(self._acts)

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return f"ActivationCache({str(self.path)!r}, model={self.model!r}, layer={self.layer}, n_tokens={self.n_tokens})"

    # ------------------------------------------------------------------ access
    def shard(self, i: int) -> torch.Tensor:
        """Shard ``i``'s activations ``[n, d]`` as a tensor over the memory map (stored dtype; no copy of the file
        into RAM until rows are touched)."""
        ensure(0 <= i < self.n_shards, f"shard {i} out of range (0..{self.n_shards - 1})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(self._acts[i])
        return t.view(torch.bfloat16) if self._st_dtype == "BF16" else t

    def shard_tensor(self, i: int, name: str) -> torch.Tensor | None:
        """Another tensor of shard ``i`` (``token_ids``, ``doc_ids``), or None when the shard has none."""
        ensure(0 <= i < self.n_shards, f"shard {i} out of range (0..{self.n_shards - 1})")
        a = _open_tensor(self.path / self.meta["shards"][i]["file"], name)
        return None if a is None else _to_torch(a, getattr(a, "st_dtype", "I32"))

    def rows(self, index: np.ndarray | torch.Tensor | list[int]) -> torch.Tensor:
        """Float32 rows at global token indices (any order), gathered shard by shard from the memory maps."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_tokens):
            raise SaesteerError(f"row index out of range (cache has {self.n_tokens} tokens)")
        out = torch.empty((idx.size, self.d_model), dtype=torch.float32)
        shard_of = np.searchsorted(self._offsets, idx, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = idx[sel] - self._offsets[s]
            order = np.argsort(local, kind="stable")
            chunk = _to_torch(self._acts[s][local[order]], self._st_dtype).float()
            out[torch.from_numpy(sel[order])] = chunk
        return out

    def n_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches each rank gets per epoch (with ``world_size > 1`` every rank gets the same number)."""
        full, rest = divmod(self.n_tokens, batch_size)
        total = full + (0 if drop_last or rest == 0 else 1)
        return total // world_size if world_size > 1 else total

    def iter_batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, start_batch: int = 0, epoch: int = 0,
                     rank: int = 0, world_size: int = 1, drop_last: bool = False) -> Iterator[torch.Tensor]:
        """Float32 ``[b, d]`` batches. Shuffled with a permutation seeded by ``(seed, epoch)`` across all shards;
        ``start_batch`` skips this rank's first batches (resume); rank ``r`` of ``world_size`` gets global batches
        ``r, r + W, r + 2W, ...`` (a trailing partial round is dropped so all ranks take the same number of steps)."""
        ensure(batch_size > 0, "batch_size must be > 0")
        ensure(0 <= rank < world_size, f"rank {rank} out of range for world_size {world_size}")
        ensure(start_batch >= 0, "start_batch must be >= 0")
        n = self.n_tokens
        if shuffle:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
            perm = torch.randperm(n, generator=g).numpy()
        else:
            perm = np.arange(n, dtype=np.int64)
        for step in range(start_batch, self.n_batches(batch_size, world_size, drop_last)):
            b = step * world_size + rank
            yield self.rows(perm[b * batch_size : (b + 1) * batch_size])

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` random rows (without replacement, seeded) as float32 ``[n, d]``."""
        ensure(0 < n <= self.n_tokens, f"cannot sample {n} rows from {self.n_tokens} tokens")
        g = torch.Generator().manual_seed(int(seed))
        return self.rows(torch.randperm(self.n_tokens, generator=g)[:n].numpy())

    def validate(self, chunk: int = 65_536) -> dict[str, Any]:
        """Scan every shard: finite values, token ids present and consistent. Returns norm statistics."""
        total, norm_sum, norm_max = 0, 0.0, 0.0
        for i, a in enumerate(self._acts):
            for j in range(0, a.shape[0], chunk):
                x = _to_torch(a[j : j + chunk], self._st_dtype).float()
                bad = ~torch.isfinite(x).all(dim=-1)
                if bool(bad.any()):
                    raise SaesteerError(f"shard {self.meta['shards'][i]['file']}: non-finite values at row {j + int(bad.nonzero()[0])}")
                nrm = x.norm(dim=-1)
                norm_sum += float(nrm.sum())
                norm_max = max(norm_max, float(nrm.max())) if nrm.numel() else norm_max
                total += x.shape[0]
            tid = self.shard_tensor(i, "token_ids")
            if tid is not None:
                ensure(tid.shape[0] == a.shape[0], f"shard {i}: token_ids has {tid.shape[0]} rows, acts {a.shape[0]}")
        return {"n_tokens": total, "n_shards": self.n_shards, "mean_norm": norm_sum / max(total, 1), "max_norm": norm_max}


def same_layer(meta: dict[str, Any], layer: int) -> bool:
    """Whether ``layer`` (negative counts from the end) names the layer a cache's ``meta`` holds. ``meta["layer"]``
    is always the absolute index; the recorded ``n_layers`` resolves a negative one, and older caches (without it)
    still match the exact ``--layer`` they were collected with."""
    have = meta.get("layer")
    if have is not None and int(have) == layer:
        return True
    n = meta.get("n_layers")
    if layer < 0 and n and -int(n) <= layer and have is not None:
        return layer % int(n) == int(have)
    return meta.get("config", {}).get("layer") == layer
