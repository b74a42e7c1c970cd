"""Benchmark: CPU training throughput and peak memory, our finetuning vs the scGPT tutorial's.

    .venv/bin/python bench/train_throughput.py --workdir /tmp/train_bench \
        --embsize 256 --nlayers 4 --nheads 8 --batch 32 --warmup 1 --steps 4

Both methods train the same model size on the same data (``scgpt-vcc make-synthetic-dataset``
at ``--n-genes`` genes, run through our data stages: convert-to-gears, compute-de,
pair-controls, go-filter, build-split (simulation, seed 1), write-cell-graphs), with the same
batch, sequence length (``min(--max-seq-len, genes)``), fp32, ``--threads`` torch threads,
Adam (lr 1e-4), MSE on the sampled genes and gradient clipping at 1.0, from the same random
checkpoint (whole-human vocabulary size: 60,697 tokens, 98.7% of the data genes in it). Each
method runs in its own process; its peak RSS is that process's ``ru_maxrss`` (DataLoader
worker processes are reported apart, as the largest child's ``ru_maxrss``). Throughput is
cells per second over ``--steps`` optimiser steps after ``--warmup`` steps, timed by a
global optimiser step hook, so batch building and data loading are inside the timing.

* ``ours`` / ``ours-w0``: :func:`scgpt_vcc.train.loop.finetune` itself (the ``finetune``
  step: lazy batches read from ``perturb_processed.h5ad`` + the pairing index, gene subset
  always holding the targets, flags from gene names, our TransformerGenerator) with
  ``max_steps`` = warm-up + timed steps; ``ours`` uses the config default of one batch
  worker process, ``ours-w0`` builds batches in the training process.
* ``ours-bf16``: ``ours-w0`` with ``amp`` and ``cpu_amp`` on (bf16 autocast on CPU);
  ``reference-bf16``: the reference step inside ``torch.autocast("cpu", bfloat16)``, what
  the tutorial would run if its CUDA-only autocast applied on CPU. These two pairs are the
  mixed-precision comparison; the fp32 methods the equal-precision one.
* ``reference``: scgpt 0.2.4's ``TransformerGenerator`` (installed with ``--no-deps``, its
  model module imported without ``scgpt/__init__.py``) trained as the perturbation tutorial
  does: ``PertData.load`` of our ``cell_graphs.pkl`` + ``prepare_split`` +
  ``get_dataloader``; per batch ``x`` reshaped to [B, G], one ``torch.randperm`` gene
  subset of ``max_seq_len``, ids mapped through the vocabulary (out-of-vocabulary genes as
  ``<pad>``), an all-False ``src_key_padding_mask``, ``masked_mse_loss`` on all sampled
  positions, ``clip_grad_norm_(1.0)``, Adam. Adaptation to cell-gears 0.1.2: its graphs have
  no flag column in ``x`` (the tutorial's ``x[:, 1]``), so the flags are set at the gene
  positions of ``pert_names[pert_idx]`` (GEARS's perturbation-gene list), per cell.

``--device cuda`` (bench/gpu_check.py) runs every method on the GPU, each in the precision it
ships with: ``ours`` and ``ours-w0`` in the config's ``auto`` (bf16 from Ampere on),
``ours-bf16`` / ``ours-fp16`` forced, ``ours-compile`` = ``ours`` with ``train.compile``;
``reference`` as the tutorial runs on CUDA (its ``amp=True``: fp16 autocast and a
GradScaler), ``reference-bf16`` in bf16 autocast without a scaler. Step times are read
after a device synchronisation at the first and last timed step, so queued GPU work is
inside the timing; ``peak_gpu_mb`` is ``torch.cuda.max_memory_allocated``.

Prints one JSON line per method and the ratio; writes ``results.json`` in the work folder
(``--profile``: also ``profile_{method}.txt``, torch.profiler's top operators by self CPU time;
profiling slows the run, so its throughput is not comparable).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gears_processing import fake_go_files  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.references import upstream_scgpt  # noqa: E402

SCGPT = [sys.executable, "-m", "scgpt_vcc.cli"]  # also where the entry point is not installed
NAME = "bench"
SEED = 1
VOCAB_SIZE = 60_694  # genes in the whole-human vocabulary (+ <pad>, <cls>, <eoc>)
VOCAB_MATCH = 0.987  # share of VCC genes in it
METHODS = (
    "ours", "ours-w0", "reference", "ours-bf16", "ours-fp16", "ours-compile", "reference-bf16"
)  # fmt: skip


# --------------------------------------------------------------------------- data


def _cli(log: Path, *args: str) -> None:
    with open(log, "a") as err:
        subprocess.run([*SCGPT, *args], check=True, stdout=subprocess.DEVNULL, stderr=err)


def prepare(workdir: Path, n_cells: int, n_genes: int, n_perts: int, size: dict) -> dict:
    """Synthetic data through our data stages, GEARS's layout, plus a random checkpoint."""
    d = workdir / NAME
    pp, pairing = d / "perturb_processed.h5ad", d / "data_pyg" / f"pairing_seed{SEED}.npz"
    go, graphs = d / "go_filter.json", d / "data_pyg" / "cell_graphs.pkl"
    paths = {"dataset": d, "processed": pp, "pairing": pairing, "go_dir": workdir / "go"}
    paths["split"] = d / "splits" / f"{NAME}_simulation_{SEED}_0.75.pkl"
    paths["checkpoint"] = workdir / "checkpoint_{embsize}_{nlayers}_{nheads}_{d_hid}".format(**size)
    if not graphs.exists():
        raw, genes = workdir / "raw.h5ad", workdir / "genes.csv"
        log = workdir / "prepare.log"
        _cli(
            log,
            "make-synthetic-dataset",
            *("--gene-list", str(REPO / "resources/reference/vcc_gene_names.csv")),
            *("--out-adata", str(raw), "--out-gene-names", str(genes)),
            *("--out-validation-counts", str(workdir / "val.csv")),
            *("--n-cells", str(n_cells), "--n-genes", str(n_genes)),
            *("--n-perturbations", str(n_perts), "--seed", "0"),
        )
        fake_go_files(paths["go_dir"], genes)
        converted = workdir / "converted.h5ad"
        _cli(log, "convert-to-gears", str(raw), str(converted))
        _cli(log, "compute-de", str(converted), str(pp), "--stats", str(d / "stats.npz"))
        _cli(log, "pair-controls", str(pp), str(pairing), "--seed", str(SEED))
        _cli(log, "go-filter", str(pp), str(go), "--gears-dir", str(paths["go_dir"]))
        _cli(
            log, "build-split", str(pp), str(d / "splits"), "--go-filter", str(go),
            "--name", NAME, "--split", "simulation", "--seed", str(SEED),
        )  # fmt: skip
        _cli(
            log, "write-cell-graphs", str(pp), str(graphs), "--pairing", str(pairing),
            "--go-filter", str(go),
        )  # fmt: skip
    if not paths["checkpoint"].exists():
        from scgpt_vcc.model import write_random_checkpoint

        genes = (workdir / "genes.csv").read_text().split()
        n_in = round(VOCAB_MATCH * len(genes))
        write_random_checkpoint(
            paths["checkpoint"], genes, vocab_fraction=n_in / len(genes),
            extra_vocab_genes=VOCAB_SIZE - n_in, **size, seed=0,
        )  # fmt: skip
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- workers


