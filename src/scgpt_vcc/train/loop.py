"""Finetune scGPT's TransformerGenerator on perturbation data (the ``finetune`` step).

The recipe is the scGPT perturbation tutorial's (Adam, StepLR per epoch, MSE on a random
gene subset of each batch, mixed precision, gradient clipping), with its flaws fixed in
:mod:`scgpt_vcc.train.batches` and with what a cluster run needs:

* **Effective batch.** ``batch_size`` is the micro-batch of one process; gradients of
  ``accumulation`` micro-batches (and of all DDP processes) are summed before each step, so
  32 x 2 on a small GPU trains like 64 x 1 on a large one. A CUDA out-of-memory error in the
  first trial step halves the micro-batch and doubles the accumulation.
* **Resume.** ``resume/state.pt`` (model, optimiser, scheduler, scaler, counters, best
  model) is written atomically at every epoch end and every ``checkpoint_every_steps``
  steps. Data order and gene subsets depend only on (seed, epoch, step) and the random
  state is re-seeded per step, so a run killed and restarted ends with exactly the model of
  an uninterrupted run. The folder is deleted when the run finishes.
* **Selection.** The best epoch is chosen on the training loss when there is no validation
  set (the original setup) or on validation Pearson-delta (Pearson of predicted vs true
  mean change from the control mean, per condition, averaged); raw Pearson is ~0.99 for any
  model and useless for selection.
* **Divergence.** A NaN or inf step loss stops the run at once with an InputError that names
  the cause (NaN/inf in the data, else learning rate or precision); nothing is saved, so an
  earlier ``best_model.pt`` is never replaced by a broken one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from scgpt_vcc.data.gears import CONTROL, gene_symbols, read_split
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import atomic_path, read_annotations, save_figure
from scgpt_vcc.model.checkpoint import (
    ARGS_FILE,
    VOCAB_FILE,
    load_pretrained,
    read_args,
    read_vocab,
    save_checkpoint,
)
from scgpt_vcc.model.device import autocast_dtype, enable_tf32, precision_name
from scgpt_vcc.model.vocab import match_genes
from scgpt_vcc.stats import pearson
from scgpt_vcc.train import ddp
from scgpt_vcc.train.batches import (
    Batch,
    EvalBatches,
    PerturbationCells,
    StepPlan,
    TrainSteps,
)
from scgpt_vcc.train.config import TrainConfig

log = logging.getLogger(__name__)

RESUME_DIR = "resume"
# Optimiser steps between reads of the loss from the device (each read waits for the GPU).
LOSS_READ_STEPS = 25
# Settings that may change between a run and its resumption without invalidating it.
RESUME_FREE_FIELDS = (
    "max_steps", "workers", "device", "gpu_class", "checkpoint_every_steps", "compile"
)  # fmt: skip


# --------------------------------------------------------------------------- precision


def resolve_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of a run, or None for fp32 (see ``model.device.autocast_dtype``)."""
    return autocast_dtype(cfg.precision if cfg.amp else "fp32", device, cpu_amp=cfg.cpu_amp)


# --------------------------------------------------------------------------- OOM fallback


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


# --------------------------------------------------------------------------- training state


@dataclass
class RunState:
    """Everything beyond model/optimiser weights that a resumed run must restore."""

    epoch: int = 0
    step: int = 0
    micro_batch: int = 0
    accumulation: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0
    best_value: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    epoch_rows: list[dict[str, Any]] = field(default_factory=list)
    step_rows: list[dict[str, Any]] = field(default_factory=list)


