"""torch.distributed helpers shared by data-parallel training and distributed activation collection.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`setup` initialises the default process group (gloo on CPU, nccl on
CUDA, one GPU per local rank); without it every helper is a no-op for a world of one process.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import torch

from .errors import SaesteerError
from .runtime import resolve_device

T = TypeVar("T")


def setup(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) — initialises torch.distributed under torchrun (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device)
    dev = resolve_device(device)
    if dev.startswith("cuda"):
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def teardown(world: int) -> None:
    """Wait for every rank, then destroy the process group (no-op for one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def release() -> None:
    """Destroy the process group without waiting for the other ranks (after an error: a process that exits with
    a live gloo group aborts with SIGABRT instead of its own exit code)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def gather(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def agree(obj: Any, world: int, what: str) -> None:
    """Raise the same :class:`SaesteerError` on every rank unless all ranks pass an equal ``obj`` (a dict: the
    message names the first differing key)."""
    objs = gather(obj, world)
    for r, o in enumerate(objs):
        if o == objs[0]:
            continue
        if isinstance(o, dict) and isinstance(objs[0], dict):
            k = next(k for k in sorted(set(o) | set(objs[0])) if o.get(k) != objs[0].get(k))
            detail = f"{k}={o.get(k)!r} on rank {r} vs {objs[0].get(k)!r} on rank 0"
        else:
            detail = f"rank {r} differs from rank 0"
        raise SaesteerError(f"processes disagree on the {what} ({detail}); every rank must run the same command")


def on_rank0(fn: Callable[[], T], rank: int, world: int) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; a :class:`SaesteerError` it raises is raised
    on every rank (so no rank waits forever for one that failed)."""
    result, err = None, None
    if rank == 0:
        try:
            result = fn()
        except SaesteerError as e:
            err = str(e)
    if world > 1:
        import torch.distributed as dist

        box = [(result, err)]
        dist.broadcast_object_list(box, src=0)
        result, err = box[0]
    if err is not None:
        raise SaesteerError(err)
    return result  # type: ignore[return-value]


def share(total: int, rank: int, world: int) -> int:
    """Rank ``rank``'s part of ``total`` split evenly over ``world`` ranks (the first ``total % world`` get one
    more); the parts sum to ``total``."""
    return total // world + (1 if rank < total % world else 0)
