"""Data-parallel training across processes with torch.distributed (launched by ``torchrun``).

Every rank holds the full student and teacher and draws the same global prompt batch; rank r samples and
trains on its contiguous block of prompts. Gradients are summed with ``all_reduce`` (the loss is already
normalised by *global* token and sequence counts), so every rank applies the same update and the result equals
one process training on the whole batch. We reduce gradients ourselves rather than through the
``DistributedDataParallel`` wrapper because the student's vocabulary projection runs outside the module's
``forward`` (chunked, with activation checkpointing), where DDP's hooks would not see it.
Rank 0 alone writes logs and checkpoints; checkpoints hold full, unsharded state, so a run can resume
with a different number of processes.

The backend follows the configured device, not the machine: gloo for a CPU run (even where CUDA exists), and
``cpu:gloo,cuda:nccl`` for a CUDA run, so gradients go over NCCL while scalars and pickled objects (metrics,
the gathered step batch) keep a CPU channel. Under torchrun, ``cuda:i`` means the i-th GPU of the rank's own
block (``resolve_device``), so every rank's student and teacher land on distinct GPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InvalidInput


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


# Rank 0 evaluates and writes checkpoints while the others wait in a barrier; NCCL's default 10 minutes is
# shorter than a long held-out evaluation of a large model.
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("OPDKIT_DIST_TIMEOUT_MINUTES", "120")))


def backend_for(device: str) -> str:
    """Process-group backend for a run whose models live on ``device`` ("cpu", "cuda", "cuda:1", ...)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return "gloo"
    if kind == "cuda":
        return "cpu:gloo,cuda:nccl"
    raise InvalidInput(f"distributed training supports cpu and cuda devices, not {device!r}")


def resolve_device(device: str, *, local_rank: int = 0, devices_per_rank: int = 1, device_count: int | None = None
                   ) -> str:
    """The concrete device of ``device`` for one process: ``cuda:i`` becomes GPU ``local_rank * devices_per_rank
    + i`` (``cuda`` is ``cuda:0``), so rank r's student and teacher live in its own block of GPUs; anything
    else is returned unchanged. Raises ValueError naming the device when that GPU does not exist."""
    d = torch.device(device)
    if d.type != "cuda":
        return device
    index = local_rank * devices_per_rank + (d.index or 0)
    count = torch.cuda.device_count() if device_count is None else device_count
    if index >= count:
        raise InvalidInput(
            f"device {device!r} on local rank {local_rank} ({devices_per_rank} GPU(s) per rank) is cuda:{index}, "
            f"but this machine has {count} visible GPU(s): launch fewer processes per node "
            f"(torchrun --nproc_per_node) or set CUDA_VISIBLE_DEVICES")
    return f"cuda:{index}"


def devices_per_rank(devices: list[str]) -> int:
    """GPUs each rank needs for these configured devices: the highest ``cuda:i`` index plus one (0 if none)."""
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    return max((d.index or 0) + 1 for d in cuda) if cuda else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: str = "cpu") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (a no-op for one process).

    Args:
        device: the (already resolved, see ``resolve_device``) device of this rank's student; it picks the
            backend and, for CUDA, the rank's current device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = backend_for(device)
        kwargs = {}
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
            kwargs["device_id"] = torch.device(device)  # binds NCCL to this GPU (barrier, eager init)
        dist.init_process_group(backend=backend, timeout=TIMEOUT, **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size())


def shard_bounds(n: int, info: DistInfo) -> tuple[int, int]:
    """Contiguous [start, end) block of n items for this rank; n must divide evenly (checked in the config)."""
    per = n // info.world_size
    return info.rank * per, (info.rank + 1) * per


BUCKET_BYTES = 64 * 2**20


def gradient_buckets(grads: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """Group gradients into buckets of one dtype and device of at most ``bucket_bytes`` (a larger single
    gradient gets its own bucket). The order depends only on the parameter order and dtype names, so it is the
    same on every rank (a ``set`` of dtypes is not)."""
    buckets: list[list[torch.Tensor]] = []
    keys = sorted({(str(g.dtype), str(g.device)) for g in grads})
    for key in keys:
        current: list[torch.Tensor] = []
        size = 0
        for g in (g for g in grads if (str(g.dtype), str(g.device)) == key):
            nbytes = g.numel() * g.element_size()
            if current and size + nbytes > bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(g)
            size += nbytes
        if current:
            buckets.append(current)
    return buckets


def all_reduce_gradients(params: list[torch.Tensor], info: DistInfo, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum gradients over ranks, one flat buffer per bucket (as DDP's buckets do): extra memory is one bucket,
    not a second copy of the whole gradient."""
    if not info.enabled:
        return
    for group in gradient_buckets([p.grad for p in params if p.grad is not None], bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def all_reduce_sum(value: float, info: DistInfo) -> float:
    """Sum a Python number over ranks. The tensor stays on the CPU: both backends ``backend_for`` picks have a
    CPU channel (gloo), and a scalar is a host value anyway."""
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