def _fingerprint(cfg: TrainConfig, inputs: dict[str, str]) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE_FIELDS}
    blob = json.dumps({"cfg": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Trainer:
    """One finetuning run; see :func:`finetune`."""

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
        self.selection = cfg.selection
        if self.selection == "auto":
            self.selection = "val_pearson_delta" if val_conditions else "train_loss"
        if self.selection == "val_pearson_delta" and not val_conditions:
            raise InputError(
                "config",
                "train.selection",
                "is val_pearson_delta but the split has no validation conditions",
                "use selection: train_loss (or auto), or a split with a 'val' set",
            )
        self.ddp_model: nn.Module = model
        self._ctrl_mean: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, list[int]]] = []
        # torch.compile: 1.41x the cells/s of eager bf16 training on an H200 at the real size
        # (docs/benchmarks.md); on a CPU unmeasured and it needs a C++ compiler, so GPU only.
        self.compiled = cfg.compile and ctx.device.type == "cuda"
        enable_tf32(ctx.device)

    # -- state ----------------------------------------------------------------------------

    @property
    def resume_path(self) -> Path:
        return self.outdir / RESUME_DIR / "state.pt"

    def save_state(self, best_state: dict[str, torch.Tensor] | None) -> None:
        if not self.ctx.is_main:
            return
        payload = {
            "fingerprint": self.fingerprint,
            "run": asdict(self.state),
            "model": self.model.state_dict(),
            "best_model": best_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        with atomic_path(self.resume_path) as tmp:
            torch.save(payload, tmp)

    def load_state(self) -> dict[str, torch.Tensor] | None:
        """Restore a saved state of this same run; returns its best-model weights."""
        if not self.resume_path.exists():
            return None
        payload = torch.load(self.resume_path, map_location="cpu", weights_only=False)
        if payload.get("fingerprint") != self.fingerprint:
            log.warning("%s belongs to other settings or inputs; starting fresh", self.resume_path)
            return None
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.state = RunState(**payload["run"])
        log.info(
            "resuming from %s at epoch %d, step %d",
            self.resume_path,
            self.state.epoch + 1,
            self.state.step,
        )
        return payload["best_model"]

    # -- steps ----------------------------------------------------------------------------

    def plan(self) -> StepPlan:
        return StepPlan(
            self.cfg.seed,
            self.state.micro_batch,
            self.state.accumulation,
            self.ctx.world_size,
            self.ctx.rank,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.dtype)

    def _micro_loss(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.ctx.device)
        gene_ids = batch.gene_ids.expand(batch.n_cells, -1)
        with self._autocast():
            pred = self.ddp_model(gene_ids, batch.values, batch.pert_flags)
        return F.mse_loss(pred.float(), batch.target)

    def probe_memory(self) -> None:
        """Find a micro-batch that fits (see :func:`fit_micro_batch`) with a trial step."""
        cfg = self.cfg
        plan = StepPlan(cfg.seed, cfg.batch_size, cfg.accumulation, self.ctx.world_size)
        if plan.steps_per_epoch(len(self.train_rows)) == 0:
            raise InputError(
                self.cells.path,
                "training cells",
                f"{len(self.train_rows)} cells are fewer than one effective batch "
                f"({plan.effective_batch})",
                "lower train.batch_size or train.accumulation",
            )
        # The first step's cells at full micro-batch size and sequence length.
        full = TrainSteps(self.cells, self.train_rows, plan, 0, 0, cfg.max_seq_len)[0]

        def try_step(micro: int) -> None:
            batch = Batch(
                full.gene_ids,
                full.values[:micro],
                full.target[:micro],
                full.pert_flags[:micro],
                full.rows[:micro],
            )
            self._micro_loss(batch).backward()
            self.model.zero_grad(set_to_none=True)

        micro, accum = fit_micro_batch(try_step, cfg.batch_size, cfg.accumulation)
        if self.ctx.distributed:
            micro = int(ddp.all_reduce(micro, self.ctx, "min"))
            accum = cfg.batch_size * cfg.accumulation // micro
        self.state.micro_batch, self.state.accumulation = micro, accum

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

    @torch.no_grad()
    def _condition_means(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-condition means of predicted and true expression over ``rows``, all genes."""
        codes = np.unique(self.cells.cond_code[rows])
        slot = np.full(len(self.cells.conditions), -1)
        slot[codes] = np.arange(len(codes))
        shape = (len(codes), self.cells.n_input_genes)
        pred_sum, true_sum, count = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
        self.model.eval()
        batches = EvalBatches(self.cells, rows, self.cfg.eval_batch_size, self.cfg.max_seq_len)
        for batch in self._loader(batches):
            gpu = batch.to(self.ctx.device)
            with self._autocast():
                pred = self.model(gpu.gene_ids.expand(gpu.n_cells, -1), gpu.values, gpu.pert_flags)
            pred = pred.float().cpu().double()
            genes = torch.as_tensor(self.cells.gene_index(batch.gene_ids))
            which = torch.as_tensor(slot[self.cells.cond_code[batch.rows.numpy()]])
            for s in which.unique():
                cells = which == s
                pred_sum[s, genes] += pred[cells].sum(0)
                true_sum[s, genes] += batch.target[cells].double().sum(0)
                count[s, genes] += float(cells.sum())
        return pred_sum / count, true_sum / count

    def control_mean(self) -> torch.Tensor:
        if self._ctrl_mean is None:
            rows = self.cells.rows_of([CONTROL])
            total = torch.zeros(self.cells.n_input_genes, dtype=torch.float64)
            genes = np.arange(self.cells.n_input_genes)
            for start in range(0, len(rows), 1024):
                total += self.cells.build(rows[start : start + 1024], genes).target.double().sum(0)
            self._ctrl_mean = total / max(len(rows), 1)
        return self._ctrl_mean

    def validate(self) -> float:
        """Mean over validation conditions of Pearson(pred - ctrl, true - ctrl), all genes."""
        rows = self.cells.rows_of(self.val_conditions)
        pred, true = self._condition_means(rows)
        ctrl = self.control_mean()
        return float(
            np.nanmean(
                [
                    pearson((p - ctrl).numpy(), (t - ctrl).numpy(), undefined=np.nan)
                    for p, t in zip(pred, true, strict=True)
                ]
            )
        )

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
        self._steps_this_run = 0
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
        better = state.best_value is None or (
            value < state.best_value if self.selection == "train_loss" else value > state.best_value
        )
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


# --------------------------------------------------------------------------- outputs


def write_metrics(outdir: Path, state: RunState) -> None:
    """``metrics.csv`` (per epoch), ``steps.csv`` (per step) and ``loss_curve.png``."""
    epochs = pd.DataFrame(state.epoch_rows)
    steps = pd.DataFrame(state.step_rows, columns=["epoch", "step", "loss"])
    for name, frame in (("metrics.csv", epochs), ("steps.csv", steps)):
        with atomic_path(outdir / name) as tmp:
            frame.to_csv(tmp, index=False)
    plot_loss_curve(epochs, steps, outdir / "loss_curve.png")


def plot_loss_curve(epochs: pd.DataFrame, steps: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if len(steps):
        per_epoch = steps.groupby("epoch")["step"].transform("max")
        x = steps["epoch"] - 1 + steps["step"] / per_epoch
        ax.plot(x, steps["loss"], lw=0.6, alpha=0.5, label="step loss")
    if len(epochs):
        ax.plot(epochs["epoch"], epochs["train_loss"], "o-", label="epoch train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE")
    if len(epochs) and epochs["val_pearson_delta"].notna().any():
        ax2 = ax.twinx()
        ax2.plot(epochs["epoch"], epochs["val_pearson_delta"], "s--", c="C2")
        ax2.set_ylabel("validation Pearson-delta", color="C2")
    ax.legend(loc="upper right")
    fig.tight_layout()
    save_figure(fig, path, tight=False)


@contextlib.contextmanager
def _run_log(path: Path, enabled: bool) -> Iterator[None]:
    """Copy this package's log records to ``run.log`` (appended across resumptions)."""
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("scgpt_vcc")
    root.addHandler(handler)
    level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def finetune(
    data: str | Path,
    pairing: str | Path,
    checkpoint_dir: str | Path,
    outdir: str | Path,
    cfg: TrainConfig,
    split: str | Path | None = None,
) -> Path:
    """Finetune the checkpoint in ``checkpoint_dir`` on ``data``; write ``outdir``.

    Args:
        data: ``perturb_processed.h5ad`` (GEARS format, log1p CSR X).
        pairing: ``pairing_seed{N}.npz`` with the control row paired to each cell.
        checkpoint_dir: pretrained scGPT folder (args.json, vocab.json, best_model.pt).
        outdir: receives best_model.pt, args.json, vocab.json (loadable with
            :func:`scgpt_vcc.model.load_finetuned`), run.log,
            metrics.csv, steps.csv, loss_curve.png.
        cfg: training settings.
        split: GEARS split pickle; its 'train' conditions train and its 'val' conditions
            select the best epoch. ``None`` trains on every condition.

    Under torchrun/srun with several processes, every process calls this function.
    """
    outdir = Path(outdir)
    ctx = ddp.setup(cfg.device)
    try:
        with _run_log(outdir / "run.log", ctx.is_main):
            return _finetune(
                Path(data), Path(pairing), Path(checkpoint_dir), outdir, cfg, split, ctx
            )
    finally:
        ddp.teardown(ctx)


def _finetune(
    data: Path,
    pairing: Path,
    checkpoint_dir: Path,
    outdir: Path,
    cfg: TrainConfig,
    split_path: str | Path | None,
    ctx: ddp.DistContext,
) -> Path:
    log.info("finetune %s -> %s with %s", data, outdir, json.dumps(asdict(cfg), default=str))
    pretrained_args = read_args(checkpoint_dir / ARGS_FILE)
    vocab = read_vocab(checkpoint_dir / VOCAB_FILE, pretrained_args["pad_token"])
    _, var = read_annotations(data)
    genes = gene_symbols(var)
    cells = PerturbationCells(data, pairing, match_genes(list(genes), vocab))
    split = read_split(split_path)
    if split_path is not None and not split["train"]:
        raise InputError(
            split_path, "train", "is empty", "rebuild the split; an empty list never trains"
        )
    train_rows = cells.rows_of(split["train"] if split_path is not None else None)
    if train_rows.size == 0:
        raise InputError(
            split_path or data,
            "train",
            "has no cell the model can learn from (targets outside the vocabulary?)",
            "check the split and the vocabulary match in run.log",
        )
    val_conditions = [
        c for c in split["val"] if c in cells.conditions and c not in cells.unlearnable
    ]
    log.info(
        "split %s: %d training conditions (%d cells), %d validation conditions",
        Path(split_path).name if split_path is not None else "none (every condition trains)",
        len(set(split["train"])) if split_path is not None else len(cells.conditions),
        train_rows.size,
        len(val_conditions),
    )

    torch.manual_seed(cfg.seed)
    model = load_pretrained(
        checkpoint_dir, load_prefixes=cfg.load_prefixes, device=ctx.device, dropout=cfg.dropout
    )
    model.freeze_cls_head()

    inputs = {
        "data": str(data),
        "pairing": str(pairing),
        "checkpoint": str(checkpoint_dir),
        "split": str(split_path),
        "world_size": str(ctx.world_size),
    }
    trainer = Trainer(
        cells, train_rows, val_conditions, model, cfg, ctx, outdir, _fingerprint(cfg, inputs)
    )
    best_state = trainer.run()
    if (
        cfg.max_steps is not None
        and trainer.state.epoch < cfg.epochs
        and not trainer.state.stopped_early
    ):
        return outdir
    if ctx.is_main:
        model.load_state_dict(best_state)
        args = {
            **pretrained_args,
            "finetune": {
                **asdict(cfg),
                **inputs,
                "selection": trainer.selection,
                "best_epoch": trainer.state.best_epoch,
                "best_value": trainer.state.best_value,
            },
        }
        save_checkpoint(model, outdir, vocab, args)
        write_metrics(outdir, trainer.state)
        log.info(
            "best epoch %d (%s %.5f); wrote %s",
            trainer.state.best_epoch,
            trainer.selection,
            trainer.state.best_value,
            outdir,
        )
        trainer.resume_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            trainer.resume_path.parent.rmdir()
    ddp.barrier(ctx)
    return outdir


__all__ = [
    "TrainConfig",
    "finetune",
    "fit_micro_batch",
    "resolve_precision",
]
