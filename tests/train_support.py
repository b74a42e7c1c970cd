"""Fixtures for the finetuning tests: a small GEARS-format dataset, pairing, split, checkpoint.

Imported by the ``test_train*`` modules; the data come from the shared ``converted_path``
fixture (converted.h5ad has everything the training reads from perturb_processed.h5ad).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from scgpt_vcc.data.pairing import write_pairing
from scgpt_vcc.io import read_annotations
from scgpt_vcc.model.checkpoint import read_vocab
from scgpt_vcc.model.random_checkpoint import write_random_checkpoint
from scgpt_vcc.model.vocab import match_genes
from scgpt_vcc.train.batches import PerturbationCells
from scgpt_vcc.train.config import TrainConfig
from scgpt_vcc.train.loop import finetune


@pytest.fixture(scope="session")
def train_inputs(converted_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Paths: data, pairing, checkpoint (tiny random scGPT), split (with val), split_noval."""
    out = tmp_path_factory.mktemp("train_inputs")
    write_pairing(converted_path, out / "pairing_seed1.npz", seed=1)
    obs, var = read_annotations(converted_path)
    write_random_checkpoint(
        out / "checkpoint", list(var.index), embsize=32, nlayers=2, nheads=4, d_hid=32, seed=2
    )
    conditions = sorted(set(obs["condition"].astype(str)) - {"ctrl"})
    splits = {
        "split": {"train": ["ctrl", *conditions[:-3]], "val": conditions[-3:], "test": []},
        "split_noval": {"train": ["ctrl", *conditions]},
    }
    for name, split in splits.items():
        with (out / f"{name}.pkl").open("wb") as fh:
            pickle.dump(split, fh)
    return {
        "data": converted_path,
        "pairing": out / "pairing_seed1.npz",
        "checkpoint": out / "checkpoint",
        "split": out / "split.pkl",
        "split_noval": out / "split_noval.pkl",
    }


def run_finetune(inputs: dict, outdir: Path, cfg: TrainConfig, split: str = "split") -> Path:
    """``finetune`` on the fixture's data, pairing and checkpoint with one of its splits."""
    return finetune(
        inputs["data"], inputs["pairing"], inputs["checkpoint"], outdir, cfg, split=inputs[split]
    )


@pytest.fixture(scope="session")
def train_cells(train_inputs: dict) -> PerturbationCells:
    _, var = read_annotations(train_inputs["data"])
    vocab = read_vocab(train_inputs["checkpoint"] / "vocab.json")
    return PerturbationCells(
        train_inputs["data"], train_inputs["pairing"], match_genes(list(var.index), vocab)
    )


@pytest.fixture(scope="session")
def unmeasured_inputs(train_inputs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """train_inputs with one perturbation renamed to a target that is in the checkpoint's
    vocabulary but not a measured gene (a ``LOC`` symbol of the random checkpoint)."""
    import anndata as ad

    out = tmp_path_factory.mktemp("unmeasured")
    adata = ad.read_h5ad(train_inputs["data"])
    vocab = read_vocab(train_inputs["checkpoint"] / "vocab.json")
    target = next(t for t in vocab if t.startswith("LOC") and t not in adata.var_names)
    renamed = sorted(set(adata.obs["condition"].astype(str)) - {"ctrl"})[0]
    conditions = adata.obs["condition"].astype(str).replace(renamed, f"{target}+ctrl")
    adata.obs["condition"] = conditions.astype("category")
    adata.write_h5ad(out / "data.h5ad")
    return {**train_inputs, "data": out / "data.h5ad", "target": target, "renamed": renamed}
