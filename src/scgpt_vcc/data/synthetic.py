"""A synthetic dataset shaped like the Virtual Cell Challenge training data.

The real data cannot be downloaded here, so the workflow makes its own: raw UMI counts
(float32 integers, CSR) over real VCC gene symbols in VCC order, with ``obs.target_gene``
(~17% ``non-targeting``), ``guide_id`` and ``batch``, and ``var.gene_id``.

Planted biology, so a model has something to learn and held-out perturbations are
predictable from seen ones:

* genes belong to co-regulated *modules*; every cell has a random activity per module, so
  module genes co-vary in control cells too (a PCA of the data recovers the modules);
* every target gene belongs to one or two modules; knocking it down lowers the target to
  10-30% of its level and shifts its modules by a fixed, module-specific log fold change,
  so perturbations of related genes look alike;
* per-batch depth and gene factors add a mild batch effect;
* counts are gamma-Poisson (negative binomial) around the planted means, at a depth that
  gives the real data's sparsity (~43% non-zero).

Validation perturbations use real VCC validation gene names; their cells are written to a
separate "truth" file, never to the training file, with control cells of their own (as many
as the training data's: DES and PDS compare each file with its own controls). The
validation CSV's ``median_umi_per_cell`` are the truth's per-perturbation median depths, as
the challenge's CSV gives them for its held-out cells.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from scgpt_vcc.data.genes import read_gene_list, write_gene_list
from scgpt_vcc.io import H5adStreamWriter, atomic_path, write_text_atomic

log = logging.getLogger(__name__)

VCC_N_CELLS = 221_273
VCC_N_GENES = 18_080
VCC_MEDIAN_UMI = 54_000.0
# Log-normal spread of gene base expression; with dispersion 0.2 it gives 40-47% non-zero
# entries (measured: ~41% at 18,080 genes, ~47% at 2,000; the real data has ~43%).
GENE_LOG_SD = 1.9
# Targets are drawn from the most expressed genes (as CRISPRi screens pick expressed genes).
TARGET_EXPRESSION_QUANTILE = 0.6


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and randomness of a synthetic dataset."""

    n_cells: int = 4000
    n_genes: int = 2000
    n_perturbations: int = 40
    n_validation_perturbations: int = 10
    control_fraction: float = 0.17
    median_umi: float | None = None
    n_modules: int = 12
    n_batches: int = 4
    control_label: str = "non-targeting"
    seed: int = 0
    dispersion: float = 0.2
    chunk_size: int = 2000

    @property
    def depth(self) -> float:
        """Median UMI per cell: the real depth scaled to the number of genes by default."""
        if self.median_umi is not None:
            return float(self.median_umi)
        return VCC_MEDIAN_UMI * self.n_genes / VCC_N_GENES

    def check(self) -> None:
        if not 0 < self.n_perturbations + self.n_validation_perturbations < self.n_genes:
            raise ValueError("n_perturbations + n_validation_perturbations must be < n_genes")
        if self.n_genes > VCC_N_GENES:
            raise ValueError(f"n_genes must be <= {VCC_N_GENES}")


@dataclass
class PlantedBiology:
    """Gene expression programme and the effect of each perturbation."""

    genes: list[str]
    gene_ids: list[str]
    base_log_expression: np.ndarray  # (G,) log of relative expression
    module_membership: np.ndarray  # (M, G) loadings in [0, 1]
    module_response: np.ndarray  # (M,) log fold change when a module member is knocked down
    target_modules: dict[str, list[int]]
    knockdown: dict[str, float]  # remaining fraction of the target's expression
    batch_log_factors: np.ndarray  # (B, G)
    batch_depth: np.ndarray  # (B,)

    def log_fold_change(self, target: str) -> np.ndarray:
        """Planted log fold change of every gene when ``target`` is knocked down."""
        lfc = np.zeros(len(self.genes))
        for module in self.target_modules[target]:
            lfc += self.module_response[module] * self.module_membership[module]
        lfc[self.genes.index(target)] = np.log(self.knockdown[target])
        return lfc


