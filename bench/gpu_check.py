"""The GPU check: one prepared run of what issue #12 measures on a GPU.

    python bench/gpu_check.py --out DIR             # on a GPU machine (real model size)
    python bench/gpu_check.py --out DIR --dry-run   # every step at toy size on the CPU
    python bench/gpu_check.py --out DIR --steps speed --variants compile compile-cudnn

Each step writes its part of ``DIR/gpu_check.json`` as soon as it ends; a failing step is
recorded with its error and the next one still runs. The last lines printed are a summary.

1. ``environment``: torch, CUDA, card, compute capability, the precision ``auto`` picks
   (scgpt_vcc.model.device), and the card's bf16 matrix rate measured on 8192^3 products of
   random data: the denominator of MFU.
2. ``training``: ``bench/train_throughput.py --device cuda`` at the real size (60,697-token
   vocabulary, 512 wide, 12 layers, 8 heads, 1,536 genes per cell, batch 64): ours as
   shipped (bf16, one batch-building worker, ``train.compile``; eager in the dry run)
   against scgpt 0.2.4's model fed as the tutorial does (fp16 autocast + GradScaler). FLOPs
   per trained cell are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one
   forward+backward; MFU = cells/s x FLOPs per cell / measured bf16 rate.
3. ``memory``: real-size training steps (fused Adam, clipping, autocast as ``finetune``) on
   resident random batches per precision and micro-batch: ``max_memory_allocated`` and the
   model-step rate alone (what the data pipeline must keep up with). A linear fit of peak
   memory on micro-batch gives the largest power-of-two micro-batch for an A40 (46,068 MiB)
   and a TITAN RTX (24,220 MiB), keeping 10% and 512 MiB for the CUDA context spare.
4. ``speed``: the model step of ``memory`` at batch 64 in bf16, one variant at a time, to
   find what lifts training past 1,000 cells/s: the attention kernel (flash, as shipped, or
   cuDNN's) and torch.compile's modes (default, as ``train.compile``; CUDA graphs).
5. ``prediction``: ``ScGPTPredictor.cells`` over all 18,080 VCC genes (chunks of 1,536) per
   cells-per-call, eager and compiled, and the time this gives for the VCC validation
   submission: its 60,751 cells plus the 2,048 reference controls of each of its 50
   perturbations.
6. ``tests``: ``pytest -m gpu tests/test_gpu.py`` (mixed-precision training, flash vs math
   attention, a real CUDA out-of-memory, kill-and-resume, compiled training, NCCL).

The GPU machine has torch, numpy, h5py, pandas, scipy, torch-geometric and pytest, but not
anndata, scanpy, cell-gears or scgpt: ``bench/gpu_wheels.sh`` downloads their wheels here and
``bash bench/gpu_check.sh OUT`` installs them there and runs this script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from train_throughput import VOCAB_MATCH  # bench/ is on sys.path when run as a script
from train_throughput import VOCAB_SIZE as VOCAB_GENES

from scgpt_vcc.model.vocab import SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = VOCAB_GENES + len(SPECIAL_TOKENS)  # the whole-human vocabulary: 60,697 tokens
VCC_GENES = REPO / "resources" / "reference" / "vcc_gene_names.csv"
VCC_VALIDATION = {"cells": 60_751, "perturbations": 50}
CARDS_MIB = {"a40": 46_068, "titanrtx": 24_220}  # total memory as nvidia-smi reports it
STEPS = ("environment", "training", "memory", "speed", "prediction", "tests")

REAL = {
    "model": {"embsize": 512, "nlayers": 12, "nheads": 8, "d_hid": 512},
    "max_seq_len": 1536, "batch": 64, "n_genes": 2000, "n_cells": 4000, "n_perts": 50,
    "warmup": 3, "steps": 20, "micro_batches": (16, 32, 64, 128),
    "predict_cells": (64, 256, 1024), "predict_genes": 18_080, "matmul": 8192,
    # ours as shipped (train.compile); eager and fp16 were measured on the H200 (benchmarks.md).
    "methods": ("ours-compile", "reference"),
    "speed_variants": ("compile", "compile-cudnn", "compile-cudagraphs", "eager-cudnn"),
    "speed_steps": 10, "predict_compile": True,
}  # fmt: skip
DRY = {
    "model": {"embsize": 32, "nlayers": 2, "nheads": 4, "d_hid": 32},
    "max_seq_len": 64, "batch": 8, "n_genes": 200, "n_cells": 600, "n_perts": 8,
    "warmup": 1, "steps": 3, "micro_batches": (2, 4),
    "predict_cells": (8, 16), "predict_genes": 600, "matmul": 256,
    "methods": ("ours", "reference"),
    # cuDNN attention and torch.compile are GPU paths (the latter needs minutes of CPU here).
    "speed_variants": ("eager", "eager-math"), "speed_steps": 4, "predict_compile": False,
}  # fmt: skip
# Variants of the speed step: (attention kernel or None for torch's choice, compile mode or
# None for eager). torch picks flash for the unmasked bf16 forward, as finetune runs it.
SPEED_VARIANTS = {
    "eager": (None, None),
    "eager-math": ("math", None),
    "eager-cudnn": ("cudnn", None),
    "compile": (None, "default"),
    "compile-cudnn": ("cudnn", "default"),
    "compile-cudagraphs": (None, "reduce-overhead"),
}


class Report:
    """``gpu_check.json``: one entry per step, rewritten after each."""

    def __init__(self, out: Path, settings: dict) -> None:
        self.path = out / "gpu_check.json"
        self.data: dict = {"settings": settings, "steps": {}}

    def run(self, name: str, step: Callable[[], dict]) -> None:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            result = {"ok": True, **step()}
        except Exception as error:  # record and go on: one failure must not cost the rest
            traceback.print_exc()
            result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        result["seconds"] = round(time.perf_counter() - started, 1)
        self.data["steps"][name] = result
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        print(json.dumps({name: result}, default=str), flush=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- 1 environment


def environment(size: dict) -> dict:
    from scgpt_vcc.model.device import autocast_dtype, precision_name

    dev = device()
    info = {"torch": torch.__version__, "device": str(dev), "cuda": torch.version.cuda}
    if dev.type == "cuda":
        info["card"] = torch.cuda.get_device_name(dev)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        info["memory_mib"] = torch.cuda.get_device_properties(dev).total_memory // 2**20
        info["is_bf16_supported_with_emulation"] = torch.cuda.is_bf16_supported()
    info["auto_precision"] = precision_name(autocast_dtype("auto", dev))
    info["bf16_matmul_tflops"] = matmul_rate(size["matmul"], dev)
    return info


def matmul_rate(n: int, dev: torch.device) -> float:
    """Median TFLOP/s of n^3 bf16 products of random matrices (3 warm-ups, 10 timed)."""
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        synchronize()
        start = time.perf_counter()
        a @ b
        synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return round(2 * n**3 / float(np.median(times)) / 1e12, 1)


# --------------------------------------------------------------------------- 6 tests


def gpu_tests(out: Path, dry_run: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path[1:]])}
    if dry_run:
        env["SCGPT_VCC_GPU_TESTS_ON_CPU"] = "1"
    log = out / "gpu_tests.log"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rs"]
    with log.open("w") as fh:
        done = subprocess.run(
            [*command, str(REPO / "tests" / "test_gpu.py")],
            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    lines = log.read_text().strip().splitlines()
    if done.returncode:
        raise RuntimeError(f"pytest exit {done.returncode}: {lines[-1] if lines else ''}")
    return {"summary": lines[-1]}


# --------------------------------------------------------------------------- 2 training


def training(
    out: Path,
    work: Path,
    size: dict,
    dev: torch.device,
    bf16_tflops: float | None,
    methods: list[str] | None = None,
) -> dict:
    workdir = work / "train"
    model = size["model"]
    command = [
        sys.executable, str(REPO / "bench" / "train_throughput.py"),
        "--workdir", str(workdir), "--device", dev.type,
        "--embsize", str(model["embsize"]), "--nlayers", str(model["nlayers"]),
        "--nheads", str(model["nheads"]), "--d-hid", str(model["d_hid"]),
        "--batch", str(size["batch"]), "--max-seq-len", str(size["max_seq_len"]),
        "--n-genes", str(size["n_genes"]), "--n-cells", str(size["n_cells"]),
        "--n-perturbations", str(size["n_perts"]), "--threads", str(min(os.cpu_count() or 1, 8)),
        "--warmup", str(size["warmup"]), "--steps", str(size["steps"]),
        "--methods", *(methods or size["methods"]),
    ]  # fmt: skip
    with (out / "training.log").open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    for log_file in workdir.glob("reference*.log"):  # the upstream run's own log comes back
        shutil.copy(log_file, out / log_file.name)
    results_file = workdir / "results.json"
    if not results_file.exists():
        raise RuntimeError(f"train_throughput.py exit {done.returncode}; see training.log")
    results = json.loads(results_file.read_text())
    flops = flops_per_cell(size, dev)
    for row in results["results"]:
        row["tflops"] = round(row["cells_per_s"] * flops / 1e12, 1)
        if bf16_tflops:
            row["mfu"] = round(row["tflops"] / bf16_tflops, 3)
    return {"flops_per_cell": flops, "exit": done.returncode, **results}


def real_size_model(size: dict, dev: torch.device, vocab_size: int = VOCAB_SIZE):
    from scgpt_vcc.model.transformer import TransformerGenerator

    m = size["model"]
    torch.manual_seed(0)
    model = TransformerGenerator(
        vocab_size, m["embsize"], m["nheads"], m["d_hid"], m["nlayers"], pad_token_id=0
    )
    return model.freeze_cls_head().to(dev)


def random_batch(n: int, length: int, dev: torch.device, vocab_size: int = VOCAB_SIZE):
    """Gene ids, log1p-like values (70% zeros), one flagged gene, a target near the input."""
    ids = torch.randint(3, vocab_size, (1, length), device=dev).expand(n, -1)
    values = torch.rand(n, length, device=dev) * 4 * (torch.rand(n, length, device=dev) > 0.7)
    flags = torch.zeros(n, length, dtype=torch.long, device=dev)
    flags[:, 0] = 1
    return ids, values, flags, values * 0.9


def flops_per_cell(size: dict, dev: torch.device, n: int = 2) -> int:
    """FLOPs of one training forward+backward per cell, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = real_size_model(size, dev)
    ids, values, flags, target = random_batch(n, size["max_seq_len"], dev)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        F.mse_loss(model(ids, values, flags).float(), target).backward()
    return counter.get_total_flops() // n


