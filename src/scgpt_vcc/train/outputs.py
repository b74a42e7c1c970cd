"""Outputs of a training run besides the model: metrics tables, loss curve, run log."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from scgpt_vcc.io import atomic_path, save_figure
from scgpt_vcc.train.state import RunState


def write_metrics(outdir: Path, state: RunState) -> None:
    """``metrics.csv`` (per epoch), ``steps.csv`` (per step) and ``loss_curve.png``."""
    epochs = pd.DataFrame(state.epoch_rows)
    steps = pd.DataFrame(state.step_rows, columns=["epoch", "step", "loss"])
    for name, frame in (("metrics.csv", epochs), ("steps.csv", steps)):
        with atomic_path(outdir / name) as tmp:
            frame.to_csv(tmp, index=False)
    plot_loss_curve(epochs, steps, outdir / "loss_curve.png")


def plot_loss_curve(epochs: pd.DataFrame, steps: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if len(steps):
        per_epoch = steps.groupby("epoch")["step"].transform("max")
        x = steps["epoch"] - 1 + steps["step"] / per_epoch
        ax.plot(x, steps["loss"], lw=0.6, alpha=0.5, label="step loss")
    if len(epochs):
        ax.plot(epochs["epoch"], epochs["train_loss"], "o-", label="epoch train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE")
    if len(epochs) and epochs["val_pearson_delta"].notna().any():
        ax2 = ax.twinx()
        ax2.plot(epochs["epoch"], epochs["val_pearson_delta"], "s--", c="C2")
        ax2.set_ylabel("validation Pearson-delta", color="C2")
    ax.legend(loc="upper right")
    fig.tight_layout()
    save_figure(fig, path, tight=False)


@contextlib.contextmanager
def run_log(path: Path, enabled: bool) -> Iterator[None]:
    """Copy this package's log records to ``run.log`` (appended across resumptions)."""
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("scgpt_vcc")
    root.addHandler(handler)
    level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
