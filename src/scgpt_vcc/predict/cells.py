"""Which cells a prediction file holds, how they are built, and how the files are written.

CONTRACT of ``results/predictions/{dataset}/seed{seed}/{model_type}.h5ad`` (one per model
type) and ``.../real.h5ad`` (the truth they are compared with):

* ``X``: CSR float32, log1p of counts normalised to the data's depth: the scale of
  ``converted.h5ad``/``perturb_processed.h5ad`` (what cell-eval expects). Every gene of the
  data, in the data's order (18,080 for VCC).
* ``obs.target_gene``: the perturbed gene, or the control label (``non-targeting``) for
  control cells; ``obs.condition``: GEARS's condition (``GENE+ctrl``, ``ctrl``);
  ``obs.input_row``: row in ``perturb_processed.h5ad`` of the real control cell the
  predicted cell started from (for real cells: the cell's own row).
* Cells: first the control cells (real, unchanged, the same cells in every file of a seed),
  then per held-out perturbation (the split's ``test`` conditions) as many cells as the real
  data has (``n_cells: null``) or ``n_cells``. With ``n_cells: null`` predicted cell ``i``
  starts from the control cell that the seed's pairing file pairs with real cell ``i``;
  otherwise control cells are drawn at random (seeded).
* ``real.h5ad``: the same control cells plus every real cell of the held-out perturbations.
* ``uns['scgpt_vcc_prediction']``: model type, seed, split file, settings and the
  construction's diagnostics (below).
* Several cell contexts (``obs.cell_type`` of the data holds more than one value): every
  held-out perturbation is predicted in each context that measured it, from that context's
  control cells, by a model fitted (baselines) or averaged (scGPT) over that context; the
  cells carry ``obs.cell_type`` and predicted cells are named ``{context}:{target}_pred{i}``.
  With one context the files have no ``cell_type`` column, as the VCC's.

How predicted cells are built (their mean is the model's population mean):
:mod:`scgpt_vcc.predict.population`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from scgpt_vcc.data.gears import (
    CONTEXT,
    CONTROL,
    cell_contexts,
    gene_symbols,
    perturbed_genes,
)
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import (
    CsrRowReader,
    H5adStreamWriter,
    atomic_path,
    read_annotations,
    read_uns,
)
from scgpt_vcc.predict.population import (
    ContextModel,
    Diagnostics,
    match_mean,
    population_means,
    row_batches,
)

log = logging.getLogger(__name__)

# uns section of every prediction file, and the model type recorded in real.h5ad's.
PREDICTION_UNS = "scgpt_vcc_prediction"
REAL_MODEL_TYPE = "real"


class ExpressionData:
    """A GEARS-format h5ad (``perturb_processed.h5ad`` or ``converted.h5ad``) read by rows."""

    def __init__(self, path: str | Path, control_label: str | None = None) -> None:
        self.path = Path(path)
        obs, var = read_annotations(self.path)
        if "condition" not in obs:
            raise InputError(self.path, "obs.condition", "is missing", "run convert-to-gears")
        self.genes: list[str] = list(gene_symbols(var))
        self.var = pd.DataFrame({"gene_name": self.genes}, index=pd.Index(self.genes))
        if "gene_id" in var:
            self.var["gene_id"] = var["gene_id"].astype(str).to_numpy()
        self.condition = obs["condition"].astype(str).to_numpy()
        self.context = cell_contexts(obs)
        self.obs_names = obs.index.astype(str).to_numpy()
        settings = read_uns(self.path).get("scgpt_vcc", {})
        self.control_label = control_label or str(settings.get("control_label", "non-targeting"))
        # Depth the counts were normalised to (None in files not written by convert-to-gears).
        self.target_sum: float | None = settings.get("target_sum")
        self.reader = CsrRowReader(self.path)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def control_rows(self) -> np.ndarray:
        return np.flatnonzero(self.condition == CONTROL)

    @property
    def contexts(self) -> list[str]:
        """The contexts of the cells, sorted."""
        return sorted(set(self.context))

    @property
    def several_contexts(self) -> bool:
        return len(self.contexts) > 1

    def in_context(self, context: str) -> ExpressionData:
        """The same file seen through one context: other contexts' cells have no condition,
        so ``control_rows``, ``rows_of`` and the baselines' means see this context only; rows
        keep their numbers in the file."""
        view = copy.copy(self)
        view.condition = np.where(self.context == context, self.condition, "")
        return view

    def rows_of(self, condition: str) -> np.ndarray:
        return np.flatnonzero(self.condition == condition)

    def read(self, rows: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """Dense float32 expression of ``rows`` (any order, repeats allowed)."""
        if columns is None:
            columns = np.arange(self.n_genes)
        return self.reader.read_dense(np.asarray(rows, dtype=np.int64), columns)

    def target_label(self, condition: str) -> str:
        """``obs.target_gene`` of a condition: ``A+ctrl`` -> ``A``, ``ctrl`` -> control label."""
        genes = perturbed_genes(condition)
        return "+".join(genes) if genes else self.control_label


@dataclass(frozen=True)
class Group:
    """Cells of one perturbation: predicted from ``input_rows`` (control cells).

    ``context``: the cell context of a several-context dataset (``None``: the only one).
    """

    target_gene: str
    condition: str
    input_rows: np.ndarray
    context: str | None = None

    @property
    def targets(self) -> list[str]:
        return perturbed_genes(self.condition)

    @property
    def label(self) -> str:
        """Name of the group in a file: the target, with its context when there are several."""
        return self.target_gene if self.context is None else f"{self.context}:{self.target_gene}"

    def real_rows(self, data: ExpressionData) -> np.ndarray:
        """Rows of the real cells of this perturbation (in its context)."""
        source = data if self.context is None else data.in_context(self.context)
        return source.rows_of(self.condition)


def context_views(data: ExpressionData) -> list[tuple[str | None, ExpressionData]]:
    """``(context, view)`` per context of a several-context file, else ``[(None, data)]``."""
    if not data.several_contexts:
        return [(None, data)]
    return [(context, data.in_context(context)) for context in data.contexts]


def heldout_groups(
    data: ExpressionData,
    conditions: Sequence[str],
    control_row: np.ndarray,
    n_cells: int | None,
    seed: int,
) -> list[Group]:
    """One :class:`Group` per held-out condition and context that measured it (controls
    and unknown conditions skipped)."""
    rng = np.random.default_rng(seed)
    groups = []
    for context, view in context_views(data):
        controls = view.control_rows
        for condition in conditions:
            if condition == CONTROL:
                continue
            real = view.rows_of(condition)
            if real.size == 0:
                where = data.path if context is None else f"{data.path} (context {context})"
                log.warning("held-out condition %s has no cells in %s; skipped", condition, where)
                continue
            if n_cells is None:
                inputs = control_row[real]
            else:
                inputs = rng.choice(controls, size=n_cells, replace=n_cells > controls.size)
            target = data.target_label(condition)
            groups.append(Group(target, condition, np.asarray(inputs), context))
    return groups


def sample_controls(data: ExpressionData, n: int | None, seed: int) -> np.ndarray:
    """Rows of ``n`` control cells of each context (all when ``None`` or more than exist),
    sorted."""
    rng = np.random.default_rng([seed, 1])
    picked = []
    for _, view in context_views(data):
        rows = view.control_rows
        picked.append(rows if n is None or n >= rows.size else rng.choice(rows, n, replace=False))
    return np.sort(np.concatenate(picked))


def _obs(
    data: ExpressionData, control_rows: np.ndarray, groups: Sequence[Group], real: bool
) -> pd.DataFrame:
    parts = [
        pd.DataFrame(
            {
                "target_gene": data.control_label,
                "condition": CONTROL,
                "input_row": control_rows,
            },
            index=data.obs_names[control_rows],
        )
    ]
    for g in groups:
        rows = g.real_rows(data) if real else g.input_rows
        index = data.obs_names[rows] if real else [f"{g.label}_pred{i}" for i in range(rows.size)]
        parts.append(
            pd.DataFrame(
                {"target_gene": g.target_gene, "condition": g.condition, "input_row": rows},
                index=pd.Index(index),
            )
        )
    obs = pd.concat(parts)
    obs.index = obs.index.astype(str)
    columns = ["target_gene", "condition"]
    if data.several_contexts:  # predicted cells share their input control cell's context
        obs[CONTEXT] = data.context[obs["input_row"].to_numpy()]
        columns.append(CONTEXT)
    for col in columns:
        obs[col] = pd.Categorical(obs[col].astype(str))
    obs["input_row"] = obs["input_row"].astype(np.int64)
    return obs


def rescale_log1p(block: np.ndarray, factor: float) -> np.ndarray:
    """log1p values of counts normalised to one depth, re-expressed at ``factor`` x that depth."""
    if factor == 1.0:
        return block
    return np.log1p(np.expm1(block.astype(np.float64)) * factor).astype(np.float32)


def write_cells(
    path: str | Path,
    data: ExpressionData,
    control_rows: np.ndarray,
    groups: Sequence[Group],
    models: Mapping[str | None, ContextModel] | None,
    *,
    batch_size: int = 256,
    columns: np.ndarray | None = None,
    var: pd.DataFrame | None = None,
    uns: dict[str, Any] | None = None,
    depth_factor: float = 1.0,
) -> Diagnostics:
    """Write control cells plus each group's cells.

    ``models=None`` writes the real cells of each group's condition (``real.h5ad``);
    otherwise the model of the group's context (``models[group.context]``) makes its cells
    from its ``input_rows`` (``batch_size`` cells per model call), rescaled to its
    population mean over that context's reference controls (module docstring). One
    group's cells are held in memory at a time.
    ``columns`` selects and orders the genes written (default: all, in data order);
    ``depth_factor`` re-expresses every written value at that multiple of the data's depth
    (:func:`rescale_log1p`; the submission's scale). Returns the construction's diagnostics,
    also stored as ``construction`` in each section of ``uns`` when it is given.
    """
    real = models is None
    means, diagnostics = {}, Diagnostics()
    if not real:
        means, diagnostics = population_means(models, groups)
    obs = _obs(data, control_rows, groups, real)
    if columns is None:
        columns = np.arange(data.n_genes)
    var = data.var.iloc[columns] if var is None else var
    total = len(obs)
    with (
        atomic_path(path) as tmp,
        H5adStreamWriter(tmp, obs, var, uns=uns) as writer,
        tqdm(total=total, desc=f"write {Path(path).name}", unit="cells") as bar,
    ):

        def append(block: np.ndarray) -> None:
            writer.append(sp.csr_matrix(rescale_log1p(block, depth_factor)))
            bar.update(block.shape[0])

        for rows in row_batches(control_rows, batch_size):
            append(data.read(rows, columns))
        for group in groups:
            if real:
                for rows in row_batches(group.real_rows(data), batch_size):
                    append(data.read(rows, columns))
                continue
            model = models[group.context].model
            predicted = np.concatenate(
                [
                    model.cells(data.read(rows), group.targets)
                    for rows in row_batches(group.input_rows, batch_size)
                ]
            )
            cells, negative, filled = match_mean(predicted, means[group.label])
            diagnostics.clipped_values[group.label] = negative
            diagnostics.filled_genes[group.label] = filled
            for start in range(0, cells.shape[0], batch_size):
                append(cells[start : start + batch_size, columns])
        if uns is not None and not real:
            writer.set_uns(
                {
                    name: {**section, "construction": diagnostics.as_uns()}
                    for name, section in uns.items()
                }
            )
    log.info("wrote %s: %d cells x %d genes", path, total, len(columns))
    return diagnostics
