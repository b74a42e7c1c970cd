"""Precision of a training run and its micro-batch fitted to memory (the OOM fallback)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import torch

from scgpt_vcc.errors import InputError
from scgpt_vcc.model.device import autocast_dtype
from scgpt_vcc.train import ddp
from scgpt_vcc.train.batches import Batch, PerturbationCells, StepPlan, TrainSteps
from scgpt_vcc.train.config import TrainConfig

log = logging.getLogger(__name__)


def resolve_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of a run, or None for fp32 (see ``model.device.autocast_dtype``)."""
    return autocast_dtype(cfg.precision if cfg.amp else "fp32", device, cpu_amp=cfg.cpu_amp)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; no autocast for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def fit_micro_batch(
    try_step: Callable[[int], None], micro_batch: int, accumulation: int
) -> tuple[int, int]:
    """Largest micro-batch (halving from ``micro_batch``) whose trial step fits in memory.

    Each halving doubles the accumulation, so the effective batch stays the same. Raises
    the last out-of-memory error when even a single cell does not fit.
    """
    while True:
        try:
            try_step(micro_batch)
            return micro_batch, accumulation
        except torch.OutOfMemoryError:
            if micro_batch == 1:
                raise
            if micro_batch % 2:
                raise InputError(
                    "config",
                    "train.batch_size",
                    f"micro-batch {micro_batch} does not fit in GPU memory and cannot be halved",
                    "use a power of two, or a smaller batch_size with a larger accumulation",
                ) from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning(
                "CUDA out of memory with micro-batch %d: retrying with micro-batch %d and "
                "accumulation %d (effective batch unchanged)",
                micro_batch,
                micro_batch // 2,
                accumulation * 2,
            )
            micro_batch //= 2
            accumulation *= 2


def probe_micro_batch(
    cells: PerturbationCells,
    train_rows: np.ndarray,
    cfg: TrainConfig,
    ctx: ddp.DistContext,
    trial_step: Callable[[Batch], None],
) -> tuple[int, int]:
    """Micro-batch and accumulation of a run that fit in memory.

    :func:`fit_micro_batch` with ``trial_step`` (forward and backward) on the run's first
    cells; all processes take the smallest micro-batch.
    """
    plan = StepPlan(cfg.seed, cfg.batch_size, cfg.accumulation, ctx.world_size)
    if plan.steps_per_epoch(len(train_rows)) == 0:
        raise InputError(
            cells.path,
            "training cells",
            f"{len(train_rows)} cells are fewer than one effective batch ({plan.effective_batch})",
            "lower train.batch_size or train.accumulation",
        )
    # The first step's cells at full micro-batch size and sequence length.
    full = TrainSteps(cells, train_rows, plan, 0, 0, cfg.max_seq_len)[0]

    def try_step(micro: int) -> None:
        trial_step(
            Batch(
                full.gene_ids,
                full.values[:micro],
                full.target[:micro],
                full.pert_flags[:micro],
                full.rows[:micro],
                full.measured,
            )
        )

    micro, accum = fit_micro_batch(try_step, cfg.batch_size, cfg.accumulation)
    if ctx.distributed:
        micro = int(ddp.all_reduce(micro, ctx, "min"))
        accum = cfg.batch_size * cfg.accumulation // micro
    return micro, accum
