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
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from scgpt_vcc.data.gears import gene_symbols, perturbed_genes, read_split
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import read_annotations
from scgpt_vcc.model.checkpoint import (
    ARGS_FILE,
    VOCAB_FILE,
    read_args,
    read_vocab,
    save_checkpoint,
)
from scgpt_vcc.model.loading import load_pretrained
from scgpt_vcc.model.renames import read_renames
from scgpt_vcc.model.vocab import match_genes, unmeasured_tokens
from scgpt_vcc.train import ddp
from scgpt_vcc.train.batches import PerturbationCells
from scgpt_vcc.train.config import TrainConfig
from scgpt_vcc.train.outputs import run_log, write_metrics
from scgpt_vcc.train.state import settings_fingerprint
from scgpt_vcc.train.trainer import Trainer

log = logging.getLogger(__name__)


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
        with run_log(outdir / "run.log", ctx.is_main):
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
    obs, var = read_annotations(data)
    renames = read_renames(cfg.gene_renames)
    match = match_genes(list(gene_symbols(var)), vocab, renames=renames)
    targets = [g for c in obs["condition"].astype(str).unique() for g in perturbed_genes(c)]
    unmeasured = unmeasured_tokens(targets, match, vocab, renames)
    if unmeasured:
        log.info(
            "%d perturbation targets are not measured but in the vocabulary; they are fed "
            "as their token with the perturbation flag: %s",
            len(unmeasured),
            ", ".join(list(unmeasured)[:20]),
        )
    cells = PerturbationCells(data, pairing, match, unmeasured)
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
    fingerprint = settings_fingerprint(cfg, inputs)
    trainer = Trainer(cells, train_rows, val_conditions, model, cfg, ctx, outdir, fingerprint)
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


__all__ = ["TrainConfig", "finetune"]
