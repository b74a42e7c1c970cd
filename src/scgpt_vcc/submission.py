"""Virtual Cell Challenge submission: predicted cells per listed perturbation, packed by cell-eval.

Model: the submission's model is trained (scGPT) or fitted (baselines) on **every**
training perturbation, the ``all_train`` split, never on an evaluation seed's split.

For each row of the counts CSV (``target_gene,n_cells,median_umi_per_cell``: the
validation list, or the test-phase list) ``n_cells`` cells are predicted, each from a
control cell of the training data drawn at random (seeded), rescaled to the model's
population mean like every prediction (:mod:`scgpt_vcc.predict.population`). The training
``non-targeting`` cells are added unchanged.

Scale: cell-eval normalises the real (count) cells of the scored file to *that file's*
median total count before log1p, so the submission is log1p of counts normalised to that
depth, the ``target_sum``. The scorer's file is not available to the user; its depth is
estimated from the counts CSV as the cell-weighted median of ``median_umi_per_cell``
(:func:`estimate_target_sum`), or set by ``submission.target_sum``. Predictions are made on
the training data's scale (log1p of counts normalised to the training median) and
re-expressed at the target sum (:func:`scgpt_vcc.predict.cells.rescale_log1p`). cell-eval
accepts fractional values in [0, 15) as already normalised; never CP10k against counts.
Genes follow ``gene_names.csv`` (no header).

Cell cap (``max_cells``, 100,000 in the validation phase): controls fill what the
perturbations leave; when fewer than ``min_control_cells`` would remain, every
perturbation's count is scaled down by the same factor so that they fit. Both are logged
and recorded in ``submission.json``.

The ``.vcc`` file is made by ``cell-eval prep`` itself; cell-eval does not check the exit
codes of the ``zstd`` and ``tar`` programs it calls, so they are checked first and the
archive is verified afterwards.
"""

from __future__ import annotations

import difflib
import logging
import math
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.stats import norm

from scgpt_vcc.data.gears import CONTEXT, read_split
from scgpt_vcc.data.genes import read_gene_list
from scgpt_vcc.errors import InputError
from scgpt_vcc.evaluate.score import SUBMISSION_UNS
from scgpt_vcc.io import write_json_atomic
from scgpt_vcc.predict.cells import ExpressionData, Group, sample_controls, write_cells
from scgpt_vcc.predict.population import CellModel, ContextModel
from scgpt_vcc.predict.run import PredictSettings, build_model, reference_for

log = logging.getLogger(__name__)

PREDICTION_FILE = "prediction.h5ad"
VCC_FILE = "prediction.prep.vcc"
SUMMARY_FILE = "submission.json"
REQUIRED_PROGRAMS = ("zstd", "tar")


@dataclass(frozen=True)
class SubmissionSettings:
    model_type: str = "scgpt_finetuned"
    max_cells: int = 100_000
    min_control_cells: int = 1000
    seed: int = 1
    target_sum: float | None = None  # None: estimated from the counts CSV


COUNTS_COLUMNS = ("target_gene", "n_cells")
DEPTH_COLUMN = "median_umi_per_cell"


