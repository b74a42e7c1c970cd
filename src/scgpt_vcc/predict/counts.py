"""A prediction file (or ``real.h5ad``) as raw integer counts: the scale of cell-eval2's
``vcc2026`` profile and of VCC 2026 submissions.

The input follows :mod:`scgpt_vcc.predict.cells`' contract (log1p of counts normalised to
the data's depth ``T``, ``obs.input_row`` = a row of ``converted.h5ad``); the counts come
from ``converted.h5ad`` (``layers["counts"]``, ``T`` in ``uns["scgpt_vcc"]``). Per cell:

* **measured cells** (every cell of ``real.h5ad``, and the control cells of every file,
  which are real cells unchanged): the cell's own measured counts (row ``input_row``);
* **predicted cells**: the expected counts ``rate_g = expm1(x_g) * d / T``, where ``d`` is the
  total count of the real control cell the predicted cell was made from (``input_row``), so
  depths are drawn from the real control cells by the seed's pairing (or random draw);
  then integers by ``sampling``:

  - ``round`` (default): stochastic rounding, ``floor(rate) + Bernoulli(rate - floor(rate))``.
    Unbiased, and it adds the least noise (variance ≤ 1/4 per value): our predicted cells
    are made from real control cells and already carry their counting noise, so a second
    full round of it would make every model's cells noisier than real cells (DE metrics
    test cells against real controls). The control model's cells come back as the
    measured counts.
  - ``poisson``: ``Poisson(rate)``, for treating each predicted cell as an expected value
    (adds counting noise with variance ``rate``).

* no cell total may exceed :data:`MAX_CELL_TOTAL` (the VCC 2026 limit): a predicted cell whose
  expected total does is scaled down to it before sampling, and a sampled total above it is
  thinned exactly to it (multivariate hypergeometric); both are counted in ``uns``.

Either way the pseudobulk of the written counts, each cell normalised by its depth ``d``,
equals the prediction's mean of ``expm1(x)`` up to sampling error (``tests/test_counts.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from scgpt_vcc.data.gears import CONTROL
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import (
    CsrRowReader,
    H5adStreamWriter,
    atomic_path,
    read_annotations,
    read_uns,
)
from scgpt_vcc.predict.cells import PREDICTION_UNS, REAL_MODEL_TYPE, ExpressionData

log = logging.getLogger(__name__)

Sampling = Literal["round", "poisson"]
MAX_CELL_TOTAL = 1_000_000
COUNTS_LAYER = "layers/counts"


@dataclass(frozen=True)
class CountSettings:
    """Settings of :func:`write_counts` (config section ``counts``)."""

    sampling: Sampling = "round"
    seed: int = 0
    chunk_size: int = 1024


@dataclass
class CountDiagnostics:
    measured_cells: int = 0
    predicted_cells: int = 0
    scaled_cells: int = 0  # expected total above MAX_CELL_TOTAL, scaled down
    thinned_cells: int = 0  # sampled total above MAX_CELL_TOTAL, thinned to it


def stochastic_round(rate: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``floor(rate)`` plus 1 with probability ``rate - floor(rate)``: unbiased integers."""
    floor = np.floor(rate)
    return floor + (rng.random(rate.shape) < rate - floor)


def sample_counts(
    rate: np.ndarray, sampling: Sampling, rng: np.random.Generator, diagnostics: CountDiagnostics
) -> np.ndarray:
    """Integer counts (float64) of expected counts ``rate`` [cells, genes], totals capped."""
    totals = rate.sum(axis=1)
    over = totals > MAX_CELL_TOTAL
    if over.any():
        rate = rate.copy()
        rate[over] *= (MAX_CELL_TOTAL / totals[over])[:, None]
        diagnostics.scaled_cells += int(over.sum())
    counts = stochastic_round(rate, rng) if sampling == "round" else rng.poisson(rate)
    counts = counts.astype(np.int64)
    for row in np.flatnonzero(counts.sum(axis=1) > MAX_CELL_TOTAL):
        counts[row] = rng.multivariate_hypergeometric(counts[row], MAX_CELL_TOTAL)
        diagnostics.thinned_cells += 1
    return counts.astype(np.float64)


