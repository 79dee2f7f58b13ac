"""Distributed training helpers (torchrun, DDP): process info, the process group, the sampler's steps."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ..sam.models import pick_device


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    """Rank, world size and local rank as set by torchrun (single process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """False in the non-zero ranks of a torchrun job (they print and write nothing)."""
    return dist_info_from_env().is_main


def steps_per_epoch(n_images: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch: DistributedSampler gives each process ceil(n / world) images."""
    return math.ceil(math.ceil(n_images / world_size) / batch_size)


@contextlib.contextmanager
def distributed(device: str | torch.device | None) -> Iterator[DistInfo]:
    """Join the torchrun process group for the duration: NCCL when training on CUDA, else gloo."""
    info = dist_info_from_env()
    started = False
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if pick_device(device).type == "cuda" else "gloo")
        started = True
    try:
        yield info
    finally:
        if started:
            dist.destroy_process_group()
