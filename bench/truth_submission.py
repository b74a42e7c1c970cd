"""Score the true held-out cells submitted as a prediction: how close to perfect, at which size.

    .venv/bin/python bench/truth_submission.py --cells 1200 4000 20000 --workdir /tmp/truth_sub

For each size it generates a synthetic dataset (2,000 genes, 10 held-out perturbations;
the truth's control cells are as many as the training data's), converts it, and writes
the submission of an oracle that predicts the true cells (``tests.submission_support``),
at the depth estimated from the counts CSV, through ``write_submission_h5ad``; then the
workflow's scoring steps (``score_against_truth``) score it as the challenge would. A
perfect submission has PDS 1, MAE 0 and DES 1; the residuals come from the estimated depth
and from the two files' different control cells (docs/metrics.md). Results go into
docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.submission_support import TruthModel, score_against_truth  # noqa: E402

from scgpt_vcc.data.convert import convert_to_gears  # noqa: E402
from scgpt_vcc.data.synthetic import SyntheticSpec, write_synthetic_dataset  # noqa: E402
from scgpt_vcc.predict.cells import ExpressionData  # noqa: E402
from scgpt_vcc.predict.run import PredictSettings  # noqa: E402
from scgpt_vcc.submission import (  # noqa: E402
    SubmissionSettings,
    estimate_target_sum,
    write_submission_h5ad,
)


def score_truth(n_cells: int, workdir: Path) -> dict[str, float]:
    folder = workdir / f"cells{n_cells}"
    folder.mkdir(parents=True, exist_ok=True)
    spec = SyntheticSpec(n_cells=n_cells, n_genes=2000, n_perturbations=40, seed=11)
    counts, genes, truth = folder / "counts.csv", folder / "genes.csv", folder / "truth.h5ad"
    write_synthetic_dataset(
        spec, REPO / "resources/reference/vcc_gene_names.csv", folder / "adata.h5ad",
        counts, genes, truth,
    )  # fmt: skip
    convert_to_gears(folder / "adata.h5ad", folder / "converted.h5ad")
    data = ExpressionData(folder / "converted.h5ad")
    split = folder / "all_train.pkl"
    with split.open("wb") as fh:
        pickle.dump({"train": sorted(set(data.condition)), "val": [], "test": []}, fh)
    settings, fast = SubmissionSettings(model_type="train_mean"), PredictSettings()
    model = TruthModel(truth, float(data.target_sum))
    write_submission_h5ad(data, model, counts, genes, folder / "pred.h5ad", settings, fast)
    result = score_against_truth(
        folder / "pred.h5ad", truth, folder / "converted.h5ad", split, counts, genes,
        folder / "score.json", settings, fast,
    )  # fmt: skip
    table = pd.read_csv(counts)
    return {
        "n_cells": n_cells,
        "cells_per_perturbation": float(table["n_cells"].median()),
        "estimated_depth": estimate_target_sum(counts),
        **{k: result[k] for k in ("des", "pds", "mae")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[1200, 4000, 20000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/truth_submission"))
    args = parser.parse_args()
    rows = [score_truth(n, args.workdir) for n in args.cells]
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
