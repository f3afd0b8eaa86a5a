"""The process group a launcher set up (torchrun, accelerate launch), this rank's device, its share of a batch,
and sums over ranks of small tensors and of gradients. Shared by the solver, `scalebio reweight` and
`scalebio finetune`."""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn


def init_distributed() -> torch.device:
    """Join the process group a launcher (torchrun, accelerate launch) set up, and pick this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(items: list, rank: int, world: int) -> list:
    """Rank r takes the r-th contiguous share of the global batch (sizes differ by at most one)."""
    n = len(items)
    start, stop = rank * n // world, (rank + 1) * n // world
    return items[start:stop]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over ranks, in place (through the GPU when the backend is NCCL)."""
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            on_gpu = t.cuda()
            dist.all_reduce(on_gpu)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t)
    return t


def all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum gradients over ranks: each rank's loss is its share of the global-batch objective."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
