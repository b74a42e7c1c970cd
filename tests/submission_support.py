"""The submission path in tests: an oracle model that predicts the true held-out cells, and
the workflow's scoring steps in one call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np

from scgpt_vcc.data.convert import convert_to_gears
from scgpt_vcc.evaluate.score import score_submission
from scgpt_vcc.predict.cells import ExpressionData
from scgpt_vcc.predict.population import ControlReference, PopulationMean
from scgpt_vcc.predict.run import PredictSettings
from scgpt_vcc.submission import SubmissionSettings, submission_model, write_submission_h5ad


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


def score_against_truth(
    submission: Path,
    truth_counts: Path,
    data_path: Path,
    split: Path,
    counts_csv: Path,
    gene_names: Path,
    output: Path,
    settings: SubmissionSettings,
    predict_settings: PredictSettings,
) -> dict:
    """What the workflow does after a submission on synthetic data: rule
    convert_submission_truth, train_mean's submission (rule submission_baseline), then
    rule score_submission."""
    folder = output.parent
    truth = folder / f"{output.stem}_truth.h5ad"
    convert_to_gears(truth_counts, truth, target_sum=None)
    baseline = folder / f"{output.stem}_train_mean.h5ad"
    base_settings = replace(settings, model_type="train_mean")
    data = ExpressionData(data_path)
    model = submission_model(data, split, base_settings, predict_settings)
    write_submission_h5ad(
        data, model, counts_csv, gene_names, baseline, base_settings, predict_settings
    )
    return score_submission(submission, baseline, truth, output, data.control_label)
