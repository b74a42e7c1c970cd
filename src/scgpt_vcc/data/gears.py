"""GEARS's data conventions, defined once: condition names, split pickles, gene symbols.

* ``obs.condition`` is ``ctrl`` for a control cell and ``GENE+ctrl`` for a single
  perturbation (``A+B`` for a combination).
* A split is a pickle of ``{'train': [...], 'val': [...], 'test': [...]}`` condition lists.
* Gene symbols are ``var.gene_name`` where present, else the var index.
* ``obs.cell_type`` is each cell's context (cell line): the config's constant ``cell_type``,
  or with ``context_column`` the value of that input column, so one dataset may hold several.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from scgpt_vcc.errors import InputError

CONTROL = "ctrl"
# obs column of each cell's context; GEARS keys its DE genes by ``{cell_type}_{condition}_{dose}``.
CONTEXT = "cell_type"
SPLIT_KEYS = ("train", "val", "test")


def cell_contexts(obs: pd.DataFrame) -> np.ndarray:
    """Each cell's context as strings; a file without ``obs.cell_type`` is one context ("")."""
    if CONTEXT not in obs:
        return np.full(len(obs), "")
    return obs[CONTEXT].astype(str).to_numpy()


def condition_of(target: str) -> str:
    """GEARS condition of a target gene: ``GENE`` -> ``GENE+ctrl`` (combinations unchanged)."""
    return target if "+" in target else f"{target}+{CONTROL}"


def perturbed_genes(condition: str) -> list[str]:
    """Gene names perturbed in a GEARS condition: ``"A+ctrl"`` -> [A], ``"A+B"`` -> [A, B]."""
    return [g for g in str(condition).split("+") if g and g != CONTROL]


def gene_symbols(var: pd.DataFrame) -> pd.Index:
    """The genes' symbols as strings: ``var.gene_name``, else the var index."""
    genes = var["gene_name"] if "gene_name" in var else var.index
    return pd.Index(genes.astype(str))


def read_split(path: str | Path | None) -> dict[str, list[str]]:
    """Read a GEARS split pickle (``{'train': [...], 'val': [...], 'test': [...]}``).

    ``None`` means "no split": every condition trains. Missing ``val``/``test`` keys are
    returned as empty lists (the original scGPT setup trains without a validation set).
    """
    if path is None:
        return {key: [] for key in SPLIT_KEYS}
    path = Path(path)
    try:
        with path.open("rb") as fh:
            split = pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise InputError(path, "file", f"cannot be read ({err})", "rebuild the split") from err
    if not isinstance(split, dict) or "train" not in split:
        raise InputError(
            path, "train", "is missing", "write a dict with 'train', 'val', 'test' lists"
        )
    return {key: [str(c) for c in (split.get(key) or [])] for key in SPLIT_KEYS}
