"""Baselines evaluated exactly like scGPT: ``control``, ``train_mean`` and ``linear``.

All three predict cells from the same control cells as scGPT (see :mod:`.cells`):

* ``control``: the control cell unchanged (no perturbation effect at all).
* ``train_mean``: the Virtual Cell Challenge's cell-mean baseline (cell-eval's
  ``build_base_mean_adata``): every predicted cell is the same vector, the mean over the
  training perturbations of each perturbation's mean expression,
  ``m = (1/|T|) sum_{p in T} mean_{cells of p}(x)``.
* ``linear``: the linear model of Ahlmann-Eltze, Huber & Anders (Nature Methods 2025), as
  their benchmark code fits it (``run_linear_pretrained_model.R``, defaults K = 10,
  lambda = 0.1). With ``X`` the genes x training-conditions matrix of pseudobulk means
  (control included as a condition) and ``c`` the control mean:

  - gene embedding ``G`` (genes x K): the top-K principal-component scores of the genes,
    PCA of ``X`` with each condition (column) centred;
  - perturbation embedding ``p_j = G[j]``: the embedding row of the perturbed gene
    (zero for control; the sum of rows for a multi-gene condition);
  - changes ``Y = X - c``, ``b = rowmean(Y)`` (over training conditions incl. control);
  - ``W = (G^T G + lambda I)^-1 G^T (Y - b) P^T (P P^T + lambda I)^-1``;
  - predicted mean for a new perturbation: ``c + b + G W p``.

  Cells are the paired control cells shifted by the predicted change ``b + G W p``
  (clipped at 0 on writing), so they keep the controls' cell-to-cell variation. A target
  gene that is not measured has no embedding: ``p = 0`` (prediction ``c + b``), logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from scgpt_vcc.io import iter_row_chunks
from scgpt_vcc.predict.cells import ExpressionData, Predict
from scgpt_vcc.train.batches import CONTROL_CONDITION, perturbed_genes

log = logging.getLogger(__name__)


def condition_means(
    data: ExpressionData, conditions: Sequence[str], chunk_size: int = 5000
) -> np.ndarray:
    """Mean expression [len(conditions), genes] (float64) of each condition, one streaming pass."""
    index = {c: i for i, c in enumerate(conditions)}
    codes = np.array([index.get(c, -1) for c in data.condition], dtype=np.int64)
    counts = np.bincount(codes[codes >= 0], minlength=len(conditions))
    missing = [c for c, n in zip(conditions, counts, strict=True) if n == 0]
    if missing:
        raise ValueError(f"conditions without cells in {data.path}: {missing[:10]}")
    sums = np.zeros((len(conditions), data.n_genes))
    for start, chunk in iter_row_chunks(data.path, chunk_size, desc="condition means"):
        rows = codes[start : start + chunk.shape[0]]
        keep = np.flatnonzero(rows >= 0)
        indicator = sp.csr_matrix(
            (np.ones(keep.size), (rows[keep], keep)), shape=(len(conditions), chunk.shape[0])
        )
        sums += (indicator @ chunk.astype(np.float64)).toarray()
    return sums / counts[:, None]


def training_perturbations(train: Sequence[str]) -> list[str]:
    """Training conditions that perturb something (control left out)."""
    return [c for c in dict.fromkeys(train) if c != CONTROL_CONDITION]


def control_predictor() -> Predict:
    return lambda control, targets: control


def train_mean_vector(perturbation_means: np.ndarray) -> np.ndarray:
    """The cell-mean baseline: the mean over perturbations of their mean expression."""
    if perturbation_means.shape[0] == 0:
        raise ValueError("train_mean needs at least one training perturbation")
    return perturbation_means.mean(axis=0)


def train_mean_predictor(mean: np.ndarray) -> Predict:
    row = mean.astype(np.float32)
    return lambda control, targets: np.broadcast_to(row, control.shape).copy()


@dataclass(frozen=True)
class LinearModel:
    """Fitted linear model (see the module docstring for the formula)."""

    genes: tuple[str, ...]
    gene_embedding: np.ndarray  # G [genes, K]
    weights: np.ndarray  # W [K, K]
    center: np.ndarray  # b [genes]

    def embed(self, targets: Sequence[str]) -> np.ndarray:
        """Perturbation embedding: sum of the targets' rows of G (unmeasured ones skipped)."""
        position = {g: i for i, g in enumerate(self.genes)}
        p = np.zeros(self.gene_embedding.shape[1])
        for gene in targets:
            if gene in position:
                p += self.gene_embedding[position[gene]]
            else:
                log.warning("linear: target %s is not a measured gene; no embedding", gene)
        return p

    def change(self, targets: Sequence[str]) -> np.ndarray:
        """Predicted change from the control mean, ``b + G W p``."""
        return self.center + self.gene_embedding @ (self.weights @ self.embed(targets))


def fit_linear(
    genes: Sequence[str],
    perturbation_means: np.ndarray,
    conditions: Sequence[str],
    control_mean: np.ndarray,
    pca_dim: int = 10,
    ridge: float = 0.1,
) -> LinearModel:
    """Fit the linear model on training pseudobulks (rows of ``perturbation_means``)."""
    expression = np.column_stack([perturbation_means.T, control_mean])  # genes x (C + 1)
    centred = expression - expression.mean(axis=0, keepdims=True)
    k = min(pca_dim, *centred.shape)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    embedding = u[:, :k] * s[:k]
    model = LinearModel(tuple(genes), embedding, np.zeros((k, k)), np.zeros(len(genes)))
    changes = expression - control_mean[:, None]
    center = changes.mean(axis=1)
    pert = np.column_stack(
        [model.embed(perturbed_genes(c)) for c in conditions] + [np.zeros(k)]
    )  # K x (C + 1)
    eye = np.eye(k)
    left = np.linalg.solve(embedding.T @ embedding + ridge * eye, embedding.T)
    right = np.linalg.solve(pert @ pert.T + ridge * eye, pert).T  # P^T (P P^T + l I)^-1
    weights = left @ (changes - center[:, None]) @ right
    log.info("linear model: %d genes, %d training conditions, K=%d", len(genes), len(conditions), k)
    return LinearModel(tuple(genes), embedding, weights, center)


def linear_predictor(model: LinearModel) -> Predict:
    def predict(control: np.ndarray, targets: Sequence[str]) -> np.ndarray:
        return control + model.change(targets).astype(np.float32)

    return predict
