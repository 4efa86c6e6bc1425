"""Data parallelism: the same run under `torchrun` / `accelerate launch` uses every process.

Both launchers export RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous
address); a plain `python` / `loradock train` run has none and is world size 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device_type: str, timeout_s: int = 1800) -> World:
    """Join the process group when launched with several processes (NCCL on CUDA, gloo on CPU).

    `timeout_s` (the config's ddp_timeout) is how long a collective waits for the other processes.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), size)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return world


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all processes."""
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_from_main(obj: object, world: World) -> object:
    """`obj` as rank 0 has it, on every rank."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
