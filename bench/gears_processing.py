"""Benchmark: our GEARS processing stages against GEARS's own, at a fraction of VCC size.

Each stage runs as its own process under ``/usr/bin/time -v`` (wall time, peak RSS).
Ours: convert, DE, pairing, GO filter, splits, QC (+ the cell-graph pickle with
``--cell-graphs``). GEARS (``--gears``): ``PertData.new_data_process`` (DE + pickle)
and ``load`` + ``prepare_split``, on the same converted data.

    python bench/gears_processing.py --fraction 0.1 --workdir /tmp/bench10 --gears --cell-graphs
    python bench/gears_processing.py --fraction 1.0 --workdir /tmp/bench100 --drop-raw

Prints one JSON line per stage and writes ``results.json`` in the work folder.
Data: ``scgpt-vcc make-synthetic-dataset`` at VCC shape (18,080 genes, 150
perturbations, ~43% non-zero), ``fraction`` x 221,273 cells.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VCC_CELLS = 221_273
VCC_GENES = 18_080
SCGPT = str(Path(sys.executable).with_name("scgpt-vcc"))

GEARS_PROCESS = """
import sys, anndata as ad, numpy as np
from gears import PertData
adata = ad.read_h5ad(sys.argv[1]); del adata.layers["counts"]
np.random.seed(1)
PertData(sys.argv[2]).new_data_process("bench", adata=adata)
"""
GEARS_LOAD_SPLIT = """
import sys
from gears import PertData
p = PertData(sys.argv[1]); p.load(data_path=sys.argv[1] + "/bench")
p.prepare_split(split="simulation", seed=1)
"""


def timed(name: str, cmd: list[str], workdir: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; return wall and CPU seconds, peak RSS (GB).

    CPU time (user + system) is reported too: on a shared machine it is the steadier
    measure of work done.
    """
    log = workdir / f"{name}.time"
    with open(log, "w") as err:
        subprocess.run(
            ["/usr/bin/time", "-v", *cmd], check=True, stderr=err, stdout=subprocess.DEVNULL
        )
    text = log.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.+)", text).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    cpu = sum(
        float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", text).group(1))
        for kind in ("User", "System")
    )
    result = {
        "stage": name,
        "wall_s": round(seconds, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_gb": round(rss_kb / 2**20, 2),
    }
    print(json.dumps(result), flush=True)
    return result


def make_data(workdir: Path, n_cells: int) -> Path:
    raw = workdir / "raw.h5ad"
    if not raw.exists():
        subprocess.run(
            [
                SCGPT,
                "make-synthetic-dataset",
                "--gene-list",
                str(REPO / "resources/reference/vcc_gene_names.csv"),
                "--out-adata",
                str(raw),
                "--out-validation-counts",
                str(workdir / "val.csv"),
                "--out-gene-names",
                str(workdir / "genes.csv"),
                "--n-cells",
                str(n_cells),
                "--n-genes",
                str(VCC_GENES),
                "--n-perturbations",
                "150",
                "--seed",
                "0",
            ],
            check=True,
        )
    return raw


def fake_go_files(folder: Path, genes_csv: Path) -> None:
    """GEARS insists on gene2go_all.pkl; give every gene one GO term (no internet here)."""
    genes = genes_csv.read_text().split()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "gene2go_all.pkl", "wb") as fh:
        pickle.dump({g: {"GO:0000001"} for g in genes}, fh)
    with open(folder / "essential_all_data_pert_genes.pkl", "wb") as fh:
        pickle.dump(genes, fh)


def ours(workdir: Path, raw: Path, cell_graphs: bool, drop_raw: bool) -> list[dict]:
    d = workdir / "ours" / "bench"
    pp, stats, go = d / "perturb_processed.h5ad", d / "condition_stats.npz", d / "go_filter.json"
    pairing = d / "data_pyg" / "pairing_seed1.npz"
    vocab = workdir / "vocab.json"
    genes = (workdir / "genes.csv").read_text().split()
    vocab.write_text(json.dumps({g: i for i, g in enumerate(genes)}))
    stages = [
        ("convert", ["convert-to-gears", str(raw), str(workdir / "converted.h5ad")]),
        (
            "compute_de",
            ["compute-de", str(workdir / "converted.h5ad"), str(pp), "--stats", str(stats)],
        ),
        ("pair_controls", ["pair-controls", str(pp), str(pairing), "--seed", "1"]),
        ("go_filter", ["go-filter", str(pp), str(go), "--gears-dir", str(workdir / "go")]),
        (
            "build_split",
            [
                "build-split",
                str(pp),
                str(d / "splits"),
                "--go-filter",
                str(go),
                "--name",
                "bench",
                "--split",
                "simulation",
                "--seed",
                "1",
            ],
        ),
        ("data_qc", ["data-qc", str(stats), str(d / "qc"), "--vocab", str(vocab)]),
    ]
    if cell_graphs:
        stages.append(
            (
                "write_cell_graphs",
                [
                    "write-cell-graphs",
                    str(pp),
                    str(d / "data_pyg" / "cell_graphs.pkl"),
                    "--pairing",
                    str(pairing),
                    "--go-filter",
                    str(go),
                ],
            )
        )
    results = []
    for name, args in stages:
        results.append(timed(name, [SCGPT, *args], workdir))
        if name == "convert" and drop_raw:
            raw.unlink()  # full VCC size: frees ~14 GB of disk for the later stages
    return results


def gears(workdir: Path) -> list[dict]:
    root = workdir / "gears"
    fake_go_files(root, workdir / "genes.csv")
    py = sys.executable
    return [
        timed(
            "gears_new_data_process",
            [py, "-c", GEARS_PROCESS, str(workdir / "converted.h5ad"), str(root)],
            workdir,
        ),
        timed("gears_load_prepare_split", [py, "-c", GEARS_LOAD_SPLIT, str(root)], workdir),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fraction", type=float, required=True, help="share of VCC's 221,273 cells"
    )
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--gears", action="store_true", help="also run GEARS's own processing")
    parser.add_argument("--cell-graphs", action="store_true", help="also write cell_graphs.pkl")
    parser.add_argument("--drop-raw", action="store_true", help="delete raw.h5ad after convert")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    n_cells = round(args.fraction * VCC_CELLS)
    raw = make_data(args.workdir, n_cells)
    fake_go_files(args.workdir / "go", args.workdir / "genes.csv")
    results = ours(args.workdir, raw, args.cell_graphs, args.drop_raw)
    if args.gears:
        results += gears(args.workdir)
    summary = {
        "fraction": args.fraction,
        "n_cells": n_cells,
        "n_genes": VCC_GENES,
        "stages": results,
    }
    (args.workdir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
