"""Finetuning settings."""

from __future__ import annotations

from dataclasses import dataclass

from scgpt_vcc.model.checkpoint import DEFAULT_LOAD_PREFIXES
from scgpt_vcc.precisions import PRECISIONS

SELECTIONS = ("auto", "train_loss", "val_pearson_delta")


@dataclass(frozen=True)
class TrainConfig:
    """Finetuning settings; defaults follow the scGPT perturbation tutorial."""

    lr: float = 1e-4
    batch_size: int = 64
    accumulation: int = 1
    epochs: int = 15
    patience: int = 10
    gamma: float = 0.9
    max_seq_len: int = 1536
    amp: bool = True
    cpu_amp: bool = True
    compile: bool = True
    precision: str = "auto"
    grad_clip: float = 1.0
    dropout: float = 0.0
    selection: str = "auto"
    checkpoint_every_steps: int = 500
    eval_batch_size: int = 64
    workers: int = 1
    seed: int = 0
    device: str = "auto"
    gpu_class: str | None = None
    load_prefixes: tuple[str, ...] = DEFAULT_LOAD_PREFIXES
    max_steps: int | None = None
    # vocab_match.json of match-vocabulary: data genes under renamed symbols.
    gene_renames: str | None = None

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r} is not one of {SELECTIONS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {PRECISIONS}")
        for name in ("batch_size", "accumulation", "epochs", "max_seq_len", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
