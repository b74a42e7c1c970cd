"""An oracle model for the submission path: it predicts the true held-out cells."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np

from scgpt_vcc.predict.population import ControlReference, PopulationMean


class TruthModel:
    """Serves each perturbation's true cells (raw counts in ``truth``), normalised to
    ``target_sum`` (the training data's depth, the scale models predict on) and log1p'd."""

    def __init__(self, truth: str | Path, target_sum: float) -> None:
        raw = ad.read_h5ad(truth)
        counts = raw.X.toarray()
        labels = raw.obs["target_gene"].astype(str).to_numpy()
        self.cells_of = {}
        for gene in np.unique(labels):
            group = counts[labels == gene]
            normalised = group / group.sum(axis=1, keepdims=True) * target_sum
            self.cells_of[gene] = np.log1p(normalised).astype(np.float32)
        self._served: dict[str, int] = {}

    def cells(self, control: np.ndarray, targets: Sequence[str]) -> np.ndarray:
        """The next ``len(control)`` true cells of the target, in file order."""
        start = self._served.get(targets[0], 0)
        self._served[targets[0]] = start + control.shape[0]
        return self.cells_of[targets[0]][start : start + control.shape[0]]

    def population_mean(
        self, targets: Sequence[str], reference: ControlReference
    ) -> PopulationMean:
        return PopulationMean(self.cells_of[targets[0]].mean(axis=0, dtype=np.float64))