def read_counts(
    path: str | Path,
    genes: Sequence[str] | None = None,
    known: Callable[[str], bool] | None = None,
) -> dict[str, int]:
    """``target_gene -> n_cells`` of a VCC counts CSV (validation or test list).

    The CSV has a header (``target_gene,n_cells,median_umi_per_cell``). When ``genes``
    (the submission's ``gene_names.csv``) are given, a target outside them is accepted when
    the model ``known``\s it (scGPT: a token in its vocabulary), and otherwise with a
    warning (the baselines predict train_mean's change for it), unless most listed targets
    are unknown: such a list belongs to another challenge phase or uses other names.
    """
    path = Path(path)
    fix_file = "use the challenge's CSV with the header target_gene,n_cells,median_umi_per_cell"
    if not path.exists():
        raise InputError(path, "file", "does not exist", "set submission.counts_csv")
    try:
        table = pd.read_csv(path, dtype={"target_gene": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(path, "file", f"is not a readable CSV ({err})", fix_file) from err
    table.columns = table.columns.str.strip()
    for column in COUNTS_COLUMNS:
        if column not in table:
            close = difflib.get_close_matches(column, table.columns, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if pd.to_numeric(pd.Series(table.columns), errors="coerce").notna().any():
                hint = "; the first line holds values, so the header is missing"
            raise InputError(
                path, column, f"column is missing (header: {list(table.columns)}){hint}", fix_file
            )
    targets = table["target_gene"].astype(str).str.strip()
    n_cells = pd.to_numeric(table["n_cells"], errors="coerce")
    bad = table.index[n_cells.isna() | (n_cells != n_cells.round())]
    if len(bad):
        raise InputError(
            path, "n_cells", f"is not a whole number in rows {(bad + 2).tolist()[:10]}", fix_file
        )
    bad = table.index[n_cells < 1]
    if len(bad):
        rows = {targets[i]: int(n_cells[i]) for i in bad[:10]}
        raise InputError(
            path, "n_cells", f"zero or negative cell counts {rows}", "ask for at least 1 cell"
        )
    duplicated = targets[targets.duplicated()].unique().tolist()
    if duplicated:
        raise InputError(path, "target_gene", f"repeated genes {duplicated[:10]}", "list each once")
    if genes is not None:
        unknown = sorted(t for t in set(targets) - set(genes) if not (known and known(t)))
        if unknown and 2 * len(unknown) <= len(targets):
            log.warning(
                "%d listed targets are not measured genes of the gene list: %s; they are "
                "predicted from the model's knowledge of the target (see the prediction log)",
                len(unknown),
                unknown[:20],
            )
        elif unknown:
            raise InputError(
                path,
                "target_gene",
                f"{len(unknown)} of {len(targets)} genes are not in gene_names.csv "
                f"(e.g. {unknown[:5]})",
                "use the counts CSV and gene_names.csv of the same challenge phase; "
                "check for Ensembl IDs or misspelled symbols",
            )
    return dict(zip(targets, n_cells.astype(int), strict=True))


# Spread (sd of log total counts) of the cells of one perturbation around its median, for
# the mixture median below. The estimate hardly depends on it: for the VCC validation list
# it is 54,150 / 54,143 / 54,139 UMI at 0.2 / 0.3 / 0.5.
LOG_DEPTH_SD = 0.3


def estimate_target_sum(path: str | Path) -> float:
    """Depth cell-eval will normalise the scored cells to, estimated from the counts CSV.

    cell-eval normalises the real cells to the median total count of the scored file; the
    CSV gives each perturbation's median (``median_umi_per_cell``) and cell count. The
    estimate is the median of the mixture of the perturbations' depth distributions, each
    log-normal around its median with sd :data:`LOG_DEPTH_SD` and weighted by its cells
    (the scored file's control cells are not listed, so they are not counted).
    """
    path = Path(path)
    table = pd.read_csv(path)
    table.columns = table.columns.str.strip()
    fix = f"use the challenge's counts CSV (with {DEPTH_COLUMN}) or set submission.target_sum"
    if DEPTH_COLUMN not in table:
        raise InputError(path, DEPTH_COLUMN, "column is missing", fix)
    depth = pd.to_numeric(table[DEPTH_COLUMN], errors="coerce").to_numpy()
    weights = pd.to_numeric(table["n_cells"], errors="coerce").to_numpy()
    if not (np.isfinite(depth).all() and (depth > 0).all()):
        raise InputError(path, DEPTH_COLUMN, "holds missing or non-positive values", fix)
    log_depth = np.log(depth)

    def excess(x: float) -> float:  # cells below exp(x) minus half of all cells
        return float(weights @ norm.cdf((x - log_depth) / LOG_DEPTH_SD) - weights.sum() / 2)

    low, high = log_depth.min() - 1, log_depth.max() + 1
    return float(np.exp(brentq(excess, low, high)))


def cap_cell_counts(
    requested: dict[str, int], available_controls: int, max_cells: int, min_controls: int
) -> tuple[dict[str, int], int]:
    """Cells per perturbation and number of control cells within ``max_cells`` in total."""
    wanted = sum(requested.values())
    floor_controls = min(min_controls, available_controls)
    if wanted + floor_controls <= max_cells:
        return dict(requested), min(available_controls, max_cells - wanted)
    factor = (max_cells - floor_controls) / wanted
    if factor <= 0 or max_cells - floor_controls < len(requested):
        raise InputError(
            "config",
            "submission.max_cells",
            f"{max_cells} cannot hold one cell per perturbation plus {floor_controls} controls",
            "raise max_cells or lower min_control_cells",
        )
    scaled = {g: max(1, math.floor(n * factor)) for g, n in requested.items()}
    log.warning(
        "cap of %d cells: %d requested perturbed cells scaled by %.4f to %d; %d control cells",
        max_cells,
        wanted,
        factor,
        sum(scaled.values()),
        floor_controls,
    )
    return scaled, floor_controls


def gene_columns(data: ExpressionData, gene_names: list[str], path: Path) -> np.ndarray:
    """Column of each ``gene_names`` entry in the data, in ``gene_names`` order."""
    position = {g: i for i, g in enumerate(data.genes)}
    missing = [g for g in gene_names if g not in position]
    if missing:
        raise InputError(
            path,
            "genes",
            f"{len(missing)} are not in {data.path} (e.g. {missing[:5]})",
            "use the gene_names.csv that belongs to the training data",
        )
    return np.array([position[g] for g in gene_names], dtype=np.int64)


def submission_model(
    data: ExpressionData,
    split_path: str | Path,
    settings: SubmissionSettings,
    predict_settings: PredictSettings,
    model_dir: str | Path | None = None,
) -> CellModel:
    """The submission's model: trained or fitted on the split's (``all_train``) training set."""
    train = read_split(split_path)["train"]
    return build_model(settings.model_type, data, train, predict_settings, model_dir)


def write_submission_h5ad(
    data: ExpressionData,
    model: CellModel,
    counts_csv: str | Path,
    gene_names_path: str | Path,
    output: str | Path,
    settings: SubmissionSettings,
    predict_settings: PredictSettings,
) -> dict[str, Any]:
    """Write the submission h5ad of ``model``; return what it holds (for ``submission.json``)."""
    predict_settings = predict_settings.for_model(settings.model_type)
    gene_names = read_gene_list(gene_names_path)
    columns = gene_columns(data, gene_names, Path(gene_names_path))
    counts, n_controls = cap_cell_counts(
        read_counts(counts_csv, gene_names, getattr(model, "knows", None)),
        data.control_rows.size,
        settings.max_cells,
        settings.min_control_cells,
    )
    target_sum = settings.target_sum or estimate_target_sum(counts_csv)
    if data.target_sum is None:
        raise InputError(
            data.path, "uns['scgpt_vcc']['target_sum']", "is missing", "re-run convert-to-gears"
        )
    training_sum = float(data.target_sum)
    log.info("submission scale: log1p of counts normalised to %.1f (training data: %.1f)",
             target_sum, training_sum)  # fmt: skip
    rng = np.random.default_rng([settings.seed, 2])
    groups = [
        Group(gene, f"{gene}+ctrl", rng.choice(data.control_rows, size=n, replace=True))
        for gene, n in counts.items()
    ]
    controls = sample_controls(data, n_controls, settings.seed)
    info = {**asdict(settings), "target_sum": target_sum, "training_target_sum": training_sum}
    write_cells(
        output,
        data,
        controls,
        groups,
        {None: ContextModel(model, reference_for(data, predict_settings))},
        batch_size=predict_settings.batch_size,
        columns=columns,
        var=pd.DataFrame(index=pd.Index(gene_names)),
        uns={SUBMISSION_UNS: {k: v for k, v in info.items() if v is not None}},
        depth_factor=target_sum / training_sum,
    )
    return {
        "model_type": settings.model_type,
        "n_cells": counts,
        "n_control_cells": int(n_controls),
        "total_cells": int(sum(counts.values()) + n_controls),
        "max_cells": settings.max_cells,
        "n_genes": len(gene_names),
        "control_label": data.control_label,
        "target_sum": target_sum,
        "target_sum_source": "config" if settings.target_sum else f"{DEPTH_COLUMN} of the CSV",
    }


def check_programs() -> None:
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        raise InputError(
            "PATH",
            ", ".join(missing),
            "not found; cell-eval prep calls them and does not notice when they are missing",
            "install them (Debian/Ubuntu: apt-get install zstd tar; conda: zstd)",
        )


def run_cell_eval_prep(
    h5ad: str | Path, gene_names: str | Path, output: str | Path, control_label: str
) -> Path:
    """Run ``cell-eval prep`` and verify that it wrote a non-empty, complete archive."""
    check_programs()
    output = Path(output)
    output.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "cell_eval", "prep",
        "-i", str(h5ad), "-g", str(gene_names), "-o", str(output), "-n", control_label,
    ]  # fmt: skip
    log.info("running %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cell-eval prep failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if not output.is_file() or output.stat().st_size == 0:
        raise RuntimeError(
            f"cell-eval prep wrote no {output} (zstd/tar failed?):\n{done.stderr[-3000:]}"
        )
    with tarfile.open(output) as archive:
        members = {m.name: m.size for m in archive.getmembers()}
    if members.get("pred.h5ad.zst", 0) == 0:
        raise RuntimeError(f"{output} lacks a non-empty pred.h5ad.zst: {members}")
    return output


def make_submission(
    data_path: str | Path,
    split_path: str | Path,
    counts_csv: str | Path,
    gene_names_path: str | Path,
    outdir: str | Path,
    settings: SubmissionSettings,
    predict_settings: PredictSettings,
    model_dir: str | Path | None = None,
) -> dict[str, Any]:
    """``prediction.h5ad``, ``prediction.prep.vcc`` and ``submission.json`` in ``outdir``."""
    outdir = Path(outdir)
    check_programs()
    h5ad = outdir / PREDICTION_FILE
    data = ExpressionData(data_path)
    if data.several_contexts:
        raise InputError(
            data_path,
            f"obs.{CONTEXT}",
            f"holds {len(data.contexts)} cell contexts; a VCC submission has one",
            "submit from a dataset of one context (context_column: null)",
        )
    model = submission_model(data, split_path, settings, predict_settings, model_dir)
    summary = write_submission_h5ad(
        data, model, counts_csv, gene_names_path, h5ad, settings, predict_settings
    )
    vcc = run_cell_eval_prep(h5ad, gene_names_path, outdir / VCC_FILE, summary["control_label"])
    summary.update(
        split=str(split_path), counts_csv=str(counts_csv), vcc_file=str(vcc),
        vcc_bytes=vcc.stat().st_size,
    )  # fmt: skip
    write_json_atomic(outdir / SUMMARY_FILE, summary)
    log.info("submission: %d cells, %s (%d bytes)", summary["total_cells"], vcc, vcc.stat().st_size)
    return summary
