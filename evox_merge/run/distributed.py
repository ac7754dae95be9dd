"""Running one search across processes and machines with torch.distributed (launched by torchrun).

Every rank loads the model once and runs the whole algorithm; EvoX's distributed workflow hands each rank its
share of every population and gathers the fitness. The registered algorithms are deterministic given their seed
(each draws only from its own seeded `torch.Generator`, EvoGM trains its generators single-threaded on CPU; a
foreign EvoX algorithm draws from torch's global RNG, seeded identically on every rank, and evaluation runs under
`fork_rng`), so every rank computes the same populations without a broadcast. Only rank 0 writes records,
checkpoints and the release packet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from evox_merge.util.errors import EvoxMergeError


class DistributedRunError(EvoxMergeError, RuntimeError):
    """A rank died or stopped answering: the run stopped at its last checkpoint and can be resumed."""


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run: rank, world size and the device it evaluates on."""

    rank: int
    world_size: int
    device: str

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file."""
        return self.rank == 0


def single_process(device: str) -> DistributedContext:
    """The context of an ordinary, one-process run."""
    return DistributedContext(rank=0, world_size=1, device=device)


def init_distributed(device: str, timeout_seconds: float) -> DistributedContext:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA, one GPU per local rank).

    Collectives that wait longer than `timeout_seconds` (a dead or hung rank) raise instead of hanging.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise EvoxMergeError(
            "distributed: true needs a torchrun launch, e.g. `torchrun --nproc-per-node 2 -m evox_merge.cli search "
            "CONFIG` (RANK/WORLD_SIZE are not set)"
        )
    use_cuda = device.startswith("cuda")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_seconds))
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)
