"""Peak memory, wall time and agreement of VCC evaluators, side by side, at growing sizes.

    .venv/bin/python bench/eval_memory.py --cells 2000 5000 10000 --out /tmp/eval_memory.csv

Methods (``--methods``, each in its own child process):

- ``plain``: cell-eval 0.8.2 ``MetricsEvaluator(...).compute(profile="vcc")`` on both files
  in memory (``tests/references.plain_cell_eval``).
- ``ours``: :func:`scgpt_vcc.evaluate.vcc.vcc_metrics` (streamed means, cell-eval MAE/PDS on
  the means, cell-eval DES per group of ``--group-size`` perturbations with all controls).
- ``cell_eval2_v1``: cell-eval2's ``v1`` preset (the VCC 2025 metrics) restricted to its
  ``vcc`` profile (``overlap_at_N``, ``discrimination_score_l1``, ``mae``) on the log1p pair.
- ``cell_eval2_v1_fdr_per_pert``: the same with ``de.fdr_scope="per_pert"`` (FDR within each
  perturbation, as pdex 0.3.0 under cell-eval 0.8.2 does; v1 pools all perturbations as
  pdex 0.1.27 did): a diagnostic of where DES differs.
- ``cell_eval2_vcc2026``: cell-eval2's ``vcc2026`` preset (the 2026 metrics, different from
  DES/PDS/MAE) on a pair of raw-count files written next to the log1p pair; memory and time
  only.

VCC validation size (50 perturbations of ~1,215 cells, ~38k controls, per file):

    .venv/bin/python bench/eval_memory.py --cells 99000 --control-fraction 0.386 \
        --methods ours --dense-prediction --workdir /tmp/eval_val

For each size it writes a VCC-shaped pair (18,080 genes, 50 perturbations + controls;
``real.h5ad`` is log1p of Poisson counts normalised to 20,000 with ~43% non-zeros,
``pred.h5ad`` a noisy copy). When a ``cell_eval2_vcc2026`` method is asked for it also
writes ``counts_real.h5ad`` (the same Poisson counts before normalisation) and
``counts_pred.h5ad`` (Poisson draws of the rate times log-normal noise, from a second
random stream, so the log1p pair is the same with or without them).

Each child's memory is watched from here: the resident set of the child and its
descendants (``VmRSS`` in ``/proc``) is read every ``--poll-s`` seconds, and a child above
``--mem-limit-gb`` (default 19), or running while the machine's ``MemAvailable`` falls
below ``--min-available-gb`` (default 1; other jobs share the machine), is killed with its
process group and recorded as "killed at N GB after T s" instead of taking the machine
down. The peak (``VmHWM``) is logged to ``WORKDIR/cellsN/METHOD.progress`` every 30 s; a
finished child reports its own ``VmHWM`` (its ``ru_maxrss`` would include this process's
peak from before the fork). Per size the row holds peak RSS, wall time and status per
method, the mean DES/PDS/MAE of each method that gives them, and, for ``plain`` and the
``cell_eval2_v1`` methods, the maximum absolute difference from ``ours`` of each
per-perturbation metric.
Results are appended to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
METRICS = ["des", "pds", "mae"]
# Methods whose per-perturbation DES/PDS/MAE are compared with ours.
COMPARED = ("plain", "cell_eval2_v1", "cell_eval2_v1_fdr_per_pert")
# cell-eval2's v1 output names of the three VCC metrics.
CELL_EVAL2_V1_NAMES = {"overlap_at_N": "des", "discrimination_score_l1": "pds", "mae": "mae"}


def write_pair(
    folder: Path,
    n_cells: int,
    n_perts: int,
    control_fraction: float,
    dense_prediction: bool = False,
    counts: bool = False,
    seed: int = 0,
):
    """real.h5ad and pred.h5ad (noisy copy) streamed in chunks; never dense in full.

    With ``dense_prediction`` every predicted value of a perturbed cell is non-zero, as in
    a model's output (stored as CSR it takes twice the dense size): the worst case.
    With ``counts`` also counts_real.h5ad (the Poisson counts behind real.h5ad) and
    counts_pred.h5ad (Poisson draws of the rate times log-normal noise). Those draws come
    from their own generator, so real.h5ad and pred.h5ad do not depend on ``counts``.
    """
    from contextlib import ExitStack

    from scgpt_vcc.io import H5adStreamWriter

    rng = np.random.default_rng(seed)
    count_rng = np.random.default_rng(seed + 1)
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
    names = ["real", "pred"] + (["counts_real", "counts_pred"] if counts else [])
    with ExitStack() as stack:
        out = {
            name: stack.enter_context(H5adStreamWriter(folder / f"{name}.h5ad", obs, var))
            for name in names
        }
        for start in range(0, len(labels), 2000):
            block = labels[start : start + 2000]
            rate = np.stack([base * effects.get(lab, 1.0) for lab in block])
            counts_block = rng.poisson(rate).astype(np.float32)
            x = np.log1p(counts_block / np.maximum(counts_block.sum(1, keepdims=True), 1) * 20000)
            noise = rng.normal(0, 0.3, x.shape).astype(np.float32)
            noisy = np.clip(x + noise * (x > 0), 0, None)
            if dense_prediction:
                perturbed = np.array([lab != CONTROL for lab in block])
                noisy[perturbed] = np.abs(x + noise)[perturbed] + 1e-3
            out["real"].append(sp.csr_matrix(x.astype(np.float32)))
            out["pred"].append(sp.csr_matrix(noisy.astype(np.float32)))
            if counts:
                noisy_rate = rate * np.exp(count_rng.normal(0, 0.3, rate.shape))
                pred_counts = count_rng.poisson(noisy_rate).astype(np.float32)
                out["counts_real"].append(sp.csr_matrix(counts_block))
                out["counts_pred"].append(sp.csr_matrix(pred_counts))


def cell_eval2_table(
    pred: Path,
    real: Path,
    preset: str,
    threads: int,
    metrics: str | None = None,
    fdr_scope: str | None = None,
) -> pd.DataFrame:
    """cell-eval2's long (perturbation, metric, value) frame, one column per metric."""
    import warnings
    from dataclasses import replace

    from cell_eval2 import EvalConfig, compute_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "the v1 presets are deprecated"
        config = EvalConfig.from_preset(preset)
    config = replace(config, pert_col="target_gene", control=CONTROL, num_threads=threads)
    if metrics is not None:
        config = replace(config, metrics=metrics)
    if fdr_scope is not None:
        config = replace(config, de=replace(config.de, fdr_scope=fdr_scope))
    long = compute_metrics(str(pred), str(real), config=config).to_pandas()
    table = long.pivot(index="perturbation", columns="metric", values="value")
    table.index = table.index.astype(str)
    table.index.name = "perturbation"
    table.columns.name = None
    return table


