"""Splitting attribution's data passes across processes with torch.distributed.

When a process group is initialised (``torchrun``, Lightning Fabric's ``launch``, or
``torch.distributed.init_process_group``) with more than one process, each rank takes a contiguous
shard of the training set: curvature statistics are summed across ranks and each rank's columns of
the effects are gathered, so every rank ends with the same result as a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(num_train: int) -> range:
    """This rank's contiguous share of ``range(num_train)`` (the last shards may be shorter)."""
    rank, world = rank_and_world()
    per_rank = -(-num_train // world)
    return range(min(rank * per_rank, num_train), min((rank + 1) * per_rank, num_train))


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks (in place; a no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_columns(local: Tensor, num_train: int) -> Tensor:
    """Concatenate every rank's ``[Q, shard]`` columns into ``[Q, num_train]``, in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return local
    per_rank = -(-num_train // world)
    padded = local.new_zeros(local.shape[0], per_rank)
    padded[:, : local.shape[1]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts, dim=1)[:, :num_train]
