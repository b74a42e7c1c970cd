"""Epoch selection: the selection metric and validation Pearson-delta."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from scgpt_vcc.data.gears import CONTROL
from scgpt_vcc.errors import InputError
from scgpt_vcc.stats import pearson
from scgpt_vcc.train.batches import Batch, PerturbationCells
from scgpt_vcc.train.precision import autocast


def resolve_selection(selection: str, val_conditions: list[str]) -> str:
    """The metric that selects the best epoch: ``auto`` is validation when there is any."""
    if selection == "auto":
        selection = "val_pearson_delta" if val_conditions else "train_loss"
    if selection == "val_pearson_delta" and not val_conditions:
        raise InputError(
            "config",
            "train.selection",
            "is val_pearson_delta but the split has no validation conditions",
            "use selection: train_loss (or auto), or a split with a 'val' set",
        )
    return selection


def improves(selection: str, value: float, best: float | None) -> bool:
    """Whether ``value`` beats the best so far: a lower loss, a higher Pearson-delta."""
    return best is None or (value < best if selection == "train_loss" else value > best)


@torch.no_grad()
def condition_means(
    model: nn.Module,
    cells: PerturbationCells,
    rows: np.ndarray,
    batches: Iterable[Batch],
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Means of predicted and true expression over ``rows``, all genes, per (condition,
    context) group present, and each group's context code.

    ``batches`` are the evaluation batches of ``rows`` (host tensors).
    """
    n_contexts = len(cells.contexts)
    group_of_row = cells.cond_code.astype(np.int64) * n_contexts + cells.context_code
    groups = np.unique(group_of_row[rows])
    slot = np.full(len(cells.conditions) * n_contexts, -1)
    slot[groups] = np.arange(len(groups))
    shape = (len(groups), cells.n_input_genes)
    pred_sum, true_sum, count = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
    model.eval()
    for batch in batches:
        gpu = batch.to(device)
        with autocast(device, dtype):
            pred = model(gpu.gene_ids.expand(gpu.n_cells, -1), gpu.values, gpu.pert_flags)
        keep = batch.measured  # virtual inputs (unmeasured targets) have no truth
        pred = pred.float().cpu().double()[:, keep]
        genes = torch.as_tensor(cells.gene_index(batch.gene_ids[keep]))
        which = torch.as_tensor(slot[group_of_row[batch.rows.numpy()]])
        for s in which.unique():
            chosen = which == s
            pred_sum[s, genes] += pred[chosen].sum(0)
            true_sum[s, genes] += batch.target[chosen][:, keep].double().sum(0)
            count[s, genes] += float(chosen.sum())
    return pred_sum / count, true_sum / count, groups % n_contexts


def control_means(cells: PerturbationCells) -> torch.Tensor:
    """Mean expression of each context's control cells, all input genes: [contexts, genes]."""
    genes = np.arange(cells.n_input_genes)
    means = torch.zeros((len(cells.contexts), cells.n_input_genes), dtype=torch.float64)
    controls = cells.rows_of([CONTROL])
    for code in range(len(cells.contexts)):
        rows = controls[cells.context_code[controls] == code]
        for start in range(0, len(rows), 1024):
            means[code] += cells.build(rows[start : start + 1024], genes).target.double().sum(0)
        means[code] /= max(len(rows), 1)
    return means


def pearson_delta(
    pred: torch.Tensor, true: torch.Tensor, ctrl: torch.Tensor, group_context: np.ndarray
) -> float:
    """Pearson(pred - ctrl, true - ctrl) of each (condition, context) group against its
    context's controls, averaged over a context's groups and then over contexts (each context
    weighted equally, as the evaluation does); undefined ones skipped. Pooling contexts would
    let a condition's mix of contexts, unlike the controls', pass for an effect."""
    per_group = np.array(
        [
            pearson((p - ctrl[c]).numpy(), (t - ctrl[c]).numpy(), undefined=np.nan)
            for p, t, c in zip(pred, true, group_context, strict=True)
        ]
    )
    defined = np.isfinite(per_group)
    per_context = [
        per_group[defined & (group_context == c)].mean() for c in np.unique(group_context[defined])
    ]
    return float(np.mean(per_context)) if per_context else float("nan")
