"""torchrun support: process-group set-up and rank helpers (single process when not launched)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device, backend: str | None = None,
                     timeout: datetime.timedelta | None = None) -> DistInfo:
    """Join the torchrun process group if launched by it (NCCL on GPUs, gloo on CPU, unless ``backend`` says).

    Under torchrun each process takes the GPU of its LOCAL_RANK, whatever single device the
    command line named. ``timeout`` bounds how long a collective waits for the slowest rank
    (torch's default when None).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout is not None else {}))
    return DistInfo(rank=rank, world_size=world_size, device=device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(info: DistInfo, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(info: DistInfo, value: Any) -> list[Any]:
    """Every rank's ``value``, by rank, on every rank."""
    if not info.enabled:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