def plant_biology(
    spec: SyntheticSpec, vcc_genes: list[str], validation_targets: list[str]
) -> tuple[PlantedBiology, list[str]]:
    """Choose genes and targets, and draw the expression programme.

    Returns the biology and the training targets; ``validation_targets`` are always among
    the chosen genes.
    """
    rng = np.random.default_rng(spec.seed)
    position = {g: i for i, g in enumerate(vcc_genes)}
    others = [g for g in vcc_genes if g not in set(validation_targets)]
    picked = rng.choice(len(others), spec.n_genes - len(validation_targets), replace=False)
    genes = sorted([others[i] for i in picked] + validation_targets, key=position.__getitem__)
    gene_index = {g: i for i, g in enumerate(genes)}
    n_genes = len(genes)

    base = rng.normal(0.0, GENE_LOG_SD, n_genes)
    threshold = np.quantile(base, TARGET_EXPRESSION_QUANTILE)
    expressed = [g for g in genes if base[gene_index[g]] >= threshold]
    candidates = [g for g in expressed if g not in set(validation_targets)]
    if len(candidates) < spec.n_perturbations:
        candidates = [g for g in genes if g not in set(validation_targets)]
    train_targets = sorted(rng.choice(candidates, spec.n_perturbations, replace=False).tolist())
    # Validation targets are real names whose random base level may be low: lift them
    # into the expressed range so their knockdown is visible.
    for target in validation_targets:
        i = gene_index[target]
        base[i] = max(base[i], rng.uniform(threshold, base.max()))

    module_size = max(5, int(0.03 * n_genes))
    membership = np.zeros((spec.n_modules, n_genes))
    for m in range(spec.n_modules):
        members = rng.choice(n_genes, module_size, replace=False)
        membership[m, members] = rng.uniform(0.5, 1.0, module_size)
    response = rng.choice([-1.0, 1.0], spec.n_modules) * rng.uniform(0.4, 1.0, spec.n_modules)

    target_modules: dict[str, list[int]] = {}
    knockdown: dict[str, float] = {}
    for target in train_targets + validation_targets:
        modules = rng.choice(spec.n_modules, rng.integers(1, 3), replace=False).tolist()
        for m in modules:
            membership[m, gene_index[target]] = 1.0
        target_modules[target] = sorted(modules)
        knockdown[target] = float(rng.uniform(0.1, 0.3))

    gene_ids = [f"ENSG{position[g] + 1:011d}" for g in genes]
    biology = PlantedBiology(
        genes=genes,
        gene_ids=gene_ids,
        base_log_expression=base,
        module_membership=membership,
        module_response=response,
        target_modules=target_modules,
        knockdown=knockdown,
        batch_log_factors=rng.normal(0.0, 0.1, (spec.n_batches, n_genes)),
        batch_depth=np.exp(rng.normal(0.0, 0.15, spec.n_batches)),
    )
    return biology, train_targets