def _gene_columns(
    pred_path: Path, converted_path: Path
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """obs and var of the prediction and the column of each of its genes in converted.h5ad."""
    obs, var = read_annotations(pred_path)
    _, converted_var = read_annotations(converted_path)
    for column in ("input_row", "condition"):
        if column not in obs:
            raise InputError(
                pred_path, f"obs.{column}", "is missing", "write it with scgpt-vcc predict"
            )
    position = pd.Series(np.arange(len(converted_var)), index=converted_var.index.astype(str))
    genes = var.index.astype(str)
    missing = genes[~genes.isin(position.index)]
    if len(missing):
        raise InputError(
            pred_path,
            "var_names",
            f"{len(missing)} are not genes of {converted_path} (e.g. {list(missing[:5])})",
            "convert a prediction of the same converted data",
        )
    return obs, var, position[genes].to_numpy()


def _data_target_sum(converted_path: Path) -> float:
    target_sum = ExpressionData(converted_path).target_sum
    if target_sum is None:
        raise InputError(
            converted_path, "uns.scgpt_vcc.target_sum", "is missing", "run convert-to-gears"
        )
    return float(target_sum)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def write_counts(
    pred_path: str | Path,
    converted_path: str | Path,
    output: str | Path,
    settings: CountSettings = CountSettings(),
    target_sum: float | None = None,
) -> CountDiagnostics:
    """Write ``pred_path``'s cells as integer counts to ``output`` (module docstring).

    ``pred_path`` may hold any of the data's genes in any order (a submission's gene list);
    ``target_sum`` is the depth its values are normalised to (None: the data's, as in every
    prediction file; a submission's own ``target_sum``). A cell's depth ``d`` is its total
    over all genes of the data.
    """
    pred_path, converted_path = Path(pred_path), Path(converted_path)
    obs, var, columns = _gene_columns(pred_path, converted_path)
    target_sum = target_sum or _data_target_sum(converted_path)
    uns = read_uns(pred_path)
    is_real = uns.get(PREDICTION_UNS, {}).get("model_type") == REAL_MODEL_TYPE
    measured = (obs["condition"].astype(str) == CONTROL).to_numpy() | is_real
    input_rows = obs["input_row"].to_numpy(np.int64)
    rng = np.random.default_rng(settings.seed)
    diagnostics = CountDiagnostics()
    predicted = CsrRowReader(pred_path)
    counts = CsrRowReader(converted_path, COUNTS_LAYER)
    uns["scgpt_vcc_counts"] = {
        "sampling": settings.sampling,
        "seed": settings.seed,
        "target_sum": target_sum,
        "max_cell_total": MAX_CELL_TOTAL,
        "source": str(pred_path),
    }
    with (
        atomic_path(output) as tmp,
        H5adStreamWriter(tmp, obs, var, uns) as writer,
        tqdm(total=len(obs), desc=f"counts {Path(output).name}", unit="cells") as bar,
    ):
        for rows in _chunks(len(obs), settings.chunk_size):
            source = counts.read_csr(input_rows[rows]).astype(np.float64)
            depth = np.asarray(source.sum(axis=1)).ravel()
            block = source[:, columns].toarray()
            model = ~measured[rows]
            if model.any():
                values = predicted.read_dense(np.arange(rows.start, rows.stop)[model])
                rate = np.expm1(values.astype(np.float64)) * (depth[model] / target_sum)[:, None]
                block[model] = sample_counts(rate, settings.sampling, rng, diagnostics)
            diagnostics.measured_cells += int((~model).sum())
            diagnostics.predicted_cells += int(model.sum())
            writer.append(sp.csr_matrix(block.astype(np.float32)))
            bar.update(block.shape[0])
        uns["scgpt_vcc_counts"].update(vars(diagnostics))
        writer.set_uns(uns)
    predicted.close()
    counts.close()
    log.info("wrote %s: %s", output, vars(diagnostics))
    return diagnostics
