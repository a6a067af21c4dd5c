"""One process or many: torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``, and the
run joins a process group (nccl on CUDA, gloo on the CPU). Without torchrun it is one
process and nothing is initialised. Rank 0 writes; metrics are summed over ranks."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Context", "setup", "teardown", "unwrap"]


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def log(self, text: str) -> None:
        """``text`` on stderr, from the main process only."""
        if self.main:
            print(text, file=sys.stderr, flush=True)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over every rank (in float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_error(self, error: str | None) -> str | None:
        """The first rank's error (or None) on every rank, so all stop together."""
        if not self.distributed:
            return error
        errors: list[str | None] = [None] * self.world
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)


def setup() -> Context:
    """The process's place in the run; joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Context(rank, world, local_rank, device)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside (Distributed)DataParallel and torch.compile wrappers."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
            continue
        inner = getattr(model, "_orig_mod", None)
        if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            model = inner
            continue
        return model
