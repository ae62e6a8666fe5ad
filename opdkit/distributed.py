"""Data-parallel training across processes with torch.distributed (launched by ``torchrun``).

Every rank holds the full student and teacher and draws the same global prompt batch; rank r samples and
trains on its contiguous block of prompts. Gradients are summed with ``all_reduce`` (the loss is already
normalised by *global* token and sequence counts), so every rank applies the same update and the result equals
one process training on the whole batch. We reduce gradients ourselves rather than through the
``DistributedDataParallel`` wrapper because the student's vocabulary projection runs outside the module's
``forward`` (chunked, with activation checkpointing), where DDP's hooks would not see it.
Rank 0 alone writes logs and checkpoints; checkpoints hold full, unsharded state, so a run can resume
with a different number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo(dist.get_rank(), dist.get_world_size())


def shard_bounds(n: int, info: DistInfo) -> tuple[int, int]:
    """Contiguous [start, end) block of n items for this rank; n must divide evenly (checked in the config)."""
    per = n // info.world_size
    return info.rank * per, (info.rank + 1) * per


def all_reduce_gradients(params: list[torch.Tensor], info: DistInfo) -> None:
    """Sum gradients over ranks, in one flat buffer per dtype (as DDP's buckets do)."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def all_reduce_sum(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def pad_cat(tensors: list[torch.Tensor | None], value: float | int = 0) -> torch.Tensor | None:
    """Concatenate (B_i, T_i, ...) tensors along rows, right-padding the time axis to the longest T_i."""
    if any(t is None for t in tensors):
        return None
    width = max(t.shape[1] for t in tensors)
    padded = [torch.nn.functional.pad(t, [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]], value=value)
              if t.shape[1] < width else t for t in tensors]
    return torch.cat(padded, 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
