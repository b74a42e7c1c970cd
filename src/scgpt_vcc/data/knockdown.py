"""Knockdown of each cell's target gene, per guide and perturbation, and the optional filter
of failed knockdowns (thresholds as Arc's cell-load).

On the count scale: a cell's target expression is its count of the target gene divided by
its total count; the *residual* is that over the control cells' mean of the same quantity
(0 = no transcript left, 1 = as in controls), and knockdown = 1 - residual. Targets that
are not measured genes have none.

The filter (off by default; cell-load's thresholds are 0.30, 0.50 and 30 cells) runs in
three steps: perturbations whose mean residual exceeds ``max_perturbation_residual`` go
(the guide failed), then cells whose own residual exceeds ``max_cell_residual`` (the cell
escaped the knockdown), then perturbations left with fewer than ``min_cells`` cells.
Perturbations whose target is not measured are never filtered: nothing can be read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)

# obs column naming each cell's guide in the VCC file (and most Perturb-seq files).
GUIDE_COLUMN = "guide_id"
# A guide whose target keeps more than this of its control expression is reported as weak
# (cell-load's perturbation threshold).
WEAK_RESIDUAL = 0.30


@dataclass(frozen=True)
class KnockdownFilter:
    max_perturbation_residual: float | None = None
    max_cell_residual: float | None = None
    min_cells: int = 30

    @property
    def enabled(self) -> bool:
        return self.max_perturbation_residual is not None or self.max_cell_residual is not None


class TargetExpression:
    """Accumulates, chunk by chunk, each cell's target fraction and the controls' fractions
    of every target gene.

    ``target_column[i]``: X column of cell ``i``'s target (-1: a control, or not measured).
    """

    def __init__(self, target_column: np.ndarray, is_control: np.ndarray) -> None:
        self.target_column = target_column
        self.is_control = is_control
        self.columns = np.unique(target_column[target_column >= 0])
        self.fraction = np.full(len(target_column), np.nan)
        self.control_sum = np.zeros(len(self.columns))

    def add(self, start: int, counts: sp.csr_matrix, totals: np.ndarray) -> None:
        stop = start + counts.shape[0]
        scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
        cells = np.flatnonzero(self.target_column[start:stop] >= 0)
        if cells.size:
            values = counts[cells, self.target_column[start:stop][cells]]
            self.fraction[start + cells] = np.asarray(values).ravel() * scale[cells]
        controls = np.flatnonzero(self.is_control[start:stop])
        if controls.size and self.columns.size:
            block = counts[controls][:, self.columns].multiply(scale[controls][:, None])
            self.control_sum += np.asarray(block.sum(axis=0)).ravel()

    def residuals(self, counted: np.ndarray) -> np.ndarray:
        """Per cell: target fraction over the mean fraction of the ``counted`` controls
        (NaN without a measured target)."""
        control_mean = self.control_sum / max(int((self.is_control & counted).sum()), 1)
        mean_of = np.full(int(self.target_column.max(initial=-1)) + 1, np.nan)
        mean_of[self.columns] = np.where(control_mean > 0, control_mean, np.nan)
        out = np.full(len(self.target_column), np.nan)
        has = self.target_column >= 0
        out[has] = self.fraction[has] / mean_of[self.target_column[has]]
        return out


def _by_group(labels: pd.Series, residual: np.ndarray, keep: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"label": labels.to_numpy(), "residual": residual})[keep]
    table = frame.groupby("label", observed=True)["residual"].agg(["size", "mean"])
    return table.rename(columns={"size": "n_cells", "mean": "residual"})


def knockdown_table(
    obs: pd.DataFrame, target: pd.Series, residual: np.ndarray, keep: np.ndarray
) -> pd.DataFrame:
    """Per guide (``obs.guide_id``; per target without it): target, cells, knockdown (NaN
    where the target is not measured, and for the controls)."""
    column = obs[GUIDE_COLUMN].astype(str) if GUIDE_COLUMN in obs else target.astype(str)
    cells = _by_group(column, residual, keep)
    means = _by_group(column, residual, keep & ~np.isnan(residual))["residual"]
    targets = pd.Series(target.to_numpy(), index=column.to_numpy()).groupby(level=0).first()
    return pd.DataFrame(
        {
            "guide": cells.index.astype(str),
            "target": targets.reindex(cells.index).astype(str).to_numpy(),
            "n_cells": cells["n_cells"].astype(np.int64).to_numpy(),
            "knockdown": 1 - means.reindex(cells.index).to_numpy(dtype=float),
        }
    )


def report_json(report: dict[str, Any]) -> str:
    """The filter's report as stored in ``uns`` (JSON text: h5ad cannot hold its shapes)."""
    return json.dumps(report, sort_keys=True)


def filter_knockdown(
    target: pd.Series, residual: np.ndarray, keep: np.ndarray, rule: KnockdownFilter
) -> tuple[np.ndarray, dict[str, Any]]:
    """``keep`` narrowed by ``rule`` (module doc), and what it removed."""
    report: dict[str, Any] = {"enabled": rule.enabled}
    if not rule.enabled:
        return keep, report
    keep = keep.copy()
    measured = ~np.isnan(residual)
    perturbation = _by_group(target, residual, keep & measured)["residual"]
    weak: dict[str, float] = {}
    if rule.max_perturbation_residual is not None:
        weak = {str(t): float(r) for t, r in perturbation.items()
                if r > rule.max_perturbation_residual}  # fmt: skip
        keep &= ~target.isin(list(weak)).to_numpy()
    escaped = np.zeros_like(keep)
    if rule.max_cell_residual is not None:
        escaped = keep & (residual > rule.max_cell_residual)  # NaN (no residual) stays
        keep &= ~escaped
    left = _by_group(target, residual, keep & measured)["n_cells"]
    left = left.reindex([t for t in perturbation.index if t not in weak], fill_value=0)
    too_few = sorted(str(t) for t, n in left.items() if n < rule.min_cells)
    keep &= ~(target.isin(too_few).to_numpy() & measured)
    report.update(
        perturbations_not_knocked_down=weak,
        cells_escaped=int(escaped.sum()),
        perturbations_below_min_cells=too_few,
        thresholds={k: v for k, v in asdict(rule).items() if v is not None},
    )
    log.warning(
        "knockdown filter: %d perturbations not knocked down (%s), %d cells escaped the "
        "knockdown, %d perturbations left with fewer than %d cells (%s)",
        len(weak), list(weak)[:10], int(escaped.sum()), len(too_few), rule.min_cells,
        too_few[:10],
    )  # fmt: skip
    return keep, report
