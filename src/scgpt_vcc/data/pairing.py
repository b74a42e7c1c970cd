"""Control pairing: which control cell is each cell's "before" state.

GEARS (``PertData.create_cell_graph_dataset``) pairs every perturbed cell with one
control cell drawn uniformly with ``np.random.randint(0, n_controls, 1)``, walking the
conditions in order of first appearance and each condition's cells in row order; a
control cell is paired with itself (x = y). GEARS draws from the unseeded global
generator; here the same draws come from ``RandomState(seed)``, so the pairing equals
GEARS's after ``np.random.seed(seed)`` and is reproducible.

With several contexts (``obs.cell_type``), a perturbed cell draws among the control cells
of its own context: one ``randint`` call with each cell's number of controls as its upper
bound, which for equal bounds (one context) draws exactly what GEARS's scalar call does.

CONTRACT (``data_pyg/pairing_seed{N}.npz``): ``control_row`` int64 [n_obs of
perturb_processed.h5ad], the row of each cell's paired control cell, a control cell of
the same context (``obs.cell_type``; one context when the column is absent); ``seed`` int64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from scgpt_vcc.data.gears import CONTEXT, CONTROL
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import atomic_path, read_annotations


def _controls_by_context(
    is_control: np.ndarray, contexts: np.ndarray, n_contexts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Control rows grouped by context: context k's are ``pool[start[k] : start[k] + n[k]]``
    (in row order, as GEARS's ``ctrl_adata``)."""
    pool = np.flatnonzero(is_control)[np.argsort(contexts[is_control], kind="stable")]
    n = np.bincount(contexts[is_control], minlength=n_contexts)
    start = np.concatenate(([0], np.cumsum(n)[:-1])).astype(np.int64)
    return pool, start, n


def draw_control_rows(
    condition: pd.Series, seed: int, context: pd.Series | None = None
) -> np.ndarray:
    """``control_row`` for every cell, drawn in GEARS's order from ``RandomState(seed)``,
    each among the control cells of the cell's ``context`` (None: one context)."""
    values = np.asarray(condition.astype(str))
    contexts, names = np.zeros(len(values), dtype=np.int64), np.array([""])
    if context is not None:
        contexts, names = pd.factorize(np.asarray(context.astype(str)))
    is_control = values == CONTROL
    if not is_control.any():
        raise ValueError("no 'ctrl' cells to pair with")
    pool, start, n = _controls_by_context(is_control, contexts, len(names))
    order = [np.flatnonzero(values == c) for c in pd.unique(values) if c != CONTROL]
    perturbed = np.concatenate(order) if order else np.empty(0, dtype=np.int64)
    cell_context = contexts[perturbed]
    lacking = names[np.unique(cell_context[n[cell_context] == 0])].tolist()
    if lacking:
        raise ValueError(f"no 'ctrl' cells to pair with in the contexts {lacking[:10]}")
    draws = np.random.RandomState(seed).randint(0, n[cell_context])
    paired = np.arange(len(values), dtype=np.int64)
    paired[perturbed] = pool[start[cell_context] + draws]
    return paired


def write_pairing(processed: str | Path, output: str | Path, seed: int) -> None:
    obs, _ = read_annotations(processed)
    if "condition" not in obs:
        raise InputError(processed, "obs.condition", "is missing", "run compute-de first")
    try:
        rows = draw_control_rows(obs["condition"], seed, obs.get(CONTEXT))
    except ValueError as err:
        raise InputError(
            processed,
            "obs.condition",
            str(err),
            "check control_label; every context needs control cells",
        ) from err
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