def run_method(method: str, folder: Path, group_size: int, threads: int) -> None:
    """Child process: evaluate and print JSON with peak RSS and wall time."""
    real, pred = folder / "real.h5ad", folder / "pred.h5ad"
    start = time.perf_counter()
    if method == "plain":
        from tests.references import plain_cell_eval

        table = plain_cell_eval(real, pred, CONTROL, threads=threads)
    elif method == "ours":
        from scgpt_vcc.evaluate.means import group_means
        from scgpt_vcc.evaluate.vcc import vcc_metrics

        table = vcc_metrics(
            real,
            pred,
            group_means(real, "target_gene"),
            group_means(pred, "target_gene"),
            CONTROL,
            group_size=group_size,
            threads=threads,
        )
    elif method == "cell_eval2_v1":
        # The "vcc" profile: with v1 names, overlap_at_N, discrimination_score_l1 and mae.
        table = cell_eval2_table(pred, real, "v1", threads, metrics="vcc")
        table = table.rename(columns=CELL_EVAL2_V1_NAMES)[METRICS]
    elif method == "cell_eval2_v1_fdr_per_pert":
        # Diagnostic: v1 with the Benjamini-Hochberg correction within each perturbation
        # (pdex >= 0.2, which cell-eval 0.8.2 uses) instead of over all of them (pdex 0.1.27).
        table = cell_eval2_table(pred, real, "v1", threads, metrics="vcc", fdr_scope="per_pert")
        table = table.rename(columns=CELL_EVAL2_V1_NAMES)[METRICS]
    elif method == "cell_eval2_vcc2026":
        counts_real, counts_pred = folder / "counts_real.h5ad", folder / "counts_pred.h5ad"
        table = cell_eval2_table(counts_pred, counts_real, "vcc2026", threads)
    else:
        raise SystemExit(f"unknown method {method!r}")
    table.to_csv(folder / f"{method}.csv")
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark at fork into the
    # child's ru_maxrss across exec, so a child that stays below the parent (which has just
    # written the data) would report the parent's peak.
    peak_gb = _proc_kb(os.getpid(), "VmHWM") / 1024**2
    print(json.dumps({"peak_rss_gb": peak_gb, "wall_s": time.perf_counter() - start}))


def _proc_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (pid 0: of /proc/meminfo); 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status" if pid else "/proc/meminfo").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    if f"{field}:" not in status:  # a zombie has no memory fields
        return 0
    return int(status.split(f"{field}:")[1].split()[0])


