"""Statistics shared by training (validation) and evaluation."""

from __future__ import annotations

import numpy as np


def pearson(x: np.ndarray, y: np.ndarray, undefined: float = 0.0) -> float:
    """Pearson correlation of two vectors; ``undefined`` when either is constant.

    GEARS's evaluation counts an undefined correlation as 0 (the default); training's
    validation leaves it out of its mean (``undefined=nan``).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean()
    y = y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else undefined
