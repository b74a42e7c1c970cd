"""Control pairing: which control cell is each cell's "before" state.

GEARS (``PertData.create_cell_graph_dataset``) pairs every perturbed cell with one
control cell drawn uniformly with ``np.random.randint(0, n_controls, 1)``, walking the
conditions in order of first appearance and each condition's cells in row order; a
control cell is paired with itself (x = y). GEARS draws from the unseeded global
generator; here the same draws come from ``RandomState(seed)``, so the pairing equals
GEARS's after ``np.random.seed(seed)`` and is reproducible.

CONTRACT (``data_pyg/pairing_seed{N}.npz``): ``control_row`` int64 [n_obs of
perturb_processed.h5ad], the row of each cell's paired control cell; ``seed`` int64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from scgpt_vcc.data.gears import CONTROL
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import atomic_path, read_annotations


def draw_control_rows(condition: pd.Series, seed: int) -> np.ndarray:
    """``control_row`` for every cell, drawn in GEARS's order from ``RandomState(seed)``."""
    values = np.asarray(condition.astype(str))
    control_rows = np.flatnonzero(values == CONTROL)
    if control_rows.size == 0:
        raise ValueError("no 'ctrl' cells to pair with")
    paired = np.arange(len(values), dtype=np.int64)
    order = [np.flatnonzero(values == c) for c in pd.unique(values) if c != CONTROL]
    perturbed = np.concatenate(order) if order else np.empty(0, dtype=np.int64)
    draws = np.random.RandomState(seed).randint(0, control_rows.size, perturbed.size)
    paired[perturbed] = control_rows[draws]
    return paired


def write_pairing(processed: str | Path, output: str | Path, seed: int) -> None:
    obs, _ = read_annotations(processed)
    if "condition" not in obs:
        raise InputError(processed, "obs.condition", "is missing", "run compute-de first")
    try:
        rows = draw_control_rows(obs["condition"], seed)
    except ValueError as err:
        raise InputError(processed, "obs.condition", str(err), "check control_label") from err
    with atomic_path(output) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, control_row=rows, seed=np.int64(seed))


def read_pairing(path: str | Path, n_obs: int | None = None) -> np.ndarray:
    """``control_row`` of a pairing file, checked against ``n_obs`` when given."""
    with np.load(path) as f:
        rows = f["control_row"]
    if n_obs is not None and rows.shape != (n_obs,):
        raise InputError(
            path,
            "control_row",
            f"has {rows.shape[0]} rows, the data {n_obs}",
            "rerun pair-controls",
        )
    return rows
