"""The VCC 2025 noise ceiling of the held-out real cells, and scores calibrated against it.

How well could any model score? cell-eval 0.8.2 (``--ceiling``) answers with a repeat of the
experiment made from the real cells alone: every perturbation's cells, the controls' too, are
shuffled and cut into two disjoint halves of ``floor(n/2)`` cells, one half is scored as the
"real" file and the other as the "prediction", and the per-perturbation scores are averaged.
Each half has half the cells, so that mean understates agreement at full depth; for DES and
PDS the Spearman-Brown prophecy ``r' = 2r/(1+r)`` (for ``r > 0``, else no ceiling) maps it to
full depth, as cell-eval does. cell-eval gives MAE no ceiling; ours is half the half-split
MAE (see :data:`DEFINITIONS` and docs/metrics.md).

The halves are drawn exactly as cell-eval draws them (same generator, groups visited in the
same order), written as two temporary h5ad files row chunk by row chunk, and scored by
:func:`~scgpt_vcc.evaluate.vcc.vcc_metrics`, so nothing is densified and the numbers are
cell-eval's (``tests/test_evaluate_ceiling.py``).

The calibrated score of a model is ``(u - b) / (r - b)``: 0 at the baseline ``b`` (the
challenge score's), 1 at the ceiling ``r``. It is not clipped.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scgpt_vcc.errors import InputError
from scgpt_vcc.evaluate.contexts import context_files, mean_over_contexts, several_contexts
from scgpt_vcc.evaluate.means import check_log1p, group_means
from scgpt_vcc.evaluate.vcc import VCC_METRICS, cell_eval_version, vcc_metrics
from scgpt_vcc.io import read_annotations, read_json, write_json_atomic, write_rows

if TYPE_CHECKING:
    from scgpt_vcc.evaluate.run import EvalSettings

log = logging.getLogger(__name__)

# Metrics whose half-split mean is carried to full depth by Spearman-Brown (cell-eval's
# SB_METRICS restricted to the vcc profile); MAE, an error, has its own rule.
SPEARMAN_BROWN = ("des", "pds")
DEFINITIONS = {
    "des": "Spearman-Brown 2r/(1+r) of the half-split mean DES (cell-eval --ceiling)",
    "pds": "Spearman-Brown 2r/(1+r) of the half-split mean PDS (cell-eval --ceiling)",
    # The difference of two independent half-depth means has twice the standard deviation
    # of a full-depth mean's error from the truth; for normal errors E|error| scales with it.
    "mae": "half the half-split mean MAE: a perfect model's expected MAE at full depth",
}
FIX = "re-run vcc-ceiling on this real.h5ad (rule vcc2025_ceiling)"


@dataclass(frozen=True)
class Halves:
    """Rows of the real file in each half (in cell-eval's order) and the unsplittable labels."""

    first: np.ndarray
    second: np.ndarray
    dropped: tuple[str, ...]


def disjoint_halves(obs: pd.DataFrame, column: str, seed: int) -> Halves:
    """The halves cell-eval's ``compute_ceiling(seed=seed)`` draws from a file with ``obs``.

    One generator serves every group in turn, so the groups' order is part of the draw: it is
    pandas' groupby order of ``obs[column]`` (a categorical's category order), as in
    cell-eval. Each group's rows are permuted; the first ``n // 2`` go to the first half, the
    next ``n // 2`` to the second (an odd group's last row to neither). Groups of one cell
    cannot be split and are left out of both.
    """
    rng = np.random.default_rng(seed)
    first, second, dropped = [], [], []
    for label, rows in obs.groupby(column, observed=True).indices.items():
        shuffled = rng.permutation(np.asarray(rows))
        size = shuffled.size // 2
        if size == 0:
            dropped.append(str(label))
            continue
        first.append(shuffled[:size])
        second.append(shuffled[size : 2 * size])
    empty = np.zeros(0, dtype=np.int64)
    return Halves(
        np.concatenate(first) if first else empty,
        np.concatenate(second) if second else empty,
        tuple(dropped),
    )


def spearman_brown(r: float) -> float:
    """Reliability of a test of twice the length: ``2r/(1+r)``; NaN unless ``r > 0``."""
    return 2 * r / (1 + r) if r > 0 else math.nan


def ceiling_from_half_split(half_split: Mapping[str, float]) -> dict[str, float]:
    """Full-depth ceiling of every VCC metric from its half-split mean (:data:`DEFINITIONS`)."""
    ceiling = {name: spearman_brown(half_split[name]) for name in SPEARMAN_BROWN}
    ceiling["mae"] = half_split["mae"] / 2
    return {name: ceiling[name] for name in VCC_METRICS}


def half_split_table(real_path: Path, settings: EvalSettings) -> tuple[pd.DataFrame, Halves]:
    """DES, PDS and MAE per perturbation of one half of the real cells against the other
    (halves drawn with ``settings.ceiling_seed``)."""
    s, column = settings, settings.perturbation_column
    obs, _ = read_annotations(real_path)
    if column not in obs:
        raise InputError(real_path, f"obs.{column}", "is missing", "write the real cells' labels")
    obs = obs[[column]]
    halves = disjoint_halves(obs, column, s.ceiling_seed)
    n_control = int((obs[column].astype(str) == s.control_label).sum())
    if n_control < 2:
        raise InputError(
            real_path,
            f"obs.{column}",
            f"has {n_control} '{s.control_label}' control cells",
            "the ceiling splits the controls in two halves: add control cells",
        )
    if halves.dropped:
        log.warning("ceiling: %d perturbation(s) with < 2 cells left out", len(halves.dropped))
    with tempfile.TemporaryDirectory(prefix="vcc_ceiling_") as tmp:
        paths = (Path(tmp) / "half_a.h5ad", Path(tmp) / "half_b.h5ad")
        for path, rows in zip(paths, (halves.first, halves.second), strict=True):
            write_rows(real_path, rows, obs, path, s.chunk_size)
        means = [group_means(path, column, s.chunk_size) for path in paths]
        for half in means:
            check_log1p(real_path, half)
        table = vcc_metrics(
            *paths,
            *means,
            s.control_label,
            column,
            s.vcc_group_size,
            s.threads,
        )
    return table, halves


def vcc_ceiling(
    real_path: str | Path, output: str | Path, settings: EvalSettings
) -> dict[str, Any]:
    """Write the VCC 2025 ceiling of ``real_path`` to ``output`` (``ceiling_vcc2025.json``).

    With several cell contexts, each context's ceiling is under ``contexts`` and the
    top-level ``ceiling`` is their mean (:mod:`.contexts`).
    """
    contexts = several_contexts(real_path)
    if not contexts:
        result = ceiling_of(Path(real_path), settings)
    else:
        with context_files({"real": real_path}, contexts, settings.chunk_size) as files:
            parts = {c: ceiling_of(files[c]["real"], settings) for c in contexts}
        for context, part in parts.items():
            part["real"] = f"{real_path}, context {context}"
        result = {
            "ceiling": mean_over_contexts([part["ceiling"] for part in parts.values()]),
            "control_label": settings.control_label,
            "seed": settings.ceiling_seed,
            "real": str(real_path),
            "contexts": parts,
        }
    write_json_atomic(output, result)
    ceiling = {k: math.nan if v is None else v for k, v in result["ceiling"].items()}
    rounded = {k: round(v, 4) for k, v in ceiling.items()}
    log.info("VCC 2025 ceiling (seed %d): %s", settings.ceiling_seed, rounded)
    return result


def ceiling_of(real_path: Path, settings: EvalSettings) -> dict[str, Any]:
    """The VCC 2025 ceiling of the real cells in ``real_path`` (one context)."""
    seed = settings.ceiling_seed
    table, halves = half_split_table(real_path, settings)
    half_split = {name: float(table[name].mean()) for name in VCC_METRICS}
    ceiling = ceiling_from_half_split(half_split)
    result = {
        "ceiling": json_numbers(ceiling),
        "metrics": {
            name: {
                "half_split": json_number(half_split[name]),
                "ceiling": json_number(ceiling[name]),
                "definition": DEFINITIONS[name],
            }
            for name in VCC_METRICS
        },
        "seed": seed,
        "n_cells_per_half": int(halves.first.size),
        "n_perturbations": len(table),
        "dropped_perturbations": list(halves.dropped),
        "control_label": settings.control_label,
        "cell_eval_version": cell_eval_version(),
        "real": str(real_path),
        "per_perturbation": {
            p: json_numbers(row)
            for p, row in table[list(VCC_METRICS)].to_dict(orient="index").items()
        },
    }
    return result


def json_number(value: float) -> float | None:
    """JSON has no NaN: a missing value is null."""
    return None if math.isnan(value) else float(value)


def json_numbers(values: Mapping[str, float]) -> dict[str, float | None]:
    return {name: json_number(value) for name, value in values.items()}


def read_ceiling(
    path: str | Path, control_label: str, perturbations: list[str], context: str | None = None
) -> dict[str, float]:
    """The ceiling ``{des, pds, mae}`` in ``path`` (null -> NaN; that of ``context`` with
    several contexts), checked against the run."""
    data = read_json(path, FIX)
    if context is not None:
        contexts = data.get("contexts", {}) if isinstance(data, dict) else {}
        if context not in contexts:
            raise InputError(path, f"contexts.{context}", "is missing", FIX)
        data = contexts[context]
    values = data.get("ceiling") if isinstance(data, dict) else None
    if not isinstance(values, dict) or any(name not in values for name in VCC_METRICS):
        raise InputError(path, "ceiling", f"lacks one of {list(VCC_METRICS)}", FIX)
    if data.get("control_label") != control_label:
        raise InputError(
            path, "control_label", f"is {data.get('control_label')!r}, not {control_label!r}", FIX
        )
    covered = set(data.get("per_perturbation", {})) | set(data.get("dropped_perturbations", []))
    if covered != set(perturbations):
        raise InputError(path, "per_perturbation", "names other perturbations than the run", FIX)
    return {name: math.nan if values[name] is None else float(values[name]) for name in VCC_METRICS}


def calibrated_score(u: float, b: float, r: float) -> float:
    """``(u - b) / (r - b)``: 0 at the baseline, 1 at the ceiling; NaN without room between them.

    It holds for errors too: with ``r < b`` a model below the baseline's error scores above 0.
    """
    if math.isnan(r) or r == b:
        return math.nan
    return (u - b) / (r - b) + 0.0  # + 0.0: the baseline scores 0, not -0 (an error's r < b)


def calibrated_scores(
    model: Mapping[str, float], baseline: Mapping[str, float], ceiling: Mapping[str, float]
) -> dict[str, Any]:
    """``calibrated`` {des, pds, mae} and their NaN-ignoring mean ``calibrated_mean``."""
    scores = {
        name: calibrated_score(float(model[name]), float(baseline[name]), float(ceiling[name]))
        for name in VCC_METRICS
    }
    finite = [v for v in scores.values() if not math.isnan(v)]
    return {"calibrated": scores, "calibrated_mean": float(np.mean(finite)) if finite else math.nan}