def _barcodes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unique 16-base cell barcodes."""
    codes = np.unique(rng.integers(0, 4**16, size=2 * n + 16, dtype=np.int64))
    codes = rng.permutation(codes)[:n]
    letters = np.array(list("ACGT"))
    digits = (codes[:, None] // (4 ** np.arange(15, -1, -1))) % 4
    return np.array(["".join(row) for row in letters[digits]])


def training_cell_counts(
    targets: list[str], spec: SyntheticSpec, rng: np.random.Generator
) -> dict[str, int]:
    """Cells per perturbation (and control): uneven, as in a real screen."""
    n_control = int(round(spec.control_fraction * spec.n_cells))
    weights = np.exp(rng.normal(0.0, 0.5, len(targets)))
    per_target = rng.multinomial(spec.n_cells - n_control, weights / weights.sum())
    return {spec.control_label: n_control, **dict(zip(targets, per_target.tolist(), strict=True))}


def cell_annotations(
    cells_per_target: dict[str, int], spec: SyntheticSpec, rng: np.random.Generator
) -> pd.DataFrame:
    """obs with ``cells_per_target`` cells of each target: target, guide, batch; shuffled."""
    target_gene = np.repeat(list(cells_per_target), list(cells_per_target.values()))
    target_gene = rng.permutation(target_gene)
    n_cells = len(target_gene)
    guide_number = rng.integers(1, 4, n_cells)
    control_guides = rng.integers(1, 51, n_cells)
    guide_id = np.where(
        target_gene == spec.control_label,
        [f"{spec.control_label}_{k:05d}" for k in control_guides],
        [f"{t}_P1P2_{k}" for t, k in zip(target_gene, guide_number, strict=True)],
    )
    batch = rng.integers(0, spec.n_batches, n_cells)
    barcodes = _barcodes(n_cells, rng)
    index = [f"{code}-{b + 1}" for code, b in zip(barcodes, batch, strict=True)]
    return pd.DataFrame(
        {
            "target_gene": pd.Categorical(target_gene),
            "guide_id": pd.Categorical(guide_id),
            "batch": pd.Categorical(
                [f"batch{b + 1:02d}" for b in batch],
                categories=[f"batch{b + 1:02d}" for b in range(spec.n_batches)],
            ),
        },
        index=pd.Index(index),
    )


def sample_counts(
    biology: PlantedBiology,
    obs: pd.DataFrame,
    spec: SyntheticSpec,
    rng: np.random.Generator,
    effects: dict[str, np.ndarray] | None = None,
) -> sp.csr_matrix:
    """Gamma-Poisson UMI counts for the cells of ``obs`` (one chunk).

    ``effects`` caches :meth:`PlantedBiology.log_fold_change` per target across chunks.
    """
    if effects is None:
        effects = {}
    n_cells = len(obs)
    batch = obs["batch"].cat.codes.to_numpy()
    log_mean = biology.base_log_expression[None, :] + biology.batch_log_factors[batch]
    module_activity = rng.normal(0.0, 0.25, (n_cells, biology.module_membership.shape[0]))
    log_mean += module_activity @ biology.module_membership
    targets = obs["target_gene"].astype(str).to_numpy()
    for target in np.unique(targets):
        if target != spec.control_label:
            if target not in effects:
                effects[target] = biology.log_fold_change(target)
            log_mean[targets == target] += effects[target]
    share = np.exp((log_mean - log_mean.max(axis=1, keepdims=True)).astype(np.float32))
    share /= share.sum(axis=1, keepdims=True)
    depth = spec.depth * biology.batch_depth[batch] * np.exp(rng.normal(0.0, 0.3, n_cells))
    shape = 1.0 / spec.dispersion
    rate = rng.standard_gamma(shape, share.shape, dtype=np.float32)
    rate *= share
    rate *= (depth * spec.dispersion)[:, None].astype(np.float32)
    return sp.csr_matrix(rng.poisson(rate).astype(np.float32))


def _write_counts_h5ad(
    path: Path,
    biology: PlantedBiology,
    obs: pd.DataFrame,
    spec: SyntheticSpec,
    rng: np.random.Generator,
    desc: str,
) -> np.ndarray:
    """Sample and write the cells of ``obs``; return their total counts."""
    var = pd.DataFrame({"gene_id": biology.gene_ids}, index=pd.Index(biology.genes))
    totals = []
    with atomic_path(path) as tmp, H5adStreamWriter(tmp, obs, var) as writer:
        for start in tqdm(range(0, len(obs), spec.chunk_size), desc=desc, unit="chunk"):
            counts = sample_counts(biology, obs.iloc[start : start + spec.chunk_size], spec, rng)
            totals.append(np.asarray(counts.sum(axis=1)).ravel())
            writer.append(counts)
    return np.concatenate(totals)


def validation_cell_counts(
    reference_counts: pd.DataFrame, targets: list[str], spec: SyntheticSpec
) -> pd.DataFrame:
    """``pert_counts_Validation.csv`` rows for ``targets``, scaled to the synthetic size."""
    scale = spec.n_cells / VCC_N_CELLS
    rows = reference_counts.set_index("target_gene").loc[targets]
    return pd.DataFrame(
        {
            "target_gene": targets,
            "n_cells": np.maximum(20, np.round(rows["n_cells"].to_numpy() * scale)).astype(int),
            "median_umi_per_cell": np.round(
                rows["median_umi_per_cell"].to_numpy() * spec.depth / VCC_MEDIAN_UMI, 1
            ),
        }
    )


def write_synthetic_dataset(
    spec: SyntheticSpec,
    gene_list: str | Path,
    adata_path: str | Path,
    validation_counts_path: str | Path,
    gene_names_path: str | Path,
    validation_truth_path: str | Path | None = None,
    reference_counts_path: str | Path | None = None,
) -> PlantedBiology:
    """Write the training h5ad, a validation-counts CSV, the gene list and the held-out truth.

    ``reference_counts_path`` is the real ``pert_counts_Validation.csv``; its genes name the
    validation perturbations and its cell counts, scaled down, size them. By default the
    copy shipped next to ``gene_list`` is used.
    """
    spec.check()
    vcc_genes = read_gene_list(gene_list)
    if reference_counts_path is None:
        reference_counts_path = Path(gene_list).with_name("vcc_pert_counts_Validation.csv")
    reference = pd.read_csv(reference_counts_path)
    rng = np.random.default_rng(spec.seed)
    pool = [g for g in reference["target_gene"] if g in set(vcc_genes)]
    validation_targets = sorted(rng.choice(pool, spec.n_validation_perturbations, replace=False))
    biology, train_targets = plant_biology(spec, vcc_genes, list(validation_targets))
    log.info(
        "planted %d training and %d validation perturbations over %d genes, %d modules",
        len(train_targets),
        len(validation_targets),
        len(biology.genes),
        spec.n_modules,
    )

    obs = cell_annotations(training_cell_counts(train_targets, spec, rng), spec, rng)
    _write_counts_h5ad(Path(adata_path), biology, obs, spec, rng, "training cells")
    counts = validation_cell_counts(reference, list(validation_targets), spec)
    if validation_truth_path is not None:
        n_cells = dict(zip(counts["target_gene"], counts["n_cells"].tolist(), strict=True))
        # The held-out experiment has its own control cells, as many as the training data:
        # DES and PDS compare each file's perturbations with that file's controls.
        n_control = int(round(spec.control_fraction * spec.n_cells))
        truth_obs = cell_annotations({spec.control_label: n_control, **n_cells}, spec, rng)
        totals = _write_counts_h5ad(
            Path(validation_truth_path), biology, truth_obs, spec, rng, "truth"
        )
        # As the challenge's CSV does for its held-out cells: each perturbation's median depth.
        medians = pd.Series(totals).groupby(truth_obs["target_gene"].to_numpy()).median()
        counts["median_umi_per_cell"] = medians.loc[counts["target_gene"]].to_numpy()
    write_text_atomic(validation_counts_path, counts.to_csv(index=False))
    write_gene_list(biology.genes, gene_names_path)
    log.info("wrote %s (%d cells x %d genes)", adata_path, spec.n_cells, len(biology.genes))
    return biology