# --------------------------------------------------------------------------- 3 memory


def memory(size: dict, dev: torch.device) -> dict:
    from scgpt_vcc.model.device import autocast_dtype

    rows = []
    for precision in ("bf16", "fp16", "fp32"):
        dtype = autocast_dtype(precision, dev)
        for micro in size["micro_batches"]:
            rows.append({"precision": precision, "micro_batch": micro, **train_steps(
                size, dev, dtype, micro
            )})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    fits = {}
    if dev.type == "cuda":
        for precision in ("bf16", "fp16", "fp32"):
            ok = [r for r in rows if r["precision"] == precision and "peak_mib" in r]
            if len(ok) < 2:
                continue
            slope, intercept = np.polyfit(
                [r["micro_batch"] for r in ok], [r["peak_mib"] for r in ok], 1
            )
            fit = {"mib_per_cell": round(float(slope), 1), "fixed_mib": round(intercept)}
            fits[precision] = fit
            for card, mib in CARDS_MIB.items():
                fits[precision][card] = largest_power_of_two(slope, intercept, mib)
    return {"rows": rows, "largest_micro_batch": fits}


def largest_power_of_two(slope: float, intercept: float, card_mib: int) -> int:
    room = 0.9 * (card_mib - 512)
    micro = 1
    while intercept + slope * micro * 2 <= room:
        micro *= 2
    return micro if intercept + slope * micro <= room else 0


