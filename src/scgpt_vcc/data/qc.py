"""Data report of the GEARS-format dataset: ``qc/qc.json`` and PNG plots.

Everything comes from the per-condition statistics of ``compute-de`` (no pass over X):
cells per perturbation, knockdown of each target, how many genes the pretrained
vocabulary knows, targets that are not measured genes, labels that are no known gene at
all (neither measured nor in the vocabulary: a guide call such as ``unassigned``, to be
listed in ``convert.exclude_labels``) and perturbations with fewer cells than ``min_cells``.

Knockdown is ``1 - mean / control mean`` of the target's normalised counts (``expm1(X)``),
so 0.8 = 80% fewer transcripts. The ratio of log1p means understates it, log1p being
compressive: 10 normalised counts in control and 0.8 in the perturbed cells are 92% fewer,
while their log1p means differ by only ~75%. The log1p means are reported too, under
keys that name their scale.

With several contexts (cell lines), each perturbation is compared with the control cells
of its own context and knockdown entries are keyed by ``condition_name``
(``{context}_{condition}_{dose}``); cell counts are per perturbation, all contexts summed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scgpt_vcc.data.de import load_stats  # noqa: E402
from scgpt_vcc.data.gears import CONTROL  # noqa: E402
from scgpt_vcc.data.knockdown import WEAK_RESIDUAL  # noqa: E402
from scgpt_vcc.errors import InputError  # noqa: E402
from scgpt_vcc.io import read_json, read_uns, save_figure, write_json_atomic  # noqa: E402

log = logging.getLogger(__name__)


def read_vocab(path: str | Path) -> set[str]:
    """The symbols of a vocab.json (the QC needs no ids)."""
    return set(read_json(path, "check pretrained_dir: it needs the model's vocab.json"))


def row_contexts(stats: dict[str, np.ndarray]) -> list[str]:
    """The context of each stats row; a file without ``contexts`` holds one context."""
    if "contexts" in stats:
        return [str(c) for c in stats["contexts"].tolist()]
    return [""] * len(stats["conditions"])


def control_rows(stats: dict[str, np.ndarray]) -> dict[str, int]:
    """The control row of each context that has one."""
    rows = zip(row_contexts(stats), stats["conditions"].tolist(), strict=True)
    return {ctx: i for i, (ctx, cond) in enumerate(rows) if cond == CONTROL}


def knockdown_table(stats: dict[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
    """Per single-gene perturbation and context: target means in perturbed and control
    cells of that context; keyed by condition (one context) or ``condition_name``."""
    genes = {g: i for i, g in enumerate(stats["genes"].tolist())}
    conditions = stats["conditions"].tolist()
    contexts = row_contexts(stats)
    controls = control_rows(stats)
    keys = conditions if len(set(contexts)) == 1 else stats["condition_names"].tolist()
    counts = stats["mean_normalized_counts"]
    table = {}
    for row, (cond, ctx, key) in enumerate(zip(conditions, contexts, keys, strict=True)):
        target = cond.split("+")[0]
        if cond == CONTROL or target not in genes:
            continue
        g, ctrl = genes[target], controls[ctx]
        pert, base = float(counts[row, g]), float(counts[ctrl, g])
        table[key] = {
            "target_mean_normalized_counts_perturbed": pert,
            "target_mean_normalized_counts_control": base,
            "target_mean_log1p_perturbed": float(stats["mean"][row, g]),
            "target_mean_log1p_control": float(stats["mean"][ctrl, g]),
            "knockdown": 1 - pert / base if base > 0 else None,
        }
    return table


def cells_per_condition(stats: dict[str, np.ndarray]) -> dict[str, int]:
    """Cells per condition (sorted), all contexts summed: a perturbation is one condition."""
    n_cells: dict[str, int] = {}
    for cond, n in zip(stats["conditions"].tolist(), stats["n_cells"].tolist(), strict=True):
        n_cells[cond] = n_cells.get(cond, 0) + int(n)
    return dict(sorted(n_cells.items()))


def _check_stats(stats: dict[str, np.ndarray], path: str | Path) -> None:
    if "mean_normalized_counts" not in stats:
        raise InputError(
            path,
            "mean_normalized_counts",
            "is missing (the file was written by an older compute-de)",
            "delete it and re-run compute_de",
        )
    missing = sorted(set(row_contexts(stats)) - set(control_rows(stats)))
    if missing:
        raise InputError(
            path,
            "conditions",
            f"has no control row for the contexts {missing[:10]}",
            "delete it and re-run compute_de",
        )


def qc_report(stats_path: str | Path, vocab_path: str | Path, min_cells: int) -> dict[str, Any]:
    stats = load_stats(stats_path)
    _check_stats(stats, stats_path)
    n_cells = cells_per_condition(stats)
    conditions = list(n_cells)
    genes = stats["genes"].tolist()
    vocab = read_vocab(vocab_path)
    unmatched = [g for g in genes if g not in vocab]
    gene_set = set(genes)
    targets = sorted({g for c in conditions if c != CONTROL for g in c.split("+") if g != CONTROL})
    return {
        "n_cells": int(sum(n_cells.values())),
        "n_control_cells": int(n_cells.get(CONTROL, 0)),
        "n_perturbations": len(conditions) - (CONTROL in n_cells),
        "cells_per_perturbation": {c: n for c, n in n_cells.items() if c != CONTROL},
        "knockdown": knockdown_table(stats),
        "vocab": {
            "n_genes": len(genes),
            "n_matched": len(genes) - len(unmatched),
            "percent_matched": 100 * (len(genes) - len(unmatched)) / max(len(genes), 1),
            "unmatched": unmatched,
        },
        "targets_not_measured": [t for t in targets if t not in gene_set],
        "labels_not_genes": [t for t in targets if t not in gene_set and t not in vocab],
        "min_cells": min_cells,
        "below_min_cells": {c: n for c, n in n_cells.items() if c != CONTROL and n < min_cells},
    }


def plot_cells(report: dict[str, Any], path: Path) -> None:
    counts = sorted(report["cells_per_perturbation"].values())
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(counts)), counts, width=1.0, color="tab:blue")
    ax.axhline(
        report["min_cells"], color="tab:red", ls="--", label=f"min_cells = {report['min_cells']}"
    )
    ax.set(xlabel="perturbation (sorted)", ylabel="cells", title="Cells per perturbation")
    ax.legend()
    save_figure(fig, path)


def plot_knockdown(report: dict[str, Any], path: Path) -> None:
    values = sorted(
        v["knockdown"] for v in report["knockdown"].values() if v["knockdown"] is not None
    )
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(values)), values, width=1.0, color="tab:green")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(
        xlabel="perturbation (sorted)",
        ylabel="1 - target mean / control mean",
        title="Knockdown of the target gene (normalised counts)",
    )
    save_figure(fig, path)


def guide_report(converted: str | Path) -> dict[str, Any]:
    """Per-guide knockdown and the knockdown filter's report, as convert-to-gears wrote
    them; guides whose knockdown is below ``1 - WEAK_RESIDUAL`` are named weak."""
    uns = read_uns(converted)
    guides = uns.get("scgpt_vcc_guides")
    if guides is None:
        raise InputError(
            converted, "uns['scgpt_vcc_guides']", "is missing", "re-run convert-to-gears"
        )
    guides = guides.astype({"knockdown": float})
    weak = guides[guides["knockdown"] < 1 - WEAK_RESIDUAL]
    if len(weak):
        log.warning(
            "%d guides knock their target down by less than %.0f%%: %s",
            len(weak),
            100 * (1 - WEAK_RESIDUAL),
            ", ".join(f"{r.guide} ({r.knockdown:.0%})" for r in weak.head(20).itertuples()),
        )
    records = guides.astype(object).where(guides.notna(), None).to_dict(orient="records")
    return {
        "guides": records,
        "weak_guides": weak["guide"].tolist(),
        "knockdown_filter": json.loads(uns["scgpt_vcc"]["knockdown_filter"]),
    }


def write_qc(
    stats_path: str | Path,
    vocab_path: str | Path,
    outdir: str | Path,
    min_cells: int = 50,
    converted: str | Path | None = None,
) -> None:
    """Write ``qc.json``, ``cells_per_perturbation.png`` and ``knockdown.png``; with the
    ``converted`` file, the knockdown of every guide too."""
    outdir = Path(outdir)
    report = qc_report(stats_path, vocab_path, min_cells)
    if converted is not None:
        report.update(guide_report(converted))
    if report["labels_not_genes"]:
        log.warning(
            "%d perturbation labels are neither measured genes nor in the scGPT vocabulary: "
            "%s. A label that is not a gene (a guide call such as 'unassigned' or "
            "'multiplet') belongs in convert.exclude_labels, which drops its cells",
            len(report["labels_not_genes"]),
            report["labels_not_genes"][:20],
        )
    plot_cells(report, outdir / "cells_per_perturbation.png")
    plot_knockdown(report, outdir / "knockdown.png")
    write_json_atomic(outdir / "qc.json", report)
    log.info(
        "QC: %d perturbations, %.1f%% genes in vocab, %d below %d cells",
        report["n_perturbations"],
        report["vocab"]["percent_matched"],
        len(report["below_min_cells"]),
        min_cells,
    )
