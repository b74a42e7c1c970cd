"""Small real/predicted h5ad pairs and a minimal perturb_processed.h5ad for evaluation tests."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CONTROL = "non-targeting"


def write_cells(path: Path, x: np.ndarray, labels: list[str], genes: list[str]) -> Path:
    obs = pd.DataFrame(
        {"target_gene": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(labels))]
    )
    adata = ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes))
    adata.write_h5ad(path)
    return path


def write_processed(path: Path, genes: list[str], ranking: dict[str, list[str]]) -> Path:
    """perturb_processed.h5ad with only what evaluation reads: var and uns DE rankings."""
    n = len(genes)
    adata = ad.AnnData(sp.csr_matrix((1, n), dtype=np.float32), var=pd.DataFrame(index=genes))
    adata.uns["rank_genes_groups_cov_all"] = {
        f"K562_{target}+ctrl_1+1": np.array(order) for target, order in ranking.items()
    }
    adata.write_h5ad(path)
    return path


def log1p_cells(rng: np.random.Generator, n: int, rate: np.ndarray) -> np.ndarray:
    counts = rng.poisson(rate, size=(n, rate.size)).astype(np.float64)
    return np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1000)


def write_noisy_pair(
    folder: Path,
    n_genes: int = 150,
    n_perturbations: int = 8,
    cells: int = 30,
    n_control: int = 90,
    noise: float = 0.4,
    seed: int = 0,
) -> tuple[Path, Path, list[str]]:
    """real.h5ad with planted effects and pred.h5ad: noisy, shuffled copies, two labels swapped.

    Returns (real path, pred path, perturbations).
    """
    rng = np.random.default_rng(seed)
    genes = [f"GENE{i}" for i in range(n_genes)]
    perts = genes[:n_perturbations]
    base = np.exp(rng.normal(0, 1, n_genes)) * 0.6
    blocks, labels = [log1p_cells(rng, n_control, base)], [CONTROL] * n_control
    for i, p in enumerate(perts):
        rate = base.copy()
        hit = rng.choice(n_genes, 15, replace=False)
        rate[hit] *= rng.uniform(0.1, 5, hit.size)
        rate[i] *= 0.05  # knockdown of the target
        blocks.append(log1p_cells(rng, cells, rate))
        labels += [p] * cells
    x = np.vstack(blocks)
    pred_x = np.clip(x + rng.normal(0, noise, x.shape) * (x > 0), 0, None)
    pred_labels = list(labels)
    a, b = perts[0], perts[1]  # swap two perturbations: PDS and DES must notice
    pred_labels = [b if v == a else a if v == b else v for v in pred_labels]
    order = rng.permutation(len(labels))
    real = write_cells(folder / "real.h5ad", x, labels, genes)
    pred = write_cells(folder / "pred.h5ad", pred_x[order], [pred_labels[i] for i in order], genes)
    return real, pred, perts
