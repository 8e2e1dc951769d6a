"""torch.distributed for data-parallel training under `torchrun`: nothing home-made.

`torchrun --nproc_per_node N -m gptcore.cli pretrain ...` sets RANK, WORLD_SIZE and LOCAL_RANK;
`setup` joins the process group (NCCL on GPUs, gloo on CPUs) and picks this rank's device.
Without those variables it is a single process and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; choose this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available()):
        device = torch.device("cpu")
    elif world_size > 1 or device_name == "auto":
        device = torch.device(f"cuda:{local_rank}")  # one GPU per rank
    else:
        device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (the value itself on one process)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def gather_to_all(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] on one process)."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