def _descendants(pid: int) -> list[int]:
    """PID and every process below it (from /proc/*/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


def tree_rss_gb(pid: int) -> float:
    return sum(_proc_kb(p, "VmRSS") for p in _descendants(pid)) / 1024**2


def measure(
    method: str,
    folder: Path,
    group_size: int,
    threads: int,
    mem_limit_gb: float,
    poll_s: float = 2.0,
    min_available_gb: float = 1.0,
) -> dict:
    """Run one method in a child; kill it (and its process group) above ``mem_limit_gb``,
    or when the machine has less than ``min_available_gb`` left (other jobs share it).

    Returns ``peak_rss_gb``, ``wall_s`` and ``status``: "ok", "killed at N GB after T s"
    or "failed (exit code N)".
    """
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
    env = {**os.environ, "TQDM_DISABLE": "1"}  # pdex's progress bars
    peak_gb = 0.0
    killed = None
    with (
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
        ) as child,
        open(progress, "w") as log,
    ):
        started = time.perf_counter()
        logged = started
        while True:
            try:
                out, _ = child.communicate(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.perf_counter() - started
            rss_gb = tree_rss_gb(child.pid)
            peak_gb = max(peak_gb, rss_gb, _proc_kb(child.pid, "VmHWM") / 1024**2)
            available_gb = _proc_kb(0, "MemAvailable") / 1024**2
            if killed is None and (rss_gb > mem_limit_gb or available_gb < min_available_gb):
                killed = f"killed at {rss_gb:.1f} GB after {elapsed:.0f} s"
                if rss_gb <= mem_limit_gb:
                    killed += f" (machine down to {available_gb:.1f} GB available)"
                print(f"{elapsed:.0f} s: RSS {rss_gb:.2f} GB: {killed}", file=log, flush=True)
                os.killpg(child.pid, signal.SIGKILL)  # the child leads its own group
            if time.perf_counter() - logged >= 30:
                logged = time.perf_counter()
                print(f"{elapsed:.0f} s: peak RSS {peak_gb:.2f} GB", file=log, flush=True)
        wall_s = time.perf_counter() - started
    if killed:
        return {"peak_rss_gb": peak_gb, "wall_s": wall_s, "status": killed}
    if child.returncode:
        return {
            "peak_rss_gb": peak_gb,
            "wall_s": wall_s,
            "status": f"failed (exit code {child.returncode})",
        }
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gb"] = max(result["peak_rss_gb"], peak_gb)
    return {**result, "status": "ok"}


def agreement(folder: Path, method: str) -> dict:
    """Max abs difference from ours of each per-perturbation metric of ``method``."""
    ours = pd.read_csv(folder / "ours.csv", index_col=0).sort_index()
    other = pd.read_csv(folder / f"{method}.csv", index_col=0).sort_index()
    if list(other.index) != list(ours.index):
        raise SystemExit(f"{method} and ours score different perturbations")
    diff = (other[METRICS] - ours[METRICS]).abs().max()
    return {f"{method}_vs_ours_max_abs_diff_{m}": float(diff[m]) for m in METRICS}


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
    p.add_argument(
        "--methods",
        nargs="+",
        default=["plain", "ours"],
        choices=[
            "plain",
            "ours",
            "cell_eval2_v1",
            "cell_eval2_v1_fdr_per_pert",
            "cell_eval2_vcc2026",
        ],
    )
    p.add_argument("--mem-limit-gb", type=float, default=19.0, help="kill a method above this RSS")
    p.add_argument("--poll-s", type=float, default=2.0, help="seconds between RSS checks")
    p.add_argument(
        "--min-available-gb",
        type=float,
        default=1.0,
        help="kill a method when the machine's MemAvailable drops below this",
    )
    p.add_argument(
        "--reuse-data", action="store_true", help="keep the files of an earlier run if there"
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/scgpt_vcc_eval_memory"))
    p.add_argument("--out", type=Path, default=None, help="default: WORKDIR/eval_memory.csv")
    p.add_argument("--child", default=None)
    p.add_argument("--folder", type=Path, default=None)
    a = p.parse_args()
    if a.child:
        run_method(a.child, a.folder, a.group_size, a.threads)
        return
    counts = "cell_eval2_vcc2026" in a.methods
    rows = []
    for n in a.cells:
        folder = a.workdir / f"cells{n}"
        names = ["real", "pred"] + (["counts_real", "counts_pred"] if counts else [])
        if not (a.reuse_data and all((folder / f"{x}.h5ad").exists() for x in names)):
            started = time.perf_counter()
            write_pair(folder, n, a.perturbations, a.control_fraction, a.dense_prediction, counts)
            print(f"{n} cells: data written in {time.perf_counter() - started:.0f} s")
        row = {"cells_per_file": n, "genes": N_GENES}
        done = set()
        for method in a.methods:
            result = measure(
                method,
                folder,
                a.group_size,
                a.threads,
                a.mem_limit_gb,
                a.poll_s,
                a.min_available_gb,
            )
            row[f"{method}_peak_rss_gb"] = round(result["peak_rss_gb"], 2)
            row[f"{method}_wall_s"] = round(result["wall_s"], 1)
            row[f"{method}_status"] = result["status"]
            if result["status"] == "ok":
                done.add(method)
            print(method, result, flush=True)
        for method in sorted(done & {"ours", *COMPARED}):
            means = pd.read_csv(folder / f"{method}.csv", index_col=0)[METRICS].mean()
            row.update({f"{method}_mean_{m}": round(float(means[m]), 4) for m in METRICS})
        if "ours" in done:
            for method in COMPARED:
                if method in done:
                    row.update(agreement(folder, method))
        rows.append(row)
        print(row, flush=True)
        out = a.out or a.workdir / "eval_memory.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(out, index=False)


if __name__ == "__main__":
    main()
