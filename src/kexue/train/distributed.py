"""Helpers for running the training loop under ``torchrun`` (DDP): process-group setup from the
environment, rank / world size, sharding of a global batch, and all-reduce of metrics.

Everything degrades to the single-process case when no process group is initialised, so library code
can call these helpers unconditionally.

Example (single process):
    >>> from kexue.train import distributed as D
    >>> D.get_rank(), D.get_world_size(), D.is_main()
    (0, 1, True)
    >>> D.shard(list(range(10)), rank=1, world_size=2)
    [5, 6, 7, 8, 9]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_from_env", "is_distributed", "get_rank", "get_world_size", "get_local_rank",
           "is_main", "barrier", "shard", "all_reduce_sum", "all_reduce_metrics", "broadcast_object",
           "cleanup"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global ``rank``, ``world_size``, ``local_rank`` and the ``backend``."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from e


def init_from_env(device: str = "cpu", backend: str | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1``; otherwise do nothing.

    The backend defaults to NCCL when ``device`` is CUDA and gloo otherwise. Calling it again when a group
    already exists just reports it. Returns a :class:`DistInfo`.

    Example:
        >>> init_from_env().world_size  # not under torchrun
        1
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend())
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(0, 1, 0, None)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    if backend is None:
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
    local_rank = _env_int("LOCAL_RANK", 0)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    """The rank on this machine, from ``LOCAL_RANK`` (0 when unset)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on rank 0: the process that prints and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all processes (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> Sequence[T]:
    """The contiguous part of ``items`` that ``rank`` processes: ``world_size`` near-equal chunks, the
    first ``len(items) % world_size`` ranks taking one extra item. Concatenating the shards in rank order
    gives back ``items``, so a global batch is split exactly as a single process would see it.

    Example:
        >>> shard(list(range(5)), rank=0, world_size=2), shard(list(range(5)), rank=1, world_size=2)
        ([0, 1, 2], [3, 4])
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    n = len(items)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return items[start:stop]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes (returns a new tensor; identity when not distributed)."""
    out = t.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_metrics(metrics: dict[str, float], weight: float = 1.0, device: str | torch.device = "cpu"
                       ) -> dict[str, float]:
    """Weighted mean of each scalar metric over all processes (``weight`` is e.g. this rank's sample
    count). Every rank must pass the same keys. Identity when not distributed.

    Example:
        >>> all_reduce_metrics({"loss": 0.5}, weight=10)
        {'loss': 0.5}
    """
    if not is_distributed():
        return dict(metrics)
    keys = sorted(metrics)
    vals = torch.tensor([float(metrics[k]) * weight for k in keys] + [float(weight)], dtype=torch.float64,
                        device=device)
    dist.all_reduce(vals, op=dist.ReduceOp.SUM)
    total = vals[-1].item()
    return {k: vals[i].item() / total for i, k in enumerate(keys)}


def broadcast_object(obj: T, src: int = 0) -> T:
    """Send a picklable object from ``src`` to every process (identity when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