class StepClock:
    """Time of every optimiser step, from torch's global step post hook.

    On a GPU the steps numbered in ``sync_steps`` first wait for the device, so the span
    between them holds all the GPU work queued in it (other steps stay asynchronous).
    """

    def __init__(self, sync_steps: tuple[int, ...] = ()) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = []

        def record(*_: object) -> None:
            if len(self.times) in sync_steps and torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        self.handle = register_optimizer_step_post_hook(record)

    def cells_per_s(self, warmup: int, steps: int, batch: int) -> float:
        if len(self.times) < warmup + steps:
            raise RuntimeError(f"only {len(self.times)} optimiser steps ran")
        start = self.times[warmup - 1] if warmup else self.times[0]
        n = steps if warmup else steps - 1
        return n * batch / (self.times[warmup + steps - 1] - start)


def _sync_steps(args: argparse.Namespace) -> tuple[int, ...]:
    return (max(args.warmup - 1, 0), args.warmup + args.steps - 1)


def run_ours(paths: dict, args: argparse.Namespace, workers: int) -> StepClock:
    from scgpt_vcc.train.config import TrainConfig
    from scgpt_vcc.train.loop import finetune

    precision = args.method.partition("-")[2] if args.method.endswith("16") else "auto"
    mixed = args.device == "cuda" or precision != "auto"
    cfg = TrainConfig(
        batch_size=args.batch, max_seq_len=args.max_seq_len, amp=mixed, cpu_amp=mixed,
        precision=precision, compile=args.method == "ours-compile", device=args.device,
        workers=workers, seed=SEED, max_steps=args.warmup + args.steps,
    )  # fmt: skip
    clock = StepClock(_sync_steps(args))
    out = Path(args.workdir) / f"out_{args.method}"
    finetune(paths["processed"], paths["pairing"], paths["checkpoint"], out, cfg, paths["split"])
    (out / "resume" / "state.pt").unlink(missing_ok=True)  # a later run must start fresh
    return clock


