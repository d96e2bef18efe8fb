"""Process-group setup that works with and without ``torchrun``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) a process group is initialised (NCCL on CUDA, gloo on CPU);
otherwise everything runs in one process with no process group, on CUDA if available else CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "pick_device"]


@dataclass
class DistInfo:
    """Where this process runs: ``rank`` of ``world_size``, ``local_rank``, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str | None = None, local_rank: int = 0) -> torch.device:
    """``requested`` ('cpu', 'cuda', 'cuda:1', ...) or the best available device for this rank."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise the default process group when launched by torchrun; no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    """Destroy the process group if one was initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