def attention_kernel(name: str | None) -> contextlib.AbstractContextManager:
    """Restrict scaled_dot_product_attention to one kernel; None leaves torch's choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name is None:
        return contextlib.nullcontext()
    backend = {"math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    return sdpa_kernel([backend])


def train_steps(
    size: dict,
    dev: torch.device,
    dtype,
    micro: int,
    steps: int = 4,
    attention: str | None = None,
    compile_mode: str | None = None,
) -> dict:
    """Peak memory and model-step cells/s of real-size training on resident batches (the
    median over the second half of ``steps``: compiling and graph capture come first)."""
    model = real_size_model(size, dev)
    forward = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=dev.type == "cuda")
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    batch = random_batch(micro, size["max_seq_len"], dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        times = []
        for _ in range(steps):
            synchronize()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            if compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            with (
                attention_kernel(attention),
                torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                pred = forward(*batch[:3])
                loss = F.mse_loss(pred.float(), batch[3])
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            synchronize()
            times.append(time.perf_counter() - start)
        timed = times[max(1, steps // 2) :]
        result = {"model_step_cells_per_s": round(micro / float(np.median(timed)), 1)}
        if dev.type == "cuda":
            result["peak_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
        return result
    except torch.OutOfMemoryError:
        return {"out_of_memory": True}
    finally:
        del model, forward, optimizer, batch
        torch.compiler.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- 4 speed


def speed(size: dict, dev: torch.device, bf16_tflops: float | None) -> dict:
    """Model-step cells/s of each variant at the training batch; MFU where a rate is known."""
    from scgpt_vcc.model.device import autocast_dtype

    dtype = autocast_dtype("bf16", dev)
    flops = flops_per_cell(size, dev)
    rows = []
    for name in size["speed_variants"]:
        attention, mode = SPEED_VARIANTS[name]
        try:
            row = {"variant": name, **train_steps(
                size, dev, dtype, size["batch"], size["speed_steps"], attention, mode
            )}  # fmt: skip
        except Exception as error:  # one variant's failure is a result, not the step's end
            row = {"variant": name, "error": f"{type(error).__name__}: {error}"[:500]}
        if "model_step_cells_per_s" in row and bf16_tflops:
            row["mfu"] = round(row["model_step_cells_per_s"] * flops / 1e12 / bf16_tflops, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0].get("model_step_cells_per_s")
    for row in rows:
        if base and "model_step_cells_per_s" in row:
            row["vs_first"] = round(row["model_step_cells_per_s"] / base, 3)
    return {"batch": size["batch"], "flops_per_cell": flops, "rows": rows}


# --------------------------------------------------------------------------- 5 prediction


def prediction(size: dict, dev: torch.device) -> dict:
    from scgpt_vcc.data.genes import read_gene_list
    from scgpt_vcc.predict.scgpt import DEFAULT_CHUNK_SIZE, ScGPTPredictor

    genes = read_gene_list(VCC_GENES)[: size["predict_genes"]]
    # The real vocabulary holds 98.7% of the VCC genes: fill the rest with other names.
    n_in = round(VOCAB_MATCH * len(genes))
    tokens = [*SPECIAL_TOKENS, *genes[:n_in]]
    tokens += [f"OTHER{i}" for i in range(VOCAB_SIZE - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    model = real_size_model(size, dev).eval()
    chunk = min(DEFAULT_CHUNK_SIZE, size["max_seq_len"])
    predictor = ScGPTPredictor(model, vocab, genes, chunk_size=chunk, precision="auto")
    rng = np.random.default_rng(0)
    rows = [predict_rate(predictor, genes, n, rng, dev) for n in size["predict_cells"]]
    if size["predict_compile"]:  # predict.compile, at the best size of eager
        compiled = ScGPTPredictor(model, vocab, genes, chunk_size=chunk, compile=True)
        n = max((r for r in rows if "cells_per_s" in r), key=lambda r: r["cells_per_s"])
        rate = predict_rate(compiled, genes, n["cells_per_call"], rng, dev, warmups=2)
        rows.append({"compiled": True, **rate})
    best = max((r for r in rows if "cells_per_s" in r), key=lambda r: r["cells_per_s"])
    cells = VCC_VALIDATION["cells"] + 2048 * VCC_VALIDATION["perturbations"]
    return {
        "genes": len(genes),
        "chunk_size": chunk,
        "precision": str(predictor.dtype),
        "rows": rows,
        "best": best,
        "vcc_validation_cells": cells,
        "vcc_validation_minutes_at_best": round(cells / best["cells_per_s"] / 60, 1),
    }


def predict_rate(
    predictor, genes: list[str], n: int, rng, dev: torch.device, warmups: int = 1
) -> dict:
    """Cells/s of one timed call of ``n`` cells after ``warmups`` calls (compilation)."""
    control = (rng.random((n, len(genes))) * 4 * (rng.random((n, len(genes))) > 0.7)).astype(
        np.float32
    )
    try:
        for _ in range(warmups):
            predictor.cells(control, [genes[0]])
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        synchronize()
        start = time.perf_counter()
        predicted = predictor.cells(control, [genes[0]])
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError:  # the predictor splits calls: only one cell cannot fit
        torch.cuda.empty_cache()
        return {"cells_per_call": n, "out_of_memory": True}
    if not np.isfinite(predicted).all():
        raise AssertionError(f"non-finite predictions at {n} cells per call")
    row = {"cells_per_call": n, "cells_per_s": round(n / seconds, 1)}
    if dev.type == "cuda":
        row["peak_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
    print(json.dumps(row), flush=True)
    return row


# --------------------------------------------------------------------------- main


def summary(data: dict) -> list[str]:
    steps = data["steps"]
    lines = [f"{name}: {'ok' if s['ok'] else 'FAILED ' + s['error']}" for name, s in steps.items()]
    env = steps.get("environment", {})
    lines.append(f"card {env.get('card', 'cpu')}, bf16 {env.get('bf16_matmul_tflops')} TFLOP/s")
    for row in steps.get("training", {}).get("results", []):
        lines.append(
            f"train {row['method']}: {row['cells_per_s']} cells/s, MFU {row.get('mfu')}, "
            f"peak {row.get('peak_gpu_mb')} MB"
        )
    ratios = steps.get("training", {}).get("ratio_vs_reference")
    if ratios:
        lines.append(f"ratio vs reference: {ratios}")
    fits = steps.get("memory", {}).get("largest_micro_batch")
    if fits:
        lines.append(f"largest micro-batch: {fits}")
    for row in steps.get("speed", {}).get("rows", []):
        lines.append(f"speed {row}")
    pred = steps.get("prediction", {})
    if pred.get("ok"):
        lines.append(
            f"predict: {pred['rows']}; VCC validation {pred['vcc_validation_minutes_at_best']} min"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gpu_check_work"
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        choices=STEPS,
        default=list(STEPS),
    )
    parser.add_argument("--methods", nargs="+", help="training methods (default: all of the size)")
    parser.add_argument(
        "--variants", nargs="+", choices=SPEED_VARIANTS, help="speed variants (default: the size's)"
    )
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --dry-run")
    size = DRY if args.dry_run else REAL
    if args.variants:
        size = {**size, "speed_variants": tuple(args.variants)}
    dev = torch.device("cpu") if args.dry_run else device()
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, {"dry_run": args.dry_run, **size})
    if "environment" in args.steps:
        report.run("environment", lambda: environment(size))
    bf16 = report.data["steps"].get("environment", {}).get("bf16_matmul_tflops")
    # Measurements first: the tests take longest and would be the ones a time limit cuts.
    steps: dict[str, Callable[[], dict]] = {
        "training": lambda: training(
            args.out, args.workdir, size, dev, bf16 if dev.type == "cuda" else None, args.methods
        ),
        "memory": lambda: memory(size, dev),
        "speed": lambda: speed(size, dev, bf16 if dev.type == "cuda" else None),
        "prediction": lambda: prediction(size, dev),
        "tests": lambda: gpu_tests(args.out, args.dry_run),
    }
    for name, step in steps.items():
        if name in args.steps:
            report.run(name, step)
    print("\n".join(summary(report.data)), flush=True)
    if not all(s["ok"] for s in report.data["steps"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
