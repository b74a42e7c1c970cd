"""GEARS processing stages against cell-gears itself (the reference, not mocked)."""

from __future__ import annotations

import functools
import http.server
import json
import pickle
import shutil
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scgpt_vcc.cli import main
from scgpt_vcc.data.de import compute_de
from scgpt_vcc.data.go import GEARS_FILES, go_filter_report
from scgpt_vcc.data.graphs import CellGraphBuilder, write_cell_graphs
from scgpt_vcc.data.pairing import draw_control_rows, write_pairing
from scgpt_vcc.data.qc import write_qc
from scgpt_vcc.data.splits import build_split

gears = pytest.importorskip("gears")
from gears import PertData  # noqa: E402
from gears.data_utils import DataSplitter  # noqa: E402

UNS_KEYS = (
    "rank_genes_groups_cov_all",
    "top_non_dropout_de_20",
    "top_non_zero_de_20",
    "non_zeros_gene_idx",
    "non_dropout_gene_idx",
)
NAME = "demo"
SEED = 1


def _targets(adata: ad.AnnData) -> list[str]:
    return sorted({c.split("+")[0] for c in adata.obs["condition"].astype(str) if c != "ctrl"})


def _write_go_files(folder: Path, adata: ad.AnnData) -> list[str]:
    """GEARS's GO files, made up: the first two targets get no GO terms."""
    targets = _targets(adata)
    genes = list(adata.var_names)
    gene2go = {g: {"GO:0000001"} for g in genes + targets if g not in targets[:2]}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "gene2go_all.pkl", "wb") as fh:
        pickle.dump(gene2go, fh)
    with open(folder / "essential_all_data_pert_genes.pkl", "wb") as fh:
        pickle.dump(genes[::3] + targets, fh)
    return targets[:2]


