"""Training on a GPU: mixed precision, attention kernels, a real out-of-memory, resume, NCCL.

Marked ``gpu``. They run on CUDA where it is available (``bench/gpu_check.py`` runs them on
the lent GPU machine). With ``SCGPT_VCC_GPU_TESTS_ON_CPU=1`` (``gpu_check.py --dry-run``,
which the suite runs) each test runs on the CPU where that means something: the same code
paths in fp32, gloo for NCCL. A CUDA out-of-memory cannot be made on a CPU: that test skips.
Elsewhere the module skips.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.train_support)

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from scgpt_vcc.model.checkpoint import read_state_dict
from scgpt_vcc.model.device import autocast_dtype
from scgpt_vcc.model.transformer import TransformerGenerator
from scgpt_vcc.train.config import TrainConfig
from scgpt_vcc.train.precision import fit_micro_batch
from tests.train_support import run_finetune, train_inputs  # noqa: F401

ON_CPU = os.environ.get("SCGPT_VCC_GPU_TESTS_ON_CPU") == "1"
CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (CUDA or ON_CPU), reason="needs CUDA (or SCGPT_VCC_GPU_TESTS_ON_CPU=1)"),
]
DEVICE = "cuda" if CUDA else "cpu"
TRAIN = {"max_seq_len": 128, "workers": 1, "batch_size": 16, "device": DEVICE}


def _model(embsize: int = 64, nlayers: int = 2) -> TransformerGenerator:
    torch.manual_seed(0)
    model = TransformerGenerator(500, embsize, 4, embsize, nlayers, pad_token_id=0)
    return model.freeze_cls_head().to(DEVICE)


def _inputs(n: int, length: int) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(3, 500, (n, length), device=DEVICE)
    values = torch.rand(n, length, device=DEVICE) * 3
    flags = (torch.rand(n, length, device=DEVICE) < 0.01).long()
    return ids, values, flags


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_lowers_the_loss(train_inputs, tmp_path, precision):
    cfg = TrainConfig(epochs=3, precision=precision, lr=3e-4, **TRAIN)
    out = run_finetune(train_inputs, tmp_path / "model", cfg, "split_noval")
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["train_loss"].iloc[-1] < 0.8 * metrics["train_loss"].iloc[0]
    log = (out / "run.log").read_text()
    if CUDA:
        assert f"precision {precision}" in log
        assert f"grad scaler {precision == 'fp16'}" in log
        assert autocast_dtype(precision, torch.device("cuda")) is not None


def test_compiled_training_follows_the_eager_loss_curve(train_inputs, tmp_path):
    """On a GPU; on the CPU ``compile`` is ignored (unmeasured there, needs a compiler)."""
    losses = []
    for compiled in (False, True):
        cfg = TrainConfig(epochs=1, compile=compiled, **TRAIN)
        out = run_finetune(train_inputs, tmp_path / f"compiled_{compiled}", cfg, "split_noval")
        losses.append(pd.read_csv(out / "steps.csv")["loss"].to_numpy())
        assert f"compiled {compiled and CUDA}" in (out / "run.log").read_text()
    eager, compiled = losses
    assert len(eager) == len(compiled) > 10
    np.testing.assert_allclose(compiled, eager, rtol=2e-2 if CUDA else 1e-3)


@pytest.mark.skipif(not CUDA, reason="torch.compile is a GPU path (ignored on a CPU)")
def test_compiled_prediction_equals_eager():
    from scgpt_vcc.predict.scgpt import ScGPTPredictor

    model = _model().eval()
    genes = [f"G{i}" for i in range(400)]
    vocab = {g: i + 3 for i, g in enumerate(genes)}
    control = np.random.default_rng(0).random((70, 400)).astype(np.float32) * 3
    eager, compiled = (
        ScGPTPredictor(model, vocab, genes, chunk_size=128, compile=c) for c in (False, True)
    )
    assert compiled.compiled and not eager.compiled
    for n in (70, 9):  # two call sizes: one graph with dynamic shapes
        expected = eager.cells(control[:n], ["G5"])
        np.testing.assert_allclose(
            compiled.cells(control[:n], ["G5"]), expected, rtol=2e-2, atol=5e-2
        )


def test_flash_attention_equals_the_math_path():
    """The mask-free forward reaches the flash kernel and matches the reference kernel."""
    model = _model(embsize=128).eval()
    ids, values, flags = _inputs(8, 512)
    dtype = torch.bfloat16 if CUDA else torch.float32
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype, enabled=CUDA):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash is not eligible
            flash = model(ids, values, flags).float()
        with sdpa_kernel(SDPBackend.MATH):
            math = model(ids, values, flags).float()
    error = (flash - math).norm() / math.norm()
    assert torch.isfinite(flash).all()
    assert error < (1e-2 if CUDA else 1e-5), f"relative error {error:.2e}"


@pytest.mark.skipif(not CUDA, reason="a real CUDA out-of-memory needs a GPU")
def test_real_out_of_memory_halves_the_micro_batch(caplog):
    model = _model(embsize=256, nlayers=4)
    length = 1024

    def step(micro: int) -> None:
        ids, values, flags = _inputs(micro, length)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.mse_loss(model(ids, values, flags).float(), values)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(4)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(4)
    per_4 = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    # Room for about three times micro-batch 4: 64, 32 and 16 cannot fit, 8 can.
    torch.cuda.set_per_process_memory_fraction((base + 3 * per_4) / total)
    try:
        with caplog.at_level(logging.WARNING):
            micro, accumulation = fit_micro_batch(step, 64, 1)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert 4 <= micro <= 8 and micro * accumulation == 64
    assert "CUDA out of memory with micro-batch 64" in caplog.text


def _cli(inputs: dict, outdir: Path) -> list[str]:
    return [
        sys.executable, "-m", "scgpt_vcc.cli", "finetune",
        "--data", str(inputs["data"]),
        "--pairing", str(inputs["pairing"]),
        "--checkpoint-dir", str(inputs["checkpoint"]),
        "--split", str(inputs["split_noval"]),
        "--outdir", str(outdir),
        "--max-seq-len", "64", "--workers", "0", "--threads", "1", "--dropout", "0.1",
        "--device", DEVICE, "--epochs", "2", "--batch-size", "16",
        "--checkpoint-every-steps", "5",
    ]  # fmt: skip


def test_killed_run_resumes_to_the_same_model(train_inputs, tmp_path):
    """Kill after a mid-epoch checkpoint, rerun: the model of an uninterrupted run.

    On the CPU equal to the bit; on a GPU within the spread of its non-deterministic
    kernels (the attention backward sums in varying order).
    """
    subprocess.run(_cli(train_inputs, tmp_path / "whole"), check=True)
    killed = tmp_path / "killed"
    state = killed / "resume" / "state.pt"
    proc = subprocess.Popen(_cli(train_inputs, killed), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if state.exists() and (killed / "metrics.csv").exists():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "best_model.pt").exists()

    subprocess.run(_cli(train_inputs, killed), check=True)
    assert "resuming from" in (killed / "run.log").read_text()
    whole = read_state_dict(tmp_path / "whole" / "best_model.pt")
    resumed = read_state_dict(killed / "best_model.pt")
    assert whole.keys() == resumed.keys()
    for name in whole:
        if CUDA:
            torch.testing.assert_close(resumed[name], whole[name], rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(resumed[name], whole[name]), name
    losses = [pd.read_csv(d / "steps.csv")["loss"] for d in (tmp_path / "whole", killed)]
    pd.testing.assert_series_equal(*losses, rtol=1e-3 if CUDA else 0, check_exact=not CUDA)


def test_single_process_ddp_initialises(tmp_path):
    """One process joins a process group (NCCL on a GPU, gloo on the CPU) and trains a step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if CUDA else "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        model = DistributedDataParallel(_model(), device_ids=[0] if CUDA else None)
        ids, values, flags = _inputs(4, 64)
        F.mse_loss(model(ids, values, flags), values).backward()
        total = torch.ones(1, device=DEVICE)
        dist.all_reduce(total)
        assert total.item() == 1.0
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
