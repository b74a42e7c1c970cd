"""The autocast precisions a configuration may name.

Torch-free, so the CLI and the training settings can name them without importing torch;
:func:`scgpt_vcc.model.device.autocast_dtype` turns one into a dtype on a device.
"""

from __future__ import annotations

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
