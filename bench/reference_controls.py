"""How many reference control cells scGPT's population mean needs: re-draw deviation vs size.

    .venv/bin/python bench/reference_controls.py \
        --model-dir results/models/demo/seed1/scgpt_finetuned --cells 20000 \
        --sizes 128 256 512 1024 --workdir /tmp/reference_controls

A synthetic dataset shaped like the demo's (same genes) but with ``--cells`` cells is
generated and converted, so that it has enough control cells for two disjoint reference
sets of every size. For each size N and a few held-out-like targets, scGPT's population
mean is estimated on two disjoint random sets of N control cells, and the largest
difference over genes between the two estimates is what re-drawing the reference set moves
a gene's pseudobulk by. Two estimators are compared: the regression estimator the workflow
uses (``mean_R f + beta (c - mean_R x)``) and the plain mean over the set (``mean_R f``).
Results go into docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]

from scgpt_vcc.data.convert import convert_to_gears  # noqa: E402
from scgpt_vcc.data.synthetic import SyntheticSpec, write_synthetic_dataset  # noqa: E402
from scgpt_vcc.predict.cells import ExpressionData  # noqa: E402
from scgpt_vcc.predict.population import ControlReference  # noqa: E402
from scgpt_vcc.predict.scgpt import RegressionMoments, load_predictor  # noqa: E402


def estimates(predictor, data: ExpressionData, rows, mean, targets) -> tuple[np.ndarray, ...]:
    """(regression estimate, plain mean) of the population mean over reference ``rows``."""
    reference = ControlReference(data, rows, mean, batch_size=128)
    moments = RegressionMoments(mean.size)
    for control in reference.batches():
        moments.add(control, predictor.cells(control, targets))
    return moments.regression_mean(mean), moments.f / moments.n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--targets", type=int, default=3, help="perturbations measured")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/reference_controls"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    raw, converted = args.workdir / "adata.h5ad", args.workdir / "converted.h5ad"
    if not converted.exists():
        write_synthetic_dataset(
            SyntheticSpec(n_cells=args.cells), REPO / "resources/reference/vcc_gene_names.csv",
            raw, args.workdir / "counts.csv", args.workdir / "genes.csv",
        )  # fmt: skip
        convert_to_gears(raw, converted)
    data = ExpressionData(converted)
    predictor = load_predictor(args.model_dir, data.genes, chunk_size=1536, seed=0)
    controls = data.control_rows
    if 2 * max(args.sizes) > controls.size:
        sys.exit(f"{controls.size} control cells: sizes up to {controls.size // 2} only")
    mean = data.read(controls).mean(axis=0, dtype=np.float64)
    genes = [data.genes[i] for i in predictor.input_columns]
    targets = np.random.default_rng(0).choice(genes, args.targets, replace=False)
    rows = []
    for size in args.sizes:
        for target in targets:
            draw = np.random.default_rng([size, 1]).permutation(controls)
            first = estimates(predictor, data, np.sort(draw[:size]), mean, [target])
            second = estimates(predictor, data, np.sort(draw[size : 2 * size]), mean, [target])
            rows.append(
                {
                    "reference_cells": size,
                    "target": target,
                    "regression": float(np.abs(first[0] - second[0]).max()),
                    "plain_mean": float(np.abs(first[1] - second[1]).max()),
                }
            )
    table = pd.DataFrame(rows).groupby("reference_cells")[["regression", "plain_mean"]].max()
    print(f"{controls.size} control cells, {len(genes)} model genes, targets {list(targets)}")
    print("largest change of any gene's pseudobulk between two disjoint reference sets:")
    print(table.to_markdown(floatfmt=".4f"))


if __name__ == "__main__":
    main()
