"""The GEARS/scGPT metric set: Pearson and MSE of mean expression, on all and on DE genes.

Definitions follow scGPT's ``compute_perturbation_metrics`` and GEARS's
``compute_metrics`` (docs/metrics.md writes them out): per held-out perturbation, the
mean over its real cells is compared with the mean over its predicted cells, on all genes
and on the perturbation's top-20 DE genes from ``uns['rank_genes_groups_cov_all']`` of
``perturb_processed.h5ad``; the ``_delta`` variants compare the changes from the mean of
the real control cells. Only the means enter, so everything works on
:class:`~scgpt_vcc.evaluate.means.GroupMeans` computed by streaming.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from anndata.io import read_elem

from scgpt_vcc.data.gears import condition_of
from scgpt_vcc.errors import InputError
from scgpt_vcc.evaluate.means import GroupMeans
from scgpt_vcc.io import open_h5ad
from scgpt_vcc.stats import pearson

N_TOP_DE = 20
DE_KEYS = ("rank_genes_groups_cov_all", "top_non_dropout_de_20")
GEARS_METRICS = ("pearson", "pearson_delta", "pearson_de", "pearson_de_delta", "mse", "mse_de")


def mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x - y) ** 2))


def perturbation_metrics(
    truth: np.ndarray, pred: np.ndarray, control: np.ndarray, de_idx: np.ndarray
) -> dict[str, float]:
    """All GEARS/scGPT metrics of one perturbation from its three mean profiles.

    The MSE of the changes equals the MSE of the means (the control mean cancels), so
    there is no separate ``mse_delta``.
    """
    t_delta, p_delta = truth - control, pred - control
    return {
        "pearson": pearson(truth, pred),
        "pearson_delta": pearson(t_delta, p_delta),
        "pearson_de": pearson(truth[de_idx], pred[de_idx]),
        "pearson_de_delta": pearson(t_delta[de_idx], p_delta[de_idx]),
        "mse": mse(truth, pred),
        "mse_de": mse(truth[de_idx], pred[de_idx]),
    }


def read_de_genes(
    processed: str | Path,
    targets: Iterable[str],
    key: str = "rank_genes_groups_cov_all",
    n_top: int = N_TOP_DE,
    context: str | None = None,
) -> dict[str, np.ndarray]:
    """Top ``n_top`` DE gene names per target gene from ``uns[key]`` of perturb_processed.h5ad.

    Keys are ``{cell_type}_{condition}_{dose}``; like scGPT, the dose is taken from the first
    key (GEARS gives every single perturbation the same dose ``1+1``), and so is the cell
    type unless ``context`` names it (a dataset of several contexts ranks each against its
    own controls).
    """
    with open_h5ad(processed) as f:
        if "uns" not in f or key not in f["uns"]:
            raise InputError(processed, f"uns['{key}']", "is missing", "run compute-de")
        group = f["uns"][key]
        keys = list(group.keys())
        parts = keys[0].split("_") if keys else []
        if len(parts) != 3:
            raise InputError(
                processed,
                f"uns['{key}']",
                f"key {keys[:1]} is not '{{cell_type}}_{{condition}}_{{dose}}'",
                "re-run compute-de; the cell type must not contain '_'",
            )
        out = {}
        for target in targets:
            name = f"{context or parts[0]}_{condition_of(target)}_{parts[2]}"
            if name not in group:
                raise InputError(
                    processed,
                    f"uns['{key}']['{name}']",
                    "is missing: the held-out perturbation has no DE genes",
                    "evaluate on perturbations of the same perturb_processed.h5ad",
                )
            genes = np.asarray(read_elem(group[name])).astype(str)
            out[target] = genes[:n_top]
    return out


def gears_metrics(
    real: GroupMeans,
    pred: GroupMeans,
    control_label: str,
    de_genes: dict[str, np.ndarray],
    perturbations: Iterable[str],
) -> pd.DataFrame:
    """One row per perturbation with the GEARS/scGPT metrics (index ``perturbation``).

    The control mean is the mean of the real file's control cells, the same for truth and
    prediction (scGPT: the mean of the dataset's control cells).
    """
    control = real.row(control_label)
    position = {g: i for i, g in enumerate(real.genes)}
    rows = {}
    for target in perturbations:
        missing = [g for g in de_genes[target] if g not in position]
        if missing:
            raise InputError(
                "perturb_processed.h5ad",
                f"DE genes of {target}",
                f"{missing[:3]} are not genes of the evaluated files",
                "predict all genes of the processed data",
            )
        de_idx = np.array([position[g] for g in de_genes[target]], dtype=np.int64)
        rows[target] = perturbation_metrics(real.row(target), pred.row(target), control, de_idx)
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(GEARS_METRICS))
    frame.index.name = "perturbation"
    return frame
