"""Peak memory of plain cell-eval vs our split VCC evaluation, side by side, at growing sizes.

    .venv/bin/python bench/eval_memory.py --cells 2000 5000 10000 --out /tmp/eval_memory.csv

VCC validation size (50 perturbations of ~1,215 cells, ~38k controls, per file), our method
only (plain cell-eval needs more memory than the 24 GB machine has):

    .venv/bin/python bench/eval_memory.py --cells 99000 --control-fraction 0.386 \
        --methods ours --dense-prediction --workdir /tmp/eval_val

For each size it writes a VCC-shaped pair (18,080 genes, 50 perturbations + controls;
log1p of Poisson counts with ~43% non-zeros; the prediction a noisy copy) and runs each
method in its own process, recording peak RSS (ru_maxrss), wall time and whether the
per-perturbation numbers agree. Results are appended to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.references

N_GENES = 18080
CONTROL = "non-targeting"


def write_pair(
    folder: Path,
    n_cells: int,
    n_perts: int,
    control_fraction: float,
    dense_prediction: bool = False,
    seed: int = 0,
):
    """real.h5ad and pred.h5ad (noisy copy) streamed in chunks; never dense in full.

    With ``dense_prediction`` every predicted value of a perturbed cell is non-zero, as in
    a model's output (stored as CSR it takes twice the dense size): the worst case.
    """
    from scgpt_vcc.io import H5adStreamWriter

    rng = np.random.default_rng(seed)
    genes = [f"GENE{i}" for i in range(N_GENES)]
    n_ctrl = int(n_cells * control_fraction)
    per = (n_cells - n_ctrl) // n_perts
    labels = [CONTROL] * n_ctrl + [g for g in genes[:n_perts] for _ in range(per)]
    obs = pd.DataFrame(
        {"target_gene": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))]
    )
    var = pd.DataFrame(index=genes)
    base = rng.gamma(0.6, 2.0, N_GENES)  # mean ~1.2 counts: ~43% non-zero
    effects = {
        p: np.where(rng.random(N_GENES) < 0.02, rng.uniform(0.2, 4, N_GENES), 1.0)
        for p in genes[:n_perts]
    }
    folder.mkdir(parents=True, exist_ok=True)
    with (
        H5adStreamWriter(folder / "real.h5ad", obs, var) as real,
        H5adStreamWriter(folder / "pred.h5ad", obs, var) as pred,
    ):
        for start in range(0, len(labels), 2000):
            block = labels[start : start + 2000]
            rate = np.stack([base * effects.get(lab, 1.0) for lab in block])
            counts = rng.poisson(rate).astype(np.float32)
            x = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 20000)
            noise = rng.normal(0, 0.3, x.shape).astype(np.float32)
            noisy = np.clip(x + noise * (x > 0), 0, None)
            if dense_prediction:
                perturbed = np.array([lab != CONTROL for lab in block])
                noisy[perturbed] = np.abs(x + noise)[perturbed] + 1e-3
            real.append(sp.csr_matrix(x.astype(np.float32)))
            pred.append(sp.csr_matrix(noisy.astype(np.float32)))


def run_method(method: str, folder: Path, group_size: int, threads: int) -> None:
    """Child process: evaluate and print JSON with peak RSS and wall time."""
    from tests.references import plain_cell_eval

    from scgpt_vcc.evaluate.means import group_means
    from scgpt_vcc.evaluate.vcc import vcc_metrics

    real, pred = folder / "real.h5ad", folder / "pred.h5ad"
    start = time.perf_counter()
    if method == "plain":
        table = plain_cell_eval(real, pred, CONTROL, threads=threads)
    else:
        table = vcc_metrics(
            real,
            pred,
            group_means(real, "target_gene"),
            group_means(pred, "target_gene"),
            CONTROL,
            group_size=group_size,
            threads=threads,
        )
    table.to_csv(folder / f"{method}.csv")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"peak_rss_gb": peak_gb, "wall_s": time.perf_counter() - start}))


def measure(method: str, folder: Path, group_size: int, threads: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--folder",
        str(folder),
        "--group-size",
        str(group_size),
        "--threads",
        str(threads),
    ]
    # The peak so far (VmHWM) is logged every 30 s: at validation size a run takes hours,
    # and its peak is reached in the first DE group, so a stopped run still gives it.
    progress = folder / f"{method}.progress"
    with (
        subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as child,
        open(progress, "w") as log,
    ):
        started = time.perf_counter()
        while True:
            try:
                out, _ = child.communicate(timeout=30)
                break
            except subprocess.TimeoutExpired:
                status = Path(f"/proc/{child.pid}/status").read_text()
                peak_kb = int(status.split("VmHWM:")[1].split()[0])
                elapsed = time.perf_counter() - started
                print(f"{elapsed:.0f} s: peak RSS {peak_kb / 1024**2:.2f} GB", file=log, flush=True)
    if child.returncode:
        raise SystemExit(f"{method} failed with exit code {child.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, nargs="+", default=[2000, 5000, 10000])
    p.add_argument("--perturbations", type=int, default=50)
    p.add_argument("--control-fraction", type=float, default=0.2)
    p.add_argument("--group-size", type=int, default=10)
    p.add_argument(
        "--dense-prediction", action="store_true", help="no zeros in predicted perturbed cells"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["plain", "ours"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/scgpt_vcc_eval_memory"))
    p.add_argument("--out", type=Path, default=None, help="default: WORKDIR/eval_memory.csv")
    p.add_argument("--child", default=None)
    p.add_argument("--folder", type=Path, default=None)
    a = p.parse_args()
    if a.child:
        run_method(a.child, a.folder, a.group_size, a.threads)
        return
    rows = []
    for n in a.cells:
        folder = a.workdir / f"cells{n}"
        write_pair(folder, n, a.perturbations, a.control_fraction, a.dense_prediction)
        row = {"cells_per_file": n, "genes": N_GENES}
        for method in a.methods:
            result = measure(method, folder, a.group_size, a.threads)
            row[f"{method}_peak_rss_gb"] = round(result["peak_rss_gb"], 2)
            row[f"{method}_wall_s"] = round(result["wall_s"], 1)
        if set(a.methods) >= {"plain", "ours"}:
            plain = pd.read_csv(folder / "plain.csv", index_col=0).sort_index()
            ours = pd.read_csv(folder / "ours.csv", index_col=0).sort_index()
            row["max_abs_diff"] = float((plain - ours).abs().max().max())
        rows.append(row)
        print(row, flush=True)
        out = a.out or a.workdir / "eval_memory.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(out, index=False)


if __name__ == "__main__":
    main()