def run_reference(paths: dict, args: argparse.Namespace) -> StepClock:
    modules = {"generation": "model.generation_model", "utils": "utils", "loss": "loss"}
    with upstream_scgpt(**modules) as up:
        return _train_reference(up, paths, args)


def _reference_precision(args: argparse.Namespace):
    """Autocast dtype (or None) and whether the tutorial's GradScaler is on."""
    import torch

    if args.method == "reference-bf16":
        return torch.bfloat16, False
    if args.device == "cuda":  # the tutorial's amp=True: torch.cuda.amp.autocast, fp16
        return torch.float16, True
    return None, False  # its autocast and scaler are CUDA-only


def _train_reference(up, paths: dict, args: argparse.Namespace) -> StepClock:
    import torch
    from gears import PertData

    device = torch.device(args.device)
    dtype, scaled = _reference_precision(args)

    torch.manual_seed(SEED)
    pert_data = PertData(paths["go_dir"])
    pert_data.load(data_path=paths["dataset"])
    pert_data.prepare_split(split="simulation", seed=SEED)
    pert_data.get_dataloader(batch_size=args.batch, test_batch_size=args.batch)
    genes = pert_data.adata.var["gene_name"].tolist()
    n_genes = len(genes)
    ckpt = Path(paths["checkpoint"])
    vocab = json.loads((ckpt / "vocab.json").read_text())
    model_args = json.loads((ckpt / "args.json").read_text())
    gene_ids = np.array([vocab.get(g, vocab["<pad>"]) for g in genes], dtype=int)
    # Adaptation: GEARS >= 0.0.4 puts the perturbation in pert_idx (an index into its
    # perturbation-gene list) instead of a flag column of x; map it to gene positions.
    position = {g: i for i, g in enumerate(genes)}
    pert_position = [position.get(g, -1) for g in pert_data.pert_names]

    model = up.generation.TransformerGenerator(
        len(vocab), model_args["embsize"], model_args["nheads"], model_args["d_hid"],
        model_args["nlayers"], nlayers_cls=model_args["n_layers_cls"], n_cls=1, vocab=vocab,
        dropout=0.0, pad_token="<pad>", pad_value=0, pert_pad_id=0, use_fast_transformer=True,
    )  # fmt: skip
    # The tutorial's loading (prefix filter, matching shapes); Wqkv renamed, as without
    # flash-attn the layers are torch's.
    own = model.state_dict()
    pretrained = {
        k.replace("Wqkv.", "in_proj_"): v
        for k, v in torch.load(ckpt / "best_model.pt", map_location="cpu").items()
    }
    own.update(
        {
            k: v
            for k, v in pretrained.items()
            if k.split(".")[0] in ("encoder", "value_encoder", "transformer_encoder")
            and k in own
            and v.shape == own[k].shape
        }
    )
    model.load_state_dict(own)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=scaled)
    clock = StepClock(_sync_steps(args))
    model.train()
    n_steps = args.warmup + args.steps
    max_seq_len = args.max_seq_len
    for step, batch_data in enumerate(pert_data.dataloader["train_loader"]):
        if len(clock.times) == n_steps:  # steps the grad scaler skipped (overflow) do not count
            break
        batch_size = len(batch_data.y)
        x = batch_data.x  # (batch_size * n_genes, 1)
        ori_gene_values = x[:, 0].view(batch_size, n_genes)
        pert_flags = torch.zeros(batch_size, n_genes, dtype=torch.long)
        for i, idx in enumerate(batch_data.pert_idx):
            for j in idx:
                if j != -1:
                    pert_flags[i, pert_position[j]] = 1
        target_gene_values = batch_data.y  # (batch_size, n_genes)
        input_gene_ids = torch.arange(n_genes, dtype=torch.long)
        if len(input_gene_ids) > max_seq_len:
            input_gene_ids = torch.randperm(len(input_gene_ids))[:max_seq_len]
        input_values = ori_gene_values[:, input_gene_ids]
        input_pert_flags = pert_flags[:, input_gene_ids]
        target_values = target_gene_values[:, input_gene_ids]
        mapped_input_gene_ids = up.utils.map_raw_id_to_vocab_id(input_gene_ids, gene_ids)
        mapped_input_gene_ids = mapped_input_gene_ids.repeat(batch_size, 1)
        src_key_padding_mask = torch.zeros_like(input_values, dtype=torch.bool)
        mapped_input_gene_ids, input_values, input_pert_flags, target_values = (
            t.to(device)
            for t in (mapped_input_gene_ids, input_values, input_pert_flags, target_values)
        )
        src_key_padding_mask = src_key_padding_mask.to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            output_dict = model(
                mapped_input_gene_ids, input_values, input_pert_flags,
                src_key_padding_mask=src_key_padding_mask,
                CLS=False, CCE=False, MVC=False, ECS=False,
            )  # fmt: skip
            output_values = output_dict["mlm_output"]
            masked_positions = torch.ones_like(input_values, dtype=torch.bool)
            loss = up.loss.masked_mse_loss(output_values, target_values, masked_positions)
        model.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        # As the tutorial: with its grad scaler on, skipped overflow steps are not errors.
        torch.nn.utils.clip_grad_norm_(
            model.parameters(), 1.0, error_if_nonfinite=not scaler.is_enabled()
        )
        scaler.step(optimizer)
        scaler.update()
        if step == 0:
            _check_flags(batch_data, pert_flags, genes)
    return clock


