"""The Trainer: one finetuning run's steps, resume, epoch selection and divergence stop."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from scgpt_vcc.errors import InputError
from scgpt_vcc.model.device import compiles, enable_tf32, precision_name
from scgpt_vcc.train import ddp
from scgpt_vcc.train.batches import Batch, EvalBatches, PerturbationCells, StepPlan, TrainSteps
from scgpt_vcc.train.config import TrainConfig
from scgpt_vcc.train.outputs import write_metrics
from scgpt_vcc.train.precision import autocast, probe_micro_batch, resolve_precision
from scgpt_vcc.train.state import RESUME_DIR, RunState, load_resume, save_resume
from scgpt_vcc.train.validation import (
    condition_means,
    control_means,
    improves,
    pearson_delta,
    resolve_selection,
)

log = logging.getLogger(__name__)

# Optimiser steps between reads of the loss from the device (each read waits for the GPU).
LOSS_READ_STEPS = 25


class Trainer:
    """One finetuning run; see :func:`scgpt_vcc.train.loop.finetune`."""

    def __init__(
        self,
        cells: PerturbationCells,
        train_rows: np.ndarray,
        val_conditions: list[str],
        model: nn.Module,
        cfg: TrainConfig,
        ctx: ddp.DistContext,
        outdir: Path,
        fingerprint: str,
    ) -> None:
        self.cells = cells
        self.train_rows = train_rows
        self.val_conditions = val_conditions
        self.cfg = cfg
        self.ctx = ctx
        self.outdir = outdir
        self.fingerprint = fingerprint
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The fused step: one kernel for all parameters instead of several per tensor.
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, fused=ctx.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, gamma=cfg.gamma)
        self.dtype = resolve_precision(cfg, ctx.device)
        self.scaler = torch.amp.GradScaler(
            ctx.device.type, enabled=self.dtype == torch.float16 and ctx.device.type == "cuda"
        )
        self.state = RunState()
        self.selection = resolve_selection(cfg.selection, val_conditions)
        self.ddp_model: nn.Module = model
        self._ctrl_means: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, list[int]]] = []
        self._steps_this_run = 0
        self.compiled = compiles(cfg.compile, ctx.device)
        enable_tf32(ctx.device)

    # -- state ----------------------------------------------------------------------------

    @property
    def resume_path(self) -> Path:
        return self.outdir / RESUME_DIR / "state.pt"

    def _resume_parts(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
        }

    def save_state(self, best_state: dict[str, torch.Tensor] | None) -> None:
        if self.ctx.is_main:
            save_resume(
                self.resume_path, self.fingerprint, self.state, best_state, self._resume_parts()
            )

    def load_state(self) -> dict[str, torch.Tensor] | None:
        """Restore a saved state of this same run; returns its best-model weights."""
        restored = load_resume(self.resume_path, self.fingerprint, self._resume_parts())
        if restored is None:
            return None
        self.state, best_state = restored
        log.info(
            "resuming from %s at epoch %d, step %d",
            self.resume_path,
            self.state.epoch + 1,
            self.state.step,
        )
        return best_state

    # -- steps ----------------------------------------------------------------------------

    def plan(self) -> StepPlan:
        return StepPlan(
            self.cfg.seed,
            self.state.micro_batch,
            self.state.accumulation,
            self.ctx.world_size,
            self.ctx.rank,
        )

    def _micro_loss(self, batch: Batch) -> torch.Tensor:
        """MSE over the measured genes (virtual inputs, unmeasured targets, have no truth)."""
        all_measured = bool(batch.measured.all())  # host tensor: no device sync
        batch = batch.to(self.ctx.device)
        gene_ids = batch.gene_ids.expand(batch.n_cells, -1)
        with autocast(self.ctx.device, self.dtype):
            pred = self.ddp_model(gene_ids, batch.values, batch.pert_flags)
        if all_measured:
            return F.mse_loss(pred.float(), batch.target)
        keep = batch.measured
        return F.mse_loss(pred.float()[:, keep], batch.target[:, keep])

    def probe_memory(self) -> None:
        """Fit the micro-batch to memory (:func:`.precision.fit_micro_batch`) by trial steps."""

        def trial_step(batch: Batch) -> None:
            self._micro_loss(batch).backward()
            self.model.zero_grad(set_to_none=True)

        self.state.micro_batch, self.state.accumulation = probe_micro_batch(
            self.cells, self.train_rows, self.cfg, self.ctx, trial_step
        )

    def _loader(self, dataset: torch.utils.data.Dataset) -> Iterator[Batch]:
        workers = self.cfg.workers if len(dataset) > 1 else 0
        return iter(
            torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                shuffle=False,
                num_workers=workers,
                pin_memory=self.ctx.device.type == "cuda",
                prefetch_factor=4 if workers else None,
            )
        )

    def train_epoch(self, epoch: int, bar: tqdm, best: Callable[[], Any]) -> bool:
        """Run the remaining steps of ``epoch``; False when ``max_steps`` stopped the run.

        Step losses stay on the device and are read every ``LOSS_READ_STEPS`` steps and
        before anything is saved, so a step never waits for the GPU; a non-finite loss
        still stops the run before a diverged model can be written.
        """
        cfg, state, plan = self.cfg, self.state, self.plan()
        steps = TrainSteps(self.cells, self.train_rows, plan, epoch, state.step, cfg.max_seq_len)
        batches = self._loader(steps)
        self.model.train()
        for _ in range(steps.n_steps):
            if cfg.max_steps is not None and self._steps_this_run >= cfg.max_steps:
                self._read_losses(epoch, bar)
                self.save_state(best())
                return False
            torch.manual_seed(_step_seed(cfg.seed, epoch, state.step, self.ctx.rank))
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=self.ctx.device)
            bad_rows: list[int] = []
            for j in range(plan.accumulation):
                last = j == plan.accumulation - 1
                sync = contextlib.nullcontext()
                if self.ctx.distributed and not last:
                    sync = self.ddp_model.no_sync()
                with sync:
                    batch = next(batches)
                    bad_rows += _non_finite_rows(batch)  # the host copy: no device sync
                    loss = self._micro_loss(batch)
                    self.scaler.scale(loss / plan.accumulation).backward()
                step_loss += loss.detach() / plan.accumulation
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._pending.append((step_loss, bad_rows))
            state.step += 1
            self._steps_this_run += 1
            bar.update(plan.effective_batch)
            every = cfg.checkpoint_every_steps
            saving = every and state.step % every == 0
            if saving or len(self._pending) == LOSS_READ_STEPS:
                self._read_losses(epoch, bar)
            if saving and state.step < steps.n_steps + steps.start_step:
                self.save_state(best())
        self._read_losses(epoch, bar)
        return True

    def _read_losses(self, epoch: int, bar: tqdm) -> None:
        """Bring the pending step losses to the host (one sync), averaged over processes."""
        if not self._pending:
            return
        state = self.state
        losses = ddp.average(torch.stack([loss for loss, _ in self._pending]), self.ctx)
        first_step = state.step - len(self._pending)
        bad_rows = [rows for _, rows in self._pending]
        for k, value in enumerate(losses.tolist()):
            if not math.isfinite(value):
                self._diverged(value, epoch, first_step + k, bad_rows[k])
            state.loss_sum += value
            state.loss_steps += 1
            state.step_rows.append({"epoch": epoch + 1, "step": first_step + k + 1, "loss": value})
        self._pending.clear()
        bar.set_postfix(loss=f"{state.step_rows[-1]['loss']:.4f}", epoch=epoch + 1)

    def _diverged(self, loss: float, epoch: int, step: int, bad_rows: list[int]) -> NoReturn:
        """Stop on a NaN/inf loss, before anything is saved, naming the likely cause."""
        where = f"the training loss became {loss} at epoch {epoch + 1}, step {step + 1}"
        if bad_rows:
            raise InputError(
                self.cells.path,
                "X",
                f"NaN or inf in cells (rows {sorted(set(bad_rows))[:10]}) or their paired "
                f"controls; {where}",
                "re-run convert-to-gears on raw counts without NaN/inf (it refuses them) and "
                "the steps after it; no model was saved",
            )
        precision = precision_name(self.dtype)
        raise InputError(
            "config",
            "train.lr/train.precision",
            f"{where} (lr {self.optimizer.param_groups[0]['lr']:g}, precision {precision}, "
            f"grad_clip {self.cfg.grad_clip:g}): training diverged",
            "lower train.lr (e.g. 10x); with fp16 use bf16 (Ampere GPUs such as the A40) or "
            "fp32, since fp16 overflows above 65504; best_model.pt was not written",
        )

    # -- validation -------------------------------------------------------------------------

    def validate(self) -> float:
        """Mean over validation conditions of Pearson(pred - ctrl, true - ctrl), all genes,
        within each cell context (:func:`~scgpt_vcc.train.validation.pearson_delta`)."""
        rows = self.cells.rows_of(self.val_conditions)
        batches = EvalBatches(self.cells, rows, self.cfg.eval_batch_size, self.cfg.max_seq_len)
        pred, true, group_context = condition_means(
            self.model, self.cells, rows, self._loader(batches), self.ctx.device, self.dtype
        )
        if self._ctrl_means is None:
            self._ctrl_means = control_means(self.cells)
        return pearson_delta(pred, true, self._ctrl_means, group_context)

    # -- run ------------------------------------------------------------------------------

    def run(self) -> dict[str, torch.Tensor]:
        """Train to the end (or early stop); returns the selected model's weights."""
        best_state = self.load_state()
        cfg, state = self.cfg, self.state
        if state.micro_batch == 0:
            self.probe_memory()
        if self.ctx.distributed:
            self.ddp_model = DistributedDataParallel(
                self.model,
                device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None,
            )
        if self.compiled:
            # Training steps only (fixed shapes); state dicts and validation use the module.
            self.ddp_model = torch.compile(self.ddp_model)
        plan = self.plan()
        self._log_setup(plan)
        steps_per_epoch = plan.steps_per_epoch(len(self.train_rows))
        done = state.epoch * steps_per_epoch + state.step
        bar = tqdm(
            total=cfg.epochs * steps_per_epoch * plan.effective_batch,
            initial=done * plan.effective_batch,
            unit="cells",
            unit_scale=True,
            desc="finetune",
            disable=not self.ctx.is_main,
            smoothing=0.1,
        )

        def best() -> dict[str, torch.Tensor] | None:
            return best_state

        with bar:
            while state.epoch < cfg.epochs and not state.stopped_early:
                started = time.perf_counter()
                cells_before = bar.n
                if not self.train_epoch(state.epoch, bar, best):
                    log.info("stopping after %d steps (max_steps); rerun to resume", cfg.max_steps)
                    return best_state or {}
                seconds = time.perf_counter() - started
                if self._end_epoch(seconds, (bar.n - cells_before) / max(seconds, 1e-9)):
                    best_state = {
                        k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                    }
                self.save_state(best_state)
        return best_state or {}

    def _end_epoch(self, seconds: float, cells_per_s: float) -> bool:
        """Record metrics, update early stopping; True when this epoch is the new best."""
        state = self.state
        epoch = state.epoch + 1
        train_loss = state.loss_sum / max(state.loss_steps, 1)
        val = self.validate() if self.val_conditions else float("nan")
        value = train_loss if self.selection == "train_loss" else val
        better = improves(self.selection, value, state.best_value)
        if better:
            state.best_value, state.best_epoch, state.bad_epochs = value, epoch, 0
        else:
            state.bad_epochs += 1
        lr = self.optimizer.param_groups[0]["lr"]
        state.epoch_rows.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_pearson_delta": val,
                "lr": lr,
                "seconds": seconds,
                "cells_per_s": cells_per_s,
                "best": better,
            }
        )
        log.info(
            "epoch %d: train_loss %.5f, val_pearson_delta %.4f, lr %.3g, %.1f s, %.0f cells/s%s",
            epoch,
            train_loss,
            val,
            lr,
            seconds,
            cells_per_s,
            " (best)" if better else "",
        )
        self.scheduler.step()
        state.epoch, state.step, state.loss_sum, state.loss_steps = epoch, 0, 0.0, 0
        if state.bad_epochs >= self.cfg.patience:
            log.info(
                "early stop: no improvement of %s for %d epochs", self.selection, state.bad_epochs
            )
            state.stopped_early = True
        if self.ctx.is_main:
            write_metrics(self.outdir, state)
        return better

    def _log_setup(self, plan: StepPlan) -> None:
        device = self.ctx.device
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
        log.info(
            "device %s (%s), gpu_class %s, processes %d, precision %s, grad scaler %s, compiled %s",
            device,
            gpu,
            self.cfg.gpu_class or "unset",
            self.ctx.world_size,
            precision_name(self.dtype),
            self.scaler.is_enabled(),
            self.compiled,
        )
        log.info(
            "batch_size %d, accumulation %d, effective batch %d (= %d x %d x %d processes); "
            "%d training cells, %d steps per epoch, max_seq_len %d of %d input genes; "
            "selection on %s",
            plan.micro_batch,
            plan.accumulation,
            plan.effective_batch,
            plan.micro_batch,
            plan.accumulation,
            self.ctx.world_size,
            len(self.train_rows),
            plan.steps_per_epoch(len(self.train_rows)),
            self.cfg.max_seq_len,
            self.cells.n_input_genes,
            self.selection,
        )


def _non_finite_rows(batch: Batch) -> list[int]:
    """h5ad rows of the cells whose expression or paired control holds NaN or inf."""
    finite = torch.isfinite(batch.values).all(1) & torch.isfinite(batch.target).all(1)
    if bool(finite.all()):
        return []
    return batch.rows[~finite].tolist()


def _step_seed(*key: int) -> int:
    """Torch seed of one optimiser step: dropout is the same in a resumed run."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])
