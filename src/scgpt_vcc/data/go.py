"""GEARS's perturbation-gene list and the GO filter it applies when loading data.

``PertData.set_pert_genes`` keeps the genes of ``gene2go_all.pkl`` that are in the
essential-gene list (``essential_all_data_pert_genes.pkl``; without it, GEARS's
``default_pert_graph=False`` list: measured genes plus perturbed genes);
``PertData.load`` then drops every condition with a gene outside that list. This module
reproduces both from local copies of the two files, reports what is dropped and why,
and downloads the files from GEARS's Dataverse addresses for users with internet.
"""

from __future__ import annotations

import json
import logging
import pickle
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scgpt_vcc.data.gears import CONTROL, gene_symbols, perturbed_genes
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import atomic_path, read_annotations, write_json_atomic

log = logging.getLogger(__name__)

DATAVERSE = "https://dataverse.harvard.edu"
GENE2GO = "gene2go_all.pkl"
ESSENTIAL = "essential_all_data_pert_genes.pkl"
# Dataverse file ids, as in gears/pertdata.py (PertData.__init__, set_pert_genes).
GEARS_FILES = {GENE2GO: 6153417, ESSENTIAL: 6934320}


def download_gears_files(outdir: str | Path, server: str = DATAVERSE, timeout: float = 60) -> None:
    """Fetch ``gene2go_all.pkl`` and the essential-gene list into ``outdir``."""
    for name, file_id in GEARS_FILES.items():
        url = f"{server.rstrip('/')}/api/access/datafile/{file_id}"
        log.info("downloading %s from %s", name, url)
        with (
            atomic_path(Path(outdir) / name) as tmp,
            urllib.request.urlopen(url, timeout=timeout) as r,
        ):
            tmp.write_bytes(r.read())
        _load_pickle(Path(outdir) / name)


def _load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise InputError(
            path, "file", f"is not a readable pickle ({err})", "delete it and download it again"
        ) from err


def condition_genes(conditions: Iterable[str]) -> list[str]:
    """Genes named by perturbation conditions ('A+ctrl', 'A+B'), sorted, 'ctrl' left out."""
    genes = {g for c in conditions for g in perturbed_genes(c)}
    return sorted(genes)


def perturbation_genes(
    gene2go_path: str | Path,
    essential_path: str | Path | None,
    measured: Iterable[str],
    conditions: Iterable[str],
) -> np.ndarray:
    """GEARS's ``pert_names``: sorted genes that have GO terms and are in the gene set."""
    gene2go = _load_pickle(Path(gene2go_path))
    if essential_path is not None and Path(essential_path).exists():
        gene_set = list(_load_pickle(Path(essential_path)))
    else:
        gene_set = list(measured) + condition_genes(conditions)
    return np.unique([g for g in gene_set if g in gene2go])


def fallback_perturbation_genes(measured: Iterable[str], conditions: Iterable[str]) -> np.ndarray:
    """Without GEARS's files: measured plus perturbed genes, no GO restriction."""
    return np.unique(list(measured) + condition_genes(conditions))


def drop_reason(condition: str, pert_names: set[str]) -> str | None:
    """Why GEARS's ``filter_pert_in_go`` drops ``condition``, or None if it keeps it."""
    if condition == CONTROL:
        return None
    missing = [g for g in perturbed_genes(condition) if g not in pert_names]
    if not missing:
        return None
    return f"{', '.join(missing)} not in GEARS's perturbation-gene list (GO-annotated gene set)"


def go_filter_report(
    processed: str | Path, output: str | Path, gears_dir: str | Path | None
) -> dict[str, Any]:
    """Write ``go_filter.json``: the perturbation-gene list, kept and dropped conditions."""
    obs, var = read_annotations(processed)
    conditions = list(pd.unique(obs["condition"].astype(str)))
    measured = gene_symbols(var)
    gene2go = Path(gears_dir) / GENE2GO if gears_dir else None
    applied = gene2go is not None and gene2go.exists()
    if applied:
        names = perturbation_genes(gene2go, Path(gears_dir) / ESSENTIAL, measured, conditions)
    else:
        names = fallback_perturbation_genes(measured, conditions)
    name_set = set(names.tolist())
    dropped = {c: r for c in conditions if (r := drop_reason(c, name_set)) is not None}
    report = {
        "applied": applied,
        "gene2go": str(gene2go) if applied else None,
        "essential_genes": str(Path(gears_dir) / ESSENTIAL)
        if applied and (Path(gears_dir) / ESSENTIAL).exists()
        else None,
        "n_conditions": len(conditions),
        "kept": [c for c in conditions if c not in dropped],
        "dropped": dropped,
        "pert_names": names.tolist(),
    }
    write_json_atomic(output, report)
    log.info(
        "GO filter %s: kept %d of %d conditions",
        "applied" if applied else "not applied (no gene2go_all.pkl)",
        len(report["kept"]),
        len(conditions),
    )
    return report


def read_go_filter(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    report = json.loads(path.read_text()) if path.exists() else {}
    if "pert_names" not in report:
        raise InputError(path, "file", "is missing or not a GO filter report", "run go-filter")
    return report
