"""Several processes (torchrun): who is rank 0, the process group, and how work is shared out.

One engine for training (gradients averaged by DistributedDataParallel) and inference (cases or slices
dealt out by rank, results gathered on rank 0, which alone writes). gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def mine(self, items: list) -> list:
        """This rank's share of `items`: every world-th one, starting at the rank (all of them alone)."""
        return items[self.rank::self.world]

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the others); [obj] alone."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


@contextmanager
def distributed(device: torch.device) -> Iterator[DistEnv]:
    """This process's `DistEnv` for the block: in torchrun's process group (WORLD_SIZE > 1), which it leaves
    on the way out, or a single process.

    Leaving matters: a gloo rank that exits still in the group can abort in the group's teardown
    ("terminate called without an active exception", exit -6) while the other ranks finish their work.
    """
    env = _join(device)
    try:
        yield env
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _join(device: torch.device) -> DistEnv:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(0, 1, device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        import torchvision  # noqa: F401  (its C++ ops loaded while a gloo group is live keep the group's threads
        # alive past destroy_process_group, and a process that exits with them can abort: loaded first, they do not)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, device)
