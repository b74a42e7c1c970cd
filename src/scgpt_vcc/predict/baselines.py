"""Baselines evaluated exactly like scGPT: control, train_mean, linear and linear_scgpt.

Each is a :class:`~scgpt_vcc.predict.population.CellModel`: its cells come from the same control
cells as scGPT's and are rescaled to its population mean (see :mod:`.population`), which for
these models is exact:

* ``control``: no perturbation effect. Cells: the control cells; population mean: the mean
  ``c`` of all control cells.
* ``train_mean``: the Virtual Cell Challenge's cell-mean baseline, exactly as cell-eval
  0.8.2 builds it (``cell_eval._baseline._build_pert_baseline``, ``as_delta=False``): the
  mean over groups of each group's mean expression, where the groups are the training
  perturbations **and the control cells** (cell-eval averages every ``target_gene`` group
  of the training file, ``non-targeting`` included),
  ``m = (1/(|T|+1)) (c + sum_{p in T} mean_{cells of p}(x))``. Every cell is ``m``.
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
  - population mean for a new perturbation: ``c + b + G W p``; cells: the control cells
    shifted by ``b + G W p``.

  A target gene that is not measured has no embedding: ``p = 0`` (prediction ``c + b``),
  logged.
* ``linear_scgpt``: the same model with the perturbation embedding taken from elsewhere,
  which Ahlmann-Eltze et al. found to beat every deep model they tried: ``p_j`` is the
  pretrained scGPT gene embedding of the target (row of the checkpoint's
  ``encoder.embedding``), projected to K dimensions. Projection (a choice, documented in
  docs/metrics.md): PCA of the embedding rows of the data's genes that are in the scGPT
  vocabulary, centred over those genes, top K components; so ``p`` has the dimension of
  ``G`` and a gene with an average embedding carries no signal. Fitted on the training
  perturbations only, like ``linear``; a target outside the vocabulary gets ``p = 0``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scgpt_vcc.data.gears import CONTROL, perturbed_genes
from scgpt_vcc.io import iter_row_chunks
from scgpt_vcc.predict.cells import ExpressionData
from scgpt_vcc.predict.population import ControlReference, PopulationMean

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
    return [c for c in dict.fromkeys(train) if c != CONTROL]


@dataclass(frozen=True)
class ShiftModel:
    """Every cell moved by one change per perturbation (``control``: no change; ``linear``)."""

    change: Callable[[Sequence[str]], np.ndarray | float]

    def cells(self, control: np.ndarray, targets: Sequence[str]) -> np.ndarray:
        return control + np.asarray(self.change(targets), dtype=np.float32)

    def population_mean(
        self, targets: Sequence[str], reference: ControlReference
    ) -> PopulationMean:
        return PopulationMean(reference.mean + self.change(targets))


def control_model() -> ShiftModel:
    return ShiftModel(lambda targets: 0.0)


@dataclass(frozen=True)
class ConstantModel:
    """The same vector for every cell (``train_mean``)."""

    vector: np.ndarray

    def cells(self, control: np.ndarray, targets: Sequence[str]) -> np.ndarray:
        return np.broadcast_to(self.vector.astype(np.float32), control.shape).copy()

    def population_mean(
        self, targets: Sequence[str], reference: ControlReference
    ) -> PopulationMean:
        return PopulationMean(self.vector.astype(np.float64))


def train_mean_vector(group_means: np.ndarray) -> np.ndarray:
    """The cell-mean baseline: the mean of the group means (training perturbations and control)."""
    if group_means.shape[0] < 2:
        raise ValueError("train_mean needs the control and at least one training perturbation")
    return group_means.mean(axis=0)


@dataclass(frozen=True)
class LinearModel:
    """Fitted linear model (see the module docstring for the formula)."""

    gene_embedding: np.ndarray  # G [genes, K]
    perturbation_embedding: Mapping[str, np.ndarray]  # gene -> p [K_p]
    weights: np.ndarray  # W [K, K_p]
    center: np.ndarray  # b [genes]

    def change(self, targets: Sequence[str]) -> np.ndarray:
        """Predicted change from the control mean, ``b + G W p``."""
        p = embed(self.perturbation_embedding, targets)
        return self.center + self.gene_embedding @ (self.weights @ p)


def embed(table: Mapping[str, np.ndarray], targets: Sequence[str]) -> np.ndarray:
    """Perturbation embedding: the sum of the targets' rows of ``table`` (unknown ones: 0)."""
    p = np.zeros(len(next(iter(table.values()))))
    for gene in targets:
        if gene in table:
            p += table[gene]
        else:
            log.warning(
                "linear: target %s has no perturbation embedding (not a measured gene, or "
                "outside the vocabulary for linear_scgpt); p = 0 predicts train_mean's "
                "change for it",
                gene,
            )
    return p