def _check_flags(batch_data, pert_flags, genes: list[str]) -> None:
    """The adapted flags sit exactly at each cell's perturbed genes (names from ``pert``)."""
    for i, cond in enumerate(batch_data.pert):
        flagged = {genes[j] for j in np.flatnonzero(pert_flags[i].numpy())}
        expected = {g for g in cond.split("+") if g != "ctrl" and g in genes}
        if flagged != expected:
            raise AssertionError(f"cell {i} ({cond}): flags at {sorted(flagged)}")


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    paths = json.loads(Path(args.workdir, "paths.json").read_text())
    profiler = contextlib.nullcontext()
    if args.profile:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    started = time.perf_counter()
    with profiler:
        if args.method.startswith("reference"):
            clock = run_reference(paths, args)
        else:
            workers = 1 if args.method in ("ours", "ours-compile") else 0
            clock = run_ours(paths, args, workers=workers)
    if args.profile:
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        Path(args.workdir, f"profile_{args.method}.txt").write_text(table)
    gc.collect()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    step_s = np.diff(clock.times[args.warmup - 1 if args.warmup else 0 :])
    return {
        "method": args.method,
        "cells_per_s": round(clock.cells_per_s(args.warmup, args.steps, args.batch), 2),
        "median_step_s": round(float(np.median(step_s)), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        # The batch worker is forked from the training process: shared pages count in both.
        "worker_peak_rss_mb": round(children) if args.method == "ours" else None,
        "peak_gpu_mb": (
            round(torch.cuda.max_memory_allocated() / 2**20) if args.device == "cuda" else None
        ),
        "setup_s": round(clock.times[0] - started, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--n-cells", type=int, default=10_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--n-perturbations", type=int, default=50)
    parser.add_argument("--embsize", type=int, default=256)
    parser.add_argument("--nlayers", type=int, default=4)
    parser.add_argument("--nheads", type=int, default=8)
    parser.add_argument("--d-hid", type=int, default=None, help="default: embsize")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=1536)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--profile", action="store_true", help="write profile_{method}.txt (torch.profiler)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(worker(args)), flush=True)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    size = {
        "embsize": args.embsize,
        "nlayers": args.nlayers,
        "nheads": args.nheads,
        "d_hid": args.d_hid or args.embsize,
    }
    paths = prepare(args.workdir, args.n_cells, args.n_genes, args.n_perturbations, size)
    (args.workdir / "paths.json").write_text(json.dumps(paths))
    results = []
    for method in args.methods:
        command = [sys.executable, __file__, *sys.argv[1:], "--method", method]
        with open(args.workdir / f"{method}.log", "w") as log:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True)
        if done.returncode:
            raise SystemExit(f"{method} failed; see {args.workdir / f'{method}.log'}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    by_method = {r["method"]: r for r in results}
    summary = {
        "settings": {
            **size, "batch": args.batch, "max_seq_len": min(args.max_seq_len, args.n_genes),
            "n_genes": args.n_genes, "n_cells": args.n_cells, "threads": args.threads,
            "device": args.device,
            "warmup": args.warmup, "steps": args.steps,
        },
        "results": results,
    }  # fmt: skip
    if "reference" in by_method:
        ref = by_method["reference"]["cells_per_s"]
        summary["ratio_vs_reference"] = {
            m: round(r["cells_per_s"] / ref, 2) for m, r in by_method.items() if m != "reference"
        }
        print("cells/s ratio vs reference:", summary["ratio_vs_reference"])
    (args.workdir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
