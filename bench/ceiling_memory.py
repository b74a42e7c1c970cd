"""The VCC 2025 ceiling: cell-eval's own compute_ceiling vs ours (evaluate/ceiling.py).

    .venv/bin/python bench/ceiling_memory.py --cells 2000 5000

For each size it writes a VCC-shaped real file (bench/eval_memory.py's generator: 18,080 genes,
50 perturbations + controls) and runs each method in its own process: "plain" =
``MetricsEvaluator(adata_pred=None, ...).compute_ceiling(profile="vcc", seed=0)`` on the file in
memory, "ours" = :func:`scgpt_vcc.evaluate.ceiling.vcc_ceiling` (halves streamed to temporary
files, DES per group of perturbations). It records peak RSS (ru_maxrss), wall time and the
largest difference of the per-perturbation half-split DES, PDS and MAE and of the DES and PDS
ceilings. Results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.eval_memory

CONTROL = "non-targeting"
SEED = 0


def run_method(method: str, folder: Path, group_size: int, threads: int) -> None:
    """Child process: the ceiling by ``method``; prints JSON with peak RSS and wall time."""
    import anndata as ad

    from scgpt_vcc.evaluate.ceiling import vcc_ceiling
    from scgpt_vcc.evaluate.run import EvalSettings
    from scgpt_vcc.evaluate.vcc import cell_eval_evaluator, per_perturbation_table

    real = folder / "real.h5ad"
    start = time.perf_counter()
    if method == "plain":
        with tempfile.TemporaryDirectory() as tmp:
            evaluator = cell_eval_evaluator(
                ad.read_h5ad(real), None, CONTROL, "target_gene", outdir=tmp, num_threads=threads
            )
            results, agg = evaluator.compute_ceiling(profile="vcc", seed=SEED, write_csv=False)
        table = per_perturbation_table(results)
        row = agg.to_pandas().iloc[0]
        ceiling = {"des": row["overlap_at_N"], "pds": row["discrimination_score_l1"]}
    else:
        settings = EvalSettings(vcc_group_size=group_size, threads=threads, ceiling_seed=SEED)
        result = vcc_ceiling(real, folder / "ceiling_vcc2025.json", settings)
        table = pd.DataFrame.from_dict(result["per_perturbation"], orient="index")
        ceiling = {k: result["ceiling"][k] for k in ("des", "pds")}
    table.to_csv(folder / f"{method}.csv")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        json.dumps(
            {"peak_rss_gb": peak_gb, "wall_s": time.perf_counter() - start, "ceiling": ceiling}
        )
    )


def measure(method: str, folder: Path, group_size: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--folder", str(folder)]
    cmd += ["--group-size", str(group_size), "--threads", str(threads)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, nargs="+", default=[2000, 5000])
    p.add_argument("--perturbations", type=int, default=50)
    p.add_argument("--control-fraction", type=float, default=0.2)
    p.add_argument("--group-size", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["plain", "ours"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/scgpt_vcc_ceiling_memory"))
    p.add_argument("--child", choices=["plain", "ours"])
    p.add_argument("--folder", type=Path)
    args = p.parse_args()
    if args.child:
        run_method(args.child, args.folder, args.group_size, args.threads)
        return
    from bench.eval_memory import write_pair

    rows = []
    for n_cells in args.cells:
        folder = args.workdir / f"cells{n_cells}"
        if not (folder / "real.h5ad").exists():
            write_pair(folder, n_cells, args.perturbations, args.control_fraction)
        row: dict = {"cells": n_cells}
        for method in args.methods:
            result = measure(method, folder, args.group_size, args.threads)
            row[f"{method}_peak_rss_gb"] = round(result["peak_rss_gb"], 2)
            row[f"{method}_wall_s"] = round(result["wall_s"], 1)
            row.update({f"{method}_{k}_ceiling": v for k, v in result["ceiling"].items()})
        if set(args.methods) == {"plain", "ours"}:
            plain = pd.read_csv(folder / "plain.csv", index_col=0).sort_index()
            ours = pd.read_csv(folder / "ours.csv", index_col=0).sort_index()[plain.columns]
            row["max_abs_diff"] = float(np.nanmax(np.abs(plain.to_numpy() - ours.to_numpy())))
        rows.append(row)
        print(json.dumps(row), flush=True)
    pd.DataFrame(rows).to_csv(args.workdir / "ceiling_memory.csv", index=False)


if __name__ == "__main__":
    main()