def pca_scores(matrix: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` principal-component scores of the rows of ``matrix`` (columns centred)."""
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    k = min(k, *centred.shape)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    return u[:, :k] * s[:k]


def fit_linear(
    genes: Sequence[str],
    perturbation_means: np.ndarray,
    conditions: Sequence[str],
    control_mean: np.ndarray,
    pca_dim: int = 10,
    ridge: float = 0.1,
    perturbation_embedding: Mapping[str, np.ndarray] | None = None,
) -> LinearModel:
    """Fit the linear model on training pseudobulks (rows of ``perturbation_means``).

    ``perturbation_embedding`` (gene -> vector) replaces the default ``p_j = G[j]``.
    """
    expression = np.column_stack([perturbation_means.T, control_mean])  # genes x (C + 1)
    embedding = pca_scores(expression, pca_dim)
    if perturbation_embedding is None:
        perturbation_embedding = dict(zip(genes, embedding, strict=True))
    changes = expression - control_mean[:, None]
    center = changes.mean(axis=1)
    pert = np.column_stack(
        [embed(perturbation_embedding, perturbed_genes(c)) for c in [*conditions, CONTROL]]
    )  # K_p x (C + 1); the control's embedding is 0
    k_p = pert.shape[0]
    left = np.linalg.solve(
        embedding.T @ embedding + ridge * np.eye(embedding.shape[1]), embedding.T
    )
    right = np.linalg.solve(pert @ pert.T + ridge * np.eye(k_p), pert).T  # P^T (P P^T + l I)^-1
    weights = left @ (changes - center[:, None]) @ right
    log.info(
        "linear model: %d genes, %d training conditions, K=%d, perturbation embedding %d-dim",
        len(genes),
        len(conditions),
        embedding.shape[1],
        k_p,
    )
    return LinearModel(embedding, perturbation_embedding, weights, center)


def scgpt_perturbation_embedding(
    checkpoint_dir: str | Path,
    genes: Sequence[str],
    dim: int,
    renames: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Pretrained scGPT gene embeddings of ``genes`` in the vocabulary (under their
    ``renames``), PCA-projected to ``dim``."""
    from scgpt_vcc.model.checkpoint import (
        ARGS_FILE,
        MODEL_FILE,
        VOCAB_FILE,
        read_args,
        read_state_dict,
        read_vocab,
    )
    from scgpt_vcc.model.vocab import match_genes

    folder = Path(checkpoint_dir)
    vocab = read_vocab(folder / VOCAB_FILE, read_args(folder / ARGS_FILE)["pad_token"])
    table = read_state_dict(folder / MODEL_FILE)["encoder.embedding.weight"]
    match = match_genes(list(genes), vocab, renames=renames)
    rows = table[match.input_ids].double().numpy()
    projected = pca_scores(rows, dim)
    names = [genes[i] for i in match.input_positions]
    return dict(zip(names, projected, strict=True))


def fit_baseline(
    model_type: str,
    data: ExpressionData,
    train_conditions: Sequence[str],
    *,
    pca_dim: int = 10,
    ridge: float = 0.1,
    checkpoint_dir: str | Path | None = None,
    renames: Mapping[str, str] | None = None,
) -> ShiftModel | ConstantModel:
    """The baseline ``model_type`` fitted on ``train_conditions``."""
    if model_type == "control":
        return control_model()
    perturbations = training_perturbations(train_conditions)
    means = condition_means(data, [*perturbations, CONTROL])
    if model_type == "train_mean":
        return ConstantModel(train_mean_vector(means))
    embedding = None
    if model_type == "linear_scgpt":
        if checkpoint_dir is None:
            raise ValueError("linear_scgpt needs the pretrained checkpoint folder")
        embedding = scgpt_perturbation_embedding(checkpoint_dir, data.genes, pca_dim, renames)
    model = fit_linear(data.genes, means[:-1], perturbations, means[-1], pca_dim, ridge, embedding)
    return ShiftModel(model.change)
