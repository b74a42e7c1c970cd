"""Device and precision decisions, one home for training and prediction.

``autocast_dtype`` is the single function that turns a configured precision (``auto``,
``bf16``, ``fp16``, ``fp32``) into the autocast dtype on a device; ``finetune`` and the
scGPT predictor both call it, so a model is evaluated in the precision it was trained in.

bf16 is decided from the hardware. ``torch.cuda.is_bf16_supported()`` counts emulation by
default (torch 2.13), so on a TITAN RTX (sm_75) it says yes and bf16 would run emulated,
slower than fp16 and without tensor cores. Native bf16 needs compute capability 8.0
(A100, A40 sm_86, H100 sm_90).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from scgpt_vcc.precisions import PRECISIONS

log = logging.getLogger(__name__)

BF16_MIN_CAPABILITY = (8, 0)


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` = this process's GPU when CUDA is available, else the CPU.

    A bare ``cuda`` becomes ``cuda:<local_rank>`` and is made the current device.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); Linux only.

    Elsewhere bf16 is emulated and slower than fp32, so CPU autocast stays off.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU has bf16 tensor cores (compute capability >= 8.0), not emulation."""
    return torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY


def autocast_dtype(
    precision: str, device: torch.device, *, cpu_amp: bool = False
) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``, or None for fp32.

    On GPU: ``auto`` is bf16 where the hardware has it (A40, A100, H100) and fp16 before
    Ampere (TITAN RTX, V100); ``bf16`` asked of such a GPU falls back to fp16 with a
    warning (fp16 needs a grad scaler in training). On CPU: bf16 only with ``cpu_amp`` and
    a CPU with native bf16 (1.55x our fp32 training cells/s on a Zen 4 CPU in
    bench/train_throughput.py, same loss curve to 1e-3; docs/benchmarks.md), else fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}, not one of {PRECISIONS}")
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if not cpu_amp:
            return None
        if cpu_has_native_bf16():
            return torch.bfloat16
        log.info("this CPU has no native bf16 (AVX512-BF16 or AMX): fp32")
        return None
    if precision == "fp16":
        return torch.float16
    if not gpu_has_native_bf16(device):
        if precision == "bf16":
            major, minor = torch.cuda.get_device_capability(device)
            log.warning(
                "%s (compute capability %d.%d) has no native bf16: fp16 instead",
                torch.cuda.get_device_name(device),
                major,
                minor,
            )
        return torch.float16
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``fp32``: the names the config uses."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def compiles(requested: bool, device: torch.device) -> bool:
    """Whether to torch.compile the model: when asked, on a GPU only. Training compiled runs
    at 1.41x the cells/s of eager bf16 on an H200 at the real size (docs/benchmarks.md); on a
    CPU it is unmeasured and needs a C++ compiler."""
    return requested and device.type == "cuda"


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor cores for the fp32 matrix products left outside autocast (Ampere+)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
