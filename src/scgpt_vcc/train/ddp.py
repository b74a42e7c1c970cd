"""Multi-process training: torch.distributed set-up from torchrun or SLURM ``srun``.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``;
``srun`` sets ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` and the first node of
``SLURM_JOB_NODELIST`` becomes the rendezvous host. One process per GPU (NCCL); without
GPUs the gloo backend runs the same code on CPU processes, which is how the tests check it.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scgpt_vcc.model.device import pick_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _launcher_env() -> tuple[int, int, int] | None:
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
    return None


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST", "localhost")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0]


def setup(requested_device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun/srun with more than one process."""
    launched = _launcher_env()
    if launched is None or launched[1] == 1:
        return DistContext(device=pick_device(requested_device))
    rank, world_size, local_rank = launched
    os.environ.setdefault("MASTER_ADDR", _slurm_master())
    os.environ.setdefault("MASTER_PORT", "29500")
    device = pick_device(requested_device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    log.info("process %d of %d (%s backend) on %s", rank, world_size, backend, device)
    return DistContext(rank, world_size, local_rank, device)


def teardown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(value: float | int, ctx: DistContext, op: str = "sum") -> float:
    """Reduce a Python number over all processes (identity in a single process)."""
    if not ctx.distributed:
        return value
    device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return float(t.item())


def average(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of a tensor over all processes (itself in a single process)."""
    if not ctx.distributed:
        return values
    device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    total = values.to(device, torch.float64)
    dist.all_reduce(total)
    return total / ctx.world_size


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
