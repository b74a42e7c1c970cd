"""Resume state of a training run: counters and history, fingerprint, resume file."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from scgpt_vcc.io import atomic_path
from scgpt_vcc.train.config import TrainConfig

log = logging.getLogger(__name__)

RESUME_DIR = "resume"
# Settings that may change between a run and its resumption without invalidating it.
RESUME_FREE_FIELDS = (
    "max_steps", "workers", "device", "gpu_class", "checkpoint_every_steps", "compile"
)  # fmt: skip


@dataclass
class RunState:
    """Everything beyond model/optimiser weights that a resumed run must restore."""

    epoch: int = 0
    step: int = 0
    micro_batch: int = 0
    accumulation: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0
    best_value: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    epoch_rows: list[dict[str, Any]] = field(default_factory=list)
    step_rows: list[dict[str, Any]] = field(default_factory=list)


def settings_fingerprint(cfg: TrainConfig, inputs: dict[str, str]) -> str:
    """Hash of the settings and inputs a saved state is valid for."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE_FIELDS}
    blob = json.dumps({"cfg": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_resume(
    path: Path,
    fingerprint: str,
    state: RunState,
    best_state: dict[str, torch.Tensor] | None,
    parts: dict[str, Any],
) -> None:
    """Write the resume file atomically.

    ``parts`` are the model, optimiser, scheduler and scaler by name (their state dicts).
    """
    named = {name: part.state_dict() for name, part in parts.items()}
    payload = {
        "fingerprint": fingerprint,
        "run": asdict(state),
        "model": named.pop("model"),
        "best_model": best_state,
        **named,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_resume(
    path: Path, fingerprint: str, parts: dict[str, Any]
) -> tuple[RunState, dict[str, torch.Tensor] | None] | None:
    """Load ``parts`` from the resume file of this same run (same ``fingerprint``).

    Returns the saved RunState and best-model weights; None when there is no file or it
    belongs to other settings or inputs.
    """
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("fingerprint") != fingerprint:
        log.warning("%s belongs to other settings or inputs; starting fresh", path)
        return None
    for name, part in parts.items():
        part.load_state_dict(payload[name])
    return RunState(**payload["run"]), payload["best_model"]
