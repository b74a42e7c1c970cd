"""GEARS split pickles, made by GEARS's own ``PertData.prepare_split``.

GEARS's splits depend only on ``obs.condition`` after its GO filter, so the splitter
runs on an obs-only AnnData: the pickles are GEARS's own
(``splits/{name}_{split}_{seed}_{train_gene_set_size}.pkl`` and, for ``simulation``,
``..._subgroup.pkl``). Two more split types write GEARS's ``custom`` format
(``{'train': [...], 'val': [...], 'test': [...]}``, load it with
``prepare_split('custom', split_dict_path=...)``): ``custom`` holds out the configured
test and validation perturbations; ``all_train`` is the original setup, every
perturbation in train and no validation or test set.

With ``min_cells`` > 0, perturbations with fewer cells are left out of every split set
(logged), so they are neither trained on nor evaluated; ``data-qc`` lists them too.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import pandas as pd

from scgpt_vcc.data.gears import CONTROL
from scgpt_vcc.data.go import read_go_filter
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import atomic_path, read_annotations

log = logging.getLogger(__name__)

GEARS_SPLITS = ("simulation", "simulation_single", "no_test", "no_split")
OWN_SPLITS = ("custom", "all_train")
SPLITS = GEARS_SPLITS + OWN_SPLITS


def split_file_names(name: str, split: str, seed: int, train_gene_set_size: float) -> list[str]:
    """GEARS's file names for one split (plus the subgroup file for ``simulation``)."""
    stem = f"{name}_{split}_{seed}_{train_gene_set_size}"
    return [f"{stem}.pkl"] + ([f"{stem}_subgroup.pkl"] if split == "simulation" else [])


def _gears_split(
    obs, name: str, split: str, seed: int, train_gene_set_size: float, workdir: Path
) -> None:
    """Run GEARS's ``prepare_split`` on an obs-only AnnData, writing into ``workdir``."""
    from gears import PertData

    pert_data = PertData.__new__(PertData)  # skip __init__: it downloads gene2go
    pert_data.adata = ad.AnnData(obs=obs)[obs.index.values, :]
    pert_data.dataset_name = name
    pert_data.dataset_path = str(workdir)
    pert_data.prepare_split(split=split, seed=seed, train_gene_set_size=train_gene_set_size)


def _simulation_single(obs, seed: int, train_gene_set_size: float) -> dict[str, list[str]]:
    """GEARS's splitter for ``simulation_single``.

    cell-gears 0.1.2's ``prepare_split`` fails on this split (it unpacks a subgroup that
    ``split_data`` does not return), so the splitter is called directly and its result
    grouped as ``prepare_split`` groups it: split -> conditions in order of appearance.
    """
    from gears.data_utils import DataSplitter

    adata = ad.AnnData(obs=obs)[obs.index.values, :]
    adata = DataSplitter(adata, split_type="simulation_single").split_data(
        train_gene_set_size=train_gene_set_size, seed=seed
    )
    column = adata.obs["split"].astype(str)
    condition = adata.obs["condition"].astype(str)
    return {s: list(dict.fromkeys(condition[column == s])) for s in sorted(column.unique())}


def _custom_split(conditions: list[str], test: Sequence[str], val: Sequence[str]) -> dict:
    unknown = sorted((set(test) | set(val)) - set(conditions))
    if unknown:
        raise InputError(
            "config",
            "gears.test_perts/val_perts",
            f"unknown conditions {unknown[:10]}",
            "name conditions as in obs.condition, e.g. 'GENE+ctrl'",
        )
    held = set(test) | set(val)
    return {
        "train": [c for c in conditions if c not in held],
        "val": [c for c in conditions if c in set(val)],
        "test": [c for c in conditions if c in set(test)],
    }


def drop_small_perturbations(obs: pd.DataFrame, min_cells: int) -> pd.DataFrame:
    """``obs`` without the cells of perturbations that have fewer than ``min_cells`` cells."""
    condition = obs["condition"].astype(str)
    counts = condition.value_counts()
    small = sorted(c for c, n in counts.items() if c != CONTROL and n < min_cells)
    if small:
        log.warning(
            "%d perturbations have fewer than %d cells and are left out of the split "
            "(not trained on, not evaluated): %s",
            len(small),
            min_cells,
            ", ".join(f"{c} ({counts[c]})" for c in small),
        )
    return obs.loc[~condition.isin(small)]


def build_split(
    processed: str | Path,
    go_filter: str | Path,
    outdir: str | Path,
    name: str,
    split: str,
    seed: int,
    train_gene_set_size: float = 0.75,
    test_perts: Sequence[str] = (),
    val_perts: Sequence[str] = (),
    min_cells: int = 0,
) -> list[Path]:
    """Write the split pickle(s) of ``split`` into ``outdir``; return their paths."""
    if split not in SPLITS:
        raise InputError(
            "config", "gears.split", f"{split!r} is not supported", f"use one of {SPLITS}"
        )
    obs, _ = read_annotations(processed)
    kept = set(read_go_filter(go_filter)["kept"])
    obs = obs.loc[obs["condition"].astype(str).isin(kept), ["condition"]]
    obs = drop_small_perturbations(obs, min_cells)
    outdir = Path(outdir)
    names = split_file_names(name, split, seed, train_gene_set_size)
    if split in GEARS_SPLITS and split != "simulation_single":
        with tempfile.TemporaryDirectory(
            dir=outdir.parent if outdir.parent.exists() else None
        ) as work:
            _gears_split(obs, name, split, seed, train_gene_set_size, Path(work))
            for file in names:
                with atomic_path(outdir / file) as tmp:
                    shutil.copyfile(Path(work) / "splits" / file, tmp)
    else:
        conditions = list(dict.fromkeys(obs["condition"].astype(str)))
        if split == "simulation_single":
            sets = _simulation_single(obs, seed, train_gene_set_size)
        elif split == "all_train":
            sets = {"train": conditions, "val": [], "test": []}
        else:
            sets = _custom_split(conditions, test_perts, val_perts)
        with atomic_path(outdir / names[0]) as tmp, open(tmp, "wb") as fh:
            pickle.dump(sets, fh)
    log.info("wrote %s split (seed %d) to %s", split, seed, outdir)
    return [outdir / f for f in names]
