"""Every model's cells have the model's own population mean as their pseudobulk.

A model makes one cell from each input control cell, so the pseudobulk of a perturbation's
cells would be the model's response averaged over a random draw of control cells: that
draw's sampling noise would enter every pseudobulk metric, while a constant prediction
(``train_mean``) has none. Every model therefore also states its *population mean*, its
prediction for the whole control population (:class:`CellModel`), and each perturbation's
cells are rescaled, gene by gene, to have exactly that mean (:func:`match_mean`):
``cell_i = max(f(x_i), 0) * mu / mean_j max(f(x_j), 0)``. A multiplicative rescale keeps
every zero a zero, so the cells keep the model's own sparsity and cell-to-cell spread (DES
tests cells, rank-based, against the controls; shifting zeros would make them differ from
the controls' zeros). ``mu`` is clipped at 0 (log1p expression cannot be negative), and
negative predicted values are set to 0 before the rescale, so clipping never moves the mean;
both are counted. A gene whose cells are all 0 while ``mu > 0`` gets ``mu`` in every cell.

Docs: docs/metrics.md, "Predicted cells".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from scgpt_vcc.predict.cells import ExpressionData, Group

log = logging.getLogger(__name__)


def row_batches(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """``rows`` in consecutive pieces of ``size``."""
    for start in range(0, rows.size, size):
        yield rows[start : start + size]


@dataclass(frozen=True)
class ControlReference:
    """The control population that every model's population mean refers to.

    ``mean`` is the mean of *all* control cells; ``rows`` are the reference control cells
    a model without a closed form (scGPT) is averaged over: drawn once per seed, so the
    same for every perturbation and every model of that seed.
    """

    data: ExpressionData
    rows: np.ndarray
    mean: np.ndarray  # float64 [genes]
    batch_size: int = 256

    def batches(self) -> Iterator[np.ndarray]:
        """Expression of the reference cells, ``batch_size`` cells at a time."""
        for rows in row_batches(self.rows, self.batch_size):
            yield self.data.read(rows)


def control_reference(
    data: ExpressionData, n_cells: int | None, seed: int, batch_size: int = 256
) -> ControlReference:
    """All controls' mean and ``n_cells`` reference controls (all when ``None``), seeded."""
    controls = data.control_rows
    total = np.zeros(data.n_genes)
    for rows in row_batches(controls, max(batch_size, 1024)):
        total += data.read(rows).sum(axis=0, dtype=np.float64)
    if n_cells is None or n_cells >= controls.size:
        rows = controls
    else:
        rows = np.sort(np.random.default_rng([seed, 3]).choice(controls, n_cells, replace=False))
    return ControlReference(data, rows, total / controls.size, batch_size)


@dataclass(frozen=True)
class PopulationMean:
    """A model's prediction for the whole control population (log1p scale, per gene).

    ``redraw_deviation``: for estimated means, the largest change over genes expected
    from drawing the reference controls anew (measured by splitting them in halves);
    ``None`` where the mean is exact.
    """

    values: np.ndarray
    redraw_deviation: float | None = None


class CellModel(Protocol):
    """What a model must provide for its cells to be written (see the module docstring)."""

    def cells(self, control: np.ndarray, targets: Sequence[str]) -> np.ndarray:
        """One predicted cell [n, genes] per control cell [n, genes] for ``targets``."""
        ...

    def population_mean(
        self, targets: Sequence[str], reference: ControlReference
    ) -> PopulationMean:
        """The model's prediction for the whole control population of ``reference``."""
        ...


def match_mean(cells: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, int, int]:
    """``cells`` rescaled per gene to have the mean ``max(mean, 0)``, with no value below 0.

    Negative values are set to 0 first; then each gene is multiplied by the factor that
    gives its mean, so zeros stay zeros. A gene with no positive value but a positive mean
    gets the mean in every cell. Returns the cells (float32), the number of negative values
    set to 0 and the number of genes filled with their mean.
    """
    target = np.maximum(mean, 0.0)
    negative = int((cells < 0).sum())
    clipped = np.maximum(cells, 0.0, dtype=np.float64)
    current = clipped.mean(axis=0)
    scale = np.divide(target, current, out=np.zeros_like(target), where=current > 0)
    out = clipped * scale
    filled = (current <= 0) & (target > 0)
    out[:, filled] = target[filled]
    return out.astype(np.float32), negative, int(filled.sum())


@dataclass
class Diagnostics:
    """What the construction did, per perturbation (stored in the prediction file's uns)."""

    clipped_mean_genes: dict[str, int] = field(default_factory=dict)
    clipped_values: dict[str, int] = field(default_factory=dict)
    filled_genes: dict[str, int] = field(default_factory=dict)
    redraw_deviation: dict[str, float] = field(default_factory=dict)

    def as_uns(self) -> dict[str, Any]:
        redraw = list(self.redraw_deviation.values())
        return {
            "clipped_mean_genes": self.clipped_mean_genes,
            "clipped_values": self.clipped_values,
            "filled_genes": self.filled_genes,
            **({"redraw_deviation": self.redraw_deviation} if redraw else {}),
            **({"max_redraw_deviation": max(redraw)} if redraw else {}),
        }


# Largest acceptable change of any gene's pseudobulk when the reference controls are drawn
# anew; above it the log asks for more reference cells.
MAX_REDRAW_DEVIATION = 0.01


@dataclass(frozen=True)
class ContextModel:
    """A model and the control population of the context it predicts."""

    model: CellModel
    reference: ControlReference


def population_means(
    models: Mapping[str | None, ContextModel], groups: Sequence[Group]
) -> tuple[dict[str, np.ndarray], Diagnostics]:
    """Each group's population mean (clipped at 0), by the model of its context, keyed by
    ``group.label``; and what clipping and estimation did."""
    means, diagnostics = {}, Diagnostics()
    for group in tqdm(groups, desc="population means", unit="perturbation"):
        model, reference = models[group.context].model, models[group.context].reference
        estimate = model.population_mean(group.targets, reference)
        means[group.label] = np.maximum(estimate.values, 0.0)
        diagnostics.clipped_mean_genes[group.label] = int((estimate.values < 0).sum())
        if estimate.redraw_deviation is not None:
            diagnostics.redraw_deviation[group.label] = estimate.redraw_deviation
            if estimate.redraw_deviation > MAX_REDRAW_DEVIATION:
                log.warning(
                    "%s: drawing the %d reference controls anew would move a gene's "
                    "pseudobulk by up to %.4f (> %.2f); raise predict.n_reference_cells",
                    group.label,
                    reference.rows.size,
                    estimate.redraw_deviation,
                    MAX_REDRAW_DEVIATION,
                )
    clipped = sum(diagnostics.clipped_mean_genes.values())
    if clipped:
        log.info("population means below 0 clipped to 0 in %d (perturbation, gene) pairs", clipped)
    return means, diagnostics