@pytest.fixture(scope="module")
def processed(converted_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Our stages run on the small converted dataset, in GEARS's layout."""
    root = tmp_path_factory.mktemp("gears")
    dataset = root / NAME
    go_dir = root / "go"
    _write_go_files(go_dir, ad.read_h5ad(converted_path))
    compute_de(
        converted_path, dataset / "perturb_processed.h5ad", dataset / "stats.npz", chunk_size=97
    )
    go_filter_report(dataset / "perturb_processed.h5ad", dataset / "go_filter.json", go_dir)
    write_pairing(
        dataset / "perturb_processed.h5ad", dataset / "data_pyg" / f"pairing_seed{SEED}.npz", SEED
    )
    names = json.loads((dataset / "go_filter.json").read_text())["pert_names"]
    write_cell_graphs(
        dataset / "perturb_processed.h5ad",
        dataset / "data_pyg" / f"pairing_seed{SEED}.npz",
        names,
        dataset / "data_pyg" / "cell_graphs.pkl",
        batch_size=50,
    )
    return {"root": root, "dataset": dataset, "go_dir": go_dir, "converted": converted_path}


@pytest.fixture(scope="module")
def gears_reference(processed: dict[str, Path]) -> dict[str, Path]:
    """GEARS's own new_data_process on the same data, global RNG seeded with SEED."""
    gears_root = processed["root"] / "gears_ref"
    shutil.copytree(processed["go_dir"], gears_root)
    adata = ad.read_h5ad(processed["converted"])
    del adata.layers["counts"]
    np.random.seed(SEED)
    pert_data = PertData(str(gears_root))
    pert_data.new_data_process(NAME, adata=adata)
    return {"root": gears_root, "dataset": gears_root / NAME, "pert_data": pert_data}


def test_de_equals_cell_gears(processed, gears_reference):
    ours = ad.read_h5ad(processed["dataset"] / "perturb_processed.h5ad")
    theirs = ad.read_h5ad(gears_reference["dataset"] / "perturb_processed.h5ad")
    for key in UNS_KEYS:
        assert list(ours.uns[key]) == list(theirs.uns[key]), key
        for cond, value in theirs.uns[key].items():
            np.testing.assert_array_equal(ours.uns[key][cond], value, err_msg=f"{key}[{cond}]")
            assert ours.uns[key][cond].dtype == value.dtype
    pd.testing.assert_frame_equal(ours.obs, theirs.obs)
    assert (ours.X != theirs.X).nnz == 0
    assert "counts" not in ours.layers


def test_de_does_not_depend_on_chunk_size(processed, tmp_path):
    compute_de(processed["converted"], tmp_path / "p.h5ad", tmp_path / "s.npz", chunk_size=5000)
    a = ad.read_h5ad(tmp_path / "p.h5ad").uns["top_non_dropout_de_20"]
    b = ad.read_h5ad(processed["dataset"] / "perturb_processed.h5ad").uns["top_non_dropout_de_20"]
    assert all(np.array_equal(a[k], b[k]) for k in b)


def _same_graph(d1, d2) -> None:
    assert d1.keys() == d2.keys()
    assert torch.equal(d1.x, d2.x) and d1.x.shape == d2.x.shape
    assert torch.equal(d1.y, d2.y) and d1.y.shape == d2.y.shape
    assert type(d1.de_idx) is type(d2.de_idx)
    np.testing.assert_array_equal(np.asarray(d1.de_idx), np.asarray(d2.de_idx))
    assert list(d1.pert_idx) == list(d2.pert_idx)
    assert d1.pert == d2.pert


def test_cell_graph_pickle_equals_gears(processed, gears_reference):
    """Same pairing draws, same Data, same condition order as GEARS seeded alike."""
    with open(processed["dataset"] / "data_pyg" / "cell_graphs.pkl", "rb") as fh:
        ours = pickle.load(fh)
    with open(gears_reference["dataset"] / "data_pyg" / "cell_graphs.pkl", "rb") as fh:
        theirs = pickle.load(fh)
    assert list(ours) == list(theirs)
    for cond in theirs:
        assert len(ours[cond]) == len(theirs[cond])
        for d1, d2 in zip(ours[cond], theirs[cond], strict=True):
            _same_graph(d1, d2)


def test_lazy_graph_equals_pickled_graph(processed):
    dataset = processed["dataset"]
    names = json.loads((dataset / "go_filter.json").read_text())["pert_names"]
    with open(dataset / "data_pyg" / "cell_graphs.pkl", "rb") as fh:
        pickled = pickle.load(fh)
    builder = CellGraphBuilder(
        dataset / "perturb_processed.h5ad", dataset / "data_pyg" / f"pairing_seed{SEED}.npz", names
    )
    try:
        for cond, rows in builder.condition_rows():
            for i in (0, len(rows) - 1):
                _same_graph(builder.graph(int(rows[i])), pickled[cond][i])
    finally:
        builder.close()


def test_pairing_contract(processed):
    with np.load(processed["dataset"] / "data_pyg" / f"pairing_seed{SEED}.npz") as f:
        rows, seed = f["control_row"], int(f["seed"])
    obs = ad.read_h5ad(processed["dataset"] / "perturb_processed.h5ad", backed="r").obs
    condition = obs["condition"].astype(str).to_numpy()
    assert rows.dtype == np.int64 and rows.shape == (len(obs),) and seed == SEED
    assert (condition[rows] == "ctrl").all()
    ctrl = np.flatnonzero(condition == "ctrl")
    np.testing.assert_array_equal(rows[ctrl], ctrl)  # GEARS: a control is its own x
    other = draw_control_rows(obs["condition"], SEED + 1)
    assert not np.array_equal(other, rows)


def test_pertdata_loads_outputs_without_download(processed, monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError(f"GEARS tried to download {args}")

    monkeypatch.setattr(requests, "get", no_network)
    dataset = processed["dataset"]
    split_files = build_split(
        dataset / "perturb_processed.h5ad",
        dataset / "go_filter.json",
        dataset / "splits",
        NAME,
        "simulation",
        SEED,
    )
    before = [f.stat().st_mtime_ns for f in split_files]
    pert_data = PertData(str(processed["go_dir"]))
    pert_data.load(data_path=str(dataset))
    dropped = set(json.loads((dataset / "go_filter.json").read_text())["dropped"])
    assert len(dropped) == 2
    assert dropped.isdisjoint(set(pert_data.adata.obs["condition"].astype(str)))
    pert_data.prepare_split(split="simulation", seed=SEED)
    assert [f.stat().st_mtime_ns for f in split_files] == before  # read, not remade
    pert_data.get_dataloader(batch_size=8)
    n_genes = pert_data.adata.n_vars
    batch = next(iter(pert_data.dataloader["train_loader"]))
    assert batch.x.shape == (8 * n_genes, 1)
    assert batch.y.shape == (8, n_genes)
    assert len(batch.pert) == 8


@pytest.mark.parametrize("split", ["simulation", "simulation_single", "no_test", "no_split"])
def test_splits_equal_gears(processed, tmp_path, split):
    dataset = processed["dataset"]
    files = build_split(
        dataset / "perturb_processed.h5ad",
        dataset / "go_filter.json",
        tmp_path,
        NAME,
        split,
        SEED,
        0.75,
    )
    pert_data = PertData(str(processed["go_dir"]))
    pert_data.load(data_path=str(dataset))
    if split == "simulation_single":  # cell-gears 0.1.2's prepare_split crashes here
        adata = DataSplitter(pert_data.adata, split_type=split).split_data(
            seed=SEED, train_gene_set_size=0.75
        )
        groups = dict(adata.obs.groupby("split").agg({"condition": lambda x: x}).condition)
        expected = {k: v.unique().tolist() for k, v in groups.items()}
    else:
        pert_data.dataset_path = str(tmp_path / "gears")
        (tmp_path / "gears").mkdir()
        pert_data.prepare_split(split=split, seed=SEED, train_gene_set_size=0.75)
        expected = pert_data.set2conditions
    with open(files[0], "rb") as fh:
        assert pickle.load(fh) == expected
    assert files[0].name == f"{NAME}_{split}_{SEED}_0.75.pkl"
    if split == "simulation":
        with open(files[1], "rb") as fh:
            assert pickle.load(fh) == pert_data.subgroup


def test_custom_and_all_train_splits(processed, tmp_path):
    dataset = processed["dataset"]
    kept = json.loads((dataset / "go_filter.json").read_text())["kept"]
    perts = [c for c in kept if c != "ctrl"]
    args = (dataset / "perturb_processed.h5ad", dataset / "go_filter.json", tmp_path, NAME)
    (path,) = build_split(*args, "all_train", SEED)
    with open(path, "rb") as fh:
        assert pickle.load(fh) == {"train": kept, "val": [], "test": []}
    (path,) = build_split(*args, "custom", SEED, test_perts=perts[:2], val_perts=perts[2:3])
    with open(path, "rb") as fh:
        sets = pickle.load(fh)
    assert sets["test"] == perts[:2] and sets["val"] == perts[2:3]
    assert set(sets["train"]) == set(kept) - set(perts[:3])
    with pytest.raises(ValueError, match="unknown conditions"):
        build_split(*args, "custom", SEED, test_perts=["NOPE+ctrl"])


def test_go_filter_without_files_keeps_everything(processed, tmp_path):
    report = go_filter_report(
        processed["dataset"] / "perturb_processed.h5ad", tmp_path / "go.json", None
    )
    assert not report["applied"] and report["dropped"] == {}


def test_download_from_local_http_server(tmp_path):
    served = tmp_path / "served" / "api" / "access" / "datafile"
    served.mkdir(parents=True)
    for name, file_id in GEARS_FILES.items():
        (served / str(file_id)).write_bytes(pickle.dumps({"file": name}))
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served")
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["download-gears-go", str(tmp_path / "go"), "--server", url]) == 0
    finally:
        server.shutdown()
        server.server_close()
    for name in GEARS_FILES:
        with open(tmp_path / "go" / name, "rb") as fh:
            assert pickle.load(fh) == {"file": name}


def test_qc_report(processed, tmp_path):
    adata = ad.read_h5ad(processed["dataset"] / "perturb_processed.h5ad", backed="r")
    genes = list(adata.var_names)
    (tmp_path / "vocab.json").write_text(json.dumps({g: i for i, g in enumerate(genes[5:])}))
    write_qc(
        processed["dataset"] / "stats.npz",
        tmp_path / "vocab.json",
        tmp_path / "qc",
        min_cells=10**6,
    )
    report = json.loads((tmp_path / "qc" / "qc.json").read_text())
    assert report["vocab"]["unmatched"] == genes[:5]
    assert report["vocab"]["n_matched"] == len(genes) - 5
    counts = adata.obs["condition"].value_counts()
    assert report["cells_per_perturbation"] == {c: int(n) for c, n in counts.items() if c != "ctrl"}
    assert set(report["below_min_cells"]) == set(report["cells_per_perturbation"])
    knockdown = [v["knockdown"] for v in report["knockdown"].values() if v["knockdown"] is not None]
    assert np.median(knockdown) > 0.3  # the synthetic data plants CRISPRi knockdowns
    for png in ("cells_per_perturbation.png", "knockdown.png"):
        assert (tmp_path / "qc" / png).read_bytes()[:4] == b"\x89PNG"
