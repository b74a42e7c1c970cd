"""The data a prediction test starts from: processed data, pairing and a split."""

from __future__ import annotations

import pickle
from pathlib import Path

import anndata as ad

from scgpt_vcc.data.de import compute_de
from scgpt_vcc.data.pairing import write_pairing


def heldout_split(converted: Path, out: Path, n_test: int = 3) -> dict[str, Path | list[str]]:
    """processed.h5ad, pairing.npz (seed 1) and split.pkl holding out ``n_test`` conditions."""
    processed = out / "processed.h5ad"
    compute_de(converted, processed, out / "stats.npz", chunk_size=500)
    write_pairing(processed, out / "pairing.npz", 1)
    conditions = sorted(set(ad.read_h5ad(processed, backed="r").obs["condition"].astype(str)))
    perts = [c for c in conditions if c != "ctrl"]
    with (out / "split.pkl").open("wb") as fh:
        pickle.dump({"train": [*perts[n_test:], "ctrl"], "val": [], "test": perts[:n_test]}, fh)
    return {
        "data": processed,
        "pairing": out / "pairing.npz",
        "split": out / "split.pkl",
        "test": perts[:n_test],
    }
