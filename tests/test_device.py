"""Precision and compilation decided from the hardware: one function each for training and
prediction."""

from __future__ import annotations

import logging

import pytest
import torch

from scgpt_vcc.model.device import autocast_dtype, compiles
from scgpt_vcc.train.config import TrainConfig
from scgpt_vcc.train.precision import resolve_precision

GPU = torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("capability", "name", "native"),
    [((7, 5), "NVIDIA TITAN RTX", torch.float16), ((8, 6), "NVIDIA A40", torch.bfloat16),
     ((9, 0), "NVIDIA H100 80GB HBM3", torch.bfloat16)],
    ids=["sm_75", "sm_86", "sm_90"],
)  # fmt: skip
def test_bf16_only_where_the_gpu_has_it(monkeypatch, caplog, capability, name, native):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    # torch 2.13 counts emulation: it says yes on a TITAN RTX too.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with caplog.at_level(logging.WARNING):
        assert autocast_dtype("auto", GPU) is native
        assert autocast_dtype("bf16", GPU) is native
    assert ("no native bf16" in caplog.text) == (native is torch.float16)
    assert autocast_dtype("fp16", GPU) is torch.float16
    assert autocast_dtype("fp32", GPU) is None
    assert resolve_precision(TrainConfig(), GPU) is native
    assert resolve_precision(TrainConfig(precision="bf16"), GPU) is native
    assert resolve_precision(TrainConfig(amp=False), GPU) is None


def test_prediction_on_cpu_stays_fp32_whatever_the_gpu_class(monkeypatch):
    monkeypatch.setattr("scgpt_vcc.model.device.cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    assert all(autocast_dtype(p, cpu) is None for p in ("auto", "bf16", "fp16", "fp32"))
    assert autocast_dtype("auto", cpu, cpu_amp=True) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        autocast_dtype("int8", cpu)


def test_training_and_prediction_compile_on_a_gpu_only():
    cpu = torch.device("cpu")
    assert compiles(True, GPU) and not compiles(False, GPU)
    assert not compiles(True, cpu) and not compiles(False, cpu)
