"""A synthetic dataset shaped like the Virtual Cell Challenge training data.

The real data cannot be downloaded here, so the workflow makes its own: raw UMI counts
(float32 integers, CSR) over real VCC gene symbols in VCC order, with ``obs.target_gene``
(~17% ``non-targeting``), ``guide_id`` and ``batch`` (and ``cell_line`` with several
cell contexts), and ``var.gene_id``.

Planted biology, so a model has something to learn and held-out perturbations are
predictable from seen ones:

* genes belong to co-regulated *modules*; every cell has a random activity per module, so
  module genes co-vary in control cells too (a PCA of the data recovers the modules);
* every target gene belongs to one or two modules; knocking it down lowers the target to
  10-30% of its level and shifts its modules by a fixed, module-specific log fold change,
  so perturbations of related genes look alike;
* per-batch depth and gene factors add a mild batch effect;
* with ``n_contexts`` > 1 the cells are shared among cell lines (contexts), each with its own
  controls and cells of every perturbation; a context shifts base expression a little, and
  about half of the modules respond to a knockdown alike in every context, the others
  differently in each, so a perturbation's effect is partly context-specific;
* counts are gamma-Poisson (negative binomial) around the planted means, at a depth that
  gives the real data's sparsity (~43% non-zero).

Validation perturbations use real VCC validation gene names; their cells are written to a
separate "truth" file, never to the training file, with control cells of their own (as many
as the training data's, in every context: DES and PDS compare each file with its own
controls). The validation CSV's ``median_umi_per_cell`` are the truth's per-perturbation
median depths, as the challenge's CSV gives them for its held-out cells.
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
# obs column naming the cell context of every cell (written only with several contexts).
CONTEXT_COLUMN = "cell_line"
CONTEXT_NAMES = ("K562", "RPE1", "HepG2", "Jurkat")
# Spread of a context's per-gene log shift of base expression.
CONTEXT_LOG_SD = 0.3


def context_labels(n_contexts: int) -> list[str]:
    """Cell line names of ``n_contexts`` contexts: real ones first, then ``line{k}``."""
    return [CONTEXT_NAMES[k] if k < len(CONTEXT_NAMES) else f"line{k}" for k in range(n_contexts)]


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
    n_contexts: int = 1
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
        if self.n_contexts < 1:
            raise ValueError("n_contexts must be >= 1")
        smallest = self.n_cells // self.n_contexts
        perturbed = smallest - round(self.control_fraction * smallest)
        if self.n_contexts > 1 and perturbed < self.n_perturbations:
            raise ValueError("n_cells too few for every perturbation in every context")


@dataclass
class PlantedBiology:
    """Gene expression programme and the effect of each perturbation."""

    genes: list[str]
    gene_ids: list[str]
    base_log_expression: np.ndarray  # (G,) log of relative expression
    module_membership: np.ndarray  # (M, G) loadings in [0, 1]
    # (C, M) log fold change when a module member is knocked down, per context
    context_module_response: np.ndarray
    context_log_offsets: np.ndarray  # (C, G) shift of base_log_expression per context
    target_modules: dict[str, list[int]]
    knockdown: dict[str, float]  # remaining fraction of the target's expression
    batch_log_factors: np.ndarray  # (B, G)
    batch_depth: np.ndarray  # (B,)

    def log_fold_change(self, target: str, context: int = 0) -> np.ndarray:
        """Planted log fold change of every gene when ``target`` is knocked down in ``context``."""
        lfc = np.zeros(len(self.genes))
        response = self.context_module_response[context]
        for module in self.target_modules[target]:
            lfc += response[module] * self.module_membership[module]
        lfc[self.genes.index(target)] = np.log(self.knockdown[target])
        return lfc


def _module_responses(n_modules: int, rng: np.random.Generator) -> np.ndarray:
    """Random log fold changes of ``n_modules`` modules: either sign, 0.4-1.0 in size."""
    return rng.choice([-1.0, 1.0], n_modules) * rng.uniform(0.4, 1.0, n_modules)


def plant_contexts(
    spec: SyntheticSpec, response: np.ndarray, n_genes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-context module responses (C, M) and base log offsets (C, G).

    Context 0 keeps ``response`` and no offset. Every other context shifts each gene's base
    level and draws new responses for a random half of the modules; the rest are shared.
    Its own generator leaves the single-context draws as they were.
    """
    rng = np.random.default_rng([spec.seed, 7])
    n_modules = len(response)
    specific = rng.permutation(n_modules)[: n_modules - n_modules // 2]
    responses = np.repeat(response[None, :], spec.n_contexts, axis=0)
    for row in responses[1:]:
        row[specific] = _module_responses(len(specific), rng)
    offsets = np.zeros((spec.n_contexts, n_genes))
    offsets[1:] = rng.normal(0.0, CONTEXT_LOG_SD, (spec.n_contexts - 1, n_genes))
    return responses, offsets


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
    response = _module_responses(spec.n_modules, rng)

    target_modules: dict[str, list[int]] = {}
    knockdown: dict[str, float] = {}
    for target in train_targets + validation_targets:
        modules = rng.choice(spec.n_modules, rng.integers(1, 3), replace=False).tolist()
        for m in modules:
            membership[m, gene_index[target]] = 1.0
        target_modules[target] = sorted(modules)
        knockdown[target] = float(rng.uniform(0.1, 0.3))

    gene_ids = [f"ENSG{position[g] + 1:011d}" for g in genes]
    context_response, context_offsets = plant_contexts(spec, response, n_genes)
    biology = PlantedBiology(
        genes=genes,
        gene_ids=gene_ids,
        base_log_expression=base,
        module_membership=membership,
        context_module_response=context_response,
        context_log_offsets=context_offsets,
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


def _split(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` near-equal whole numbers."""
    return [n // parts + (k < n % parts) for k in range(parts)]


def training_cell_counts(
    targets: list[str],
    spec: SyntheticSpec,
    rng: np.random.Generator,
    n_cells: int | None = None,
    minimum: int = 0,
) -> dict[str, int]:
    """Cells per perturbation (at least ``minimum``) and control: uneven, as in a screen.

    ``n_cells`` (default ``spec.n_cells``) is the total, controls included.
    """
    n_cells = spec.n_cells if n_cells is None else n_cells
    n_control = int(round(spec.control_fraction * n_cells))
    weights = np.exp(rng.normal(0.0, 0.5, len(targets)))
    n_free = n_cells - n_control - minimum * len(targets)
    per_target = minimum + rng.multinomial(n_free, weights / weights.sum())
    return {spec.control_label: n_control, **dict(zip(targets, per_target.tolist(), strict=True))}


def context_cell_counts(
    targets: list[str], spec: SyntheticSpec, rng: np.random.Generator
) -> list[dict[str, int]]:
    """:func:`training_cell_counts` of each context, which share ``n_cells`` equally.

    With several contexts every perturbation gets at least one cell in each.
    """
    minimum = int(spec.n_contexts > 1)
    return [
        training_cell_counts(targets, spec, rng, n_cells, minimum)
        for n_cells in _split(spec.n_cells, spec.n_contexts)
    ]


def truth_cell_counts(
    cells_per_target: dict[str, int], spec: SyntheticSpec
) -> list[dict[str, int]]:
    """Held-out cells per context: each target's cells split equally among the contexts.

    Each context has as many controls as it has in the training data.
    """
    split = {target: _split(n, spec.n_contexts) for target, n in cells_per_target.items()}
    return [
        {
            spec.control_label: int(round(spec.control_fraction * n_cells)),
            **{target: parts[context] for target, parts in split.items()},
        }
        for context, n_cells in enumerate(_split(spec.n_cells, spec.n_contexts))
    ]


def cell_annotations(
    cells_per_context: list[dict[str, int]], spec: SyntheticSpec, rng: np.random.Generator
) -> pd.DataFrame:
    """obs of ``cells_per_context[c][target]`` cells of each target in context ``c``, shuffled.

    Columns: target, guide, batch and, with several contexts, :data:`CONTEXT_COLUMN`.
    """
    n_per_context = [sum(cells.values()) for cells in cells_per_context]
    target_gene = np.repeat(
        [target for cells in cells_per_context for target in cells],
        [n for cells in cells_per_context for n in cells.values()],
    )
    context = np.repeat(np.arange(len(cells_per_context)), n_per_context)
    order = rng.permutation(len(target_gene))
    target_gene, context = target_gene[order], context[order]
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
    columns = {
        "target_gene": pd.Categorical(target_gene),
        "guide_id": pd.Categorical(guide_id),
        "batch": pd.Categorical(
            [f"batch{b + 1:02d}" for b in batch],
            categories=[f"batch{b + 1:02d}" for b in range(spec.n_batches)],
        ),
    }
    if len(cells_per_context) > 1:
        labels = context_labels(len(cells_per_context))
        columns[CONTEXT_COLUMN] = pd.Categorical.from_codes(context, categories=labels)
    return pd.DataFrame(columns, index=pd.Index(index))


def _context_codes(obs: pd.DataFrame) -> np.ndarray:
    """Context index of every cell of ``obs`` (0 without a context column)."""
    if CONTEXT_COLUMN not in obs:
        return np.zeros(len(obs), dtype=np.int64)
    return obs[CONTEXT_COLUMN].cat.codes.to_numpy().astype(np.int64)


def sample_counts(
    biology: PlantedBiology,
    obs: pd.DataFrame,
    spec: SyntheticSpec,
    rng: np.random.Generator,
    effects: dict[tuple[str, int], np.ndarray] | None = None,
) -> sp.csr_matrix:
    """Gamma-Poisson UMI counts for the cells of ``obs`` (one chunk).

    ``effects`` caches :meth:`PlantedBiology.log_fold_change` per (target, context) across
    chunks.
    """
    if effects is None:
        effects = {}
    n_cells = len(obs)
    batch = obs["batch"].cat.codes.to_numpy()
    contexts = _context_codes(obs)
    context_base = biology.base_log_expression + biology.context_log_offsets  # (C, G)
    log_mean = (context_base[:, None, :] + biology.batch_log_factors[None])[contexts, batch]
    module_activity = rng.normal(0.0, 0.25, (n_cells, biology.module_membership.shape[0]))
    log_mean += module_activity @ biology.module_membership
    targets = obs["target_gene"].astype(str).to_numpy()
    for target, context in sorted(set(zip(targets, contexts.tolist(), strict=True))):
        if target == spec.control_label:
            continue
        if (target, context) not in effects:
            effects[target, context] = biology.log_fold_change(target, context)
        log_mean[(targets == target) & (contexts == context)] += effects[target, context]
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
    effects: dict[tuple[str, int], np.ndarray] = {}
    with atomic_path(path) as tmp, H5adStreamWriter(tmp, obs, var) as writer:
        for start in tqdm(range(0, len(obs), spec.chunk_size), desc=desc, unit="chunk"):
            chunk = obs.iloc[start : start + spec.chunk_size]
            counts = sample_counts(biology, chunk, spec, rng, effects)
            totals.append(np.asarray(counts.sum(axis=1)).ravel())
            writer.append(counts)
    return np.concatenate(totals)


def validation_cell_counts(
    reference_counts: pd.DataFrame, targets: list[str], spec: SyntheticSpec
) -> pd.DataFrame:
    """``pert_counts_Validation.csv`` rows for ``targets``, scaled to the synthetic size.

    Every target has at least 20 cells, and at least one per context.
    """
    scale = spec.n_cells / VCC_N_CELLS
    rows = reference_counts.set_index("target_gene").loc[targets]
    n_cells = np.round(rows["n_cells"].to_numpy() * scale)
    return pd.DataFrame(
        {
            "target_gene": targets,
            "n_cells": np.maximum(max(20, spec.n_contexts), n_cells).astype(int),
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
        "planted %d training and %d validation perturbations over %d genes, %d modules, "
        "%d contexts",
        len(train_targets),
        len(validation_targets),
        len(biology.genes),
        spec.n_modules,
        spec.n_contexts,
    )

    obs = cell_annotations(context_cell_counts(train_targets, spec, rng), spec, rng)
    _write_counts_h5ad(Path(adata_path), biology, obs, spec, rng, "training cells")
    counts = validation_cell_counts(reference, list(validation_targets), spec)
    if validation_truth_path is not None:
        n_cells = dict(zip(counts["target_gene"], counts["n_cells"].tolist(), strict=True))
        # The held-out experiment has its own control cells, as many as the training data:
        # DES and PDS compare each file's perturbations with that file's controls.
        truth_obs = cell_annotations(truth_cell_counts(n_cells, spec), spec, rng)
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
