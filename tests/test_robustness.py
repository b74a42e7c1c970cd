"""Issue 7 robustness cases beyond conversion: odd perturbations, counts CSV, checkpoint
folders, a diverging training run and a full disk."""

# ruff: noqa: F811  (pytest fixtures imported from tests.train_support)

from __future__ import annotations

import errno
import json
import logging
import pickle
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from scgpt_vcc import cli
from scgpt_vcc.data import de
from scgpt_vcc.data.convert import convert_to_gears
from scgpt_vcc.data.de import compute_de
from scgpt_vcc.data.go import go_filter_report
from scgpt_vcc.data.pairing import write_pairing
from scgpt_vcc.data.qc import qc_report
from scgpt_vcc.data.splits import build_split
from scgpt_vcc.errors import InputError
from scgpt_vcc.model.checkpoint import read_vocab
from scgpt_vcc.model.device import precision_name
from scgpt_vcc.model.loading import load_pretrained
from scgpt_vcc.model.random_checkpoint import write_random_checkpoint
from scgpt_vcc.model.vocab import match_genes
from scgpt_vcc.submission import read_counts
from scgpt_vcc.train.batches import PerturbationCells
from scgpt_vcc.train.config import TrainConfig
from scgpt_vcc.train.loop import finetune
from scgpt_vcc.train.precision import resolve_precision
from tests.train_support import train_inputs  # noqa: F401

FAST = {"max_seq_len": 64, "workers": 0, "batch_size": 16, "accumulation": 1}

# --------------------------------------------------------------------- odd perturbations


def _reshape_perturbations(source: Path, out: Path, keep: dict[str, int], rename: dict) -> Path:
    """Copy of a VCC-format h5ad with some perturbations cut to ``keep`` cells or renamed."""
    adata = ad.read_h5ad(source)
    target = adata.obs["target_gene"].astype(str)
    mask = np.ones(adata.n_obs, dtype=bool)
    for gene, n in keep.items():
        rows = np.flatnonzero(target == gene)
        mask[rows[n:]] = False
    adata = adata[mask].copy()
    adata.obs["target_gene"] = adata.obs["target_gene"].astype(str).replace(rename)
    adata.write_h5ad(out)
    return out


def _perturbed(adata_path: Path) -> list[str]:
    target = ad.read_h5ad(adata_path, backed="r").obs["target_gene"].astype(str)
    return sorted(set(target) - {"non-targeting"})


def test_unmeasured_target_and_small_perturbation_through_the_stages(
    synthetic_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = synthetic_dir / "adata.h5ad"
    small, renamed, *_ = _perturbed(raw)
    raw = _reshape_perturbations(raw, tmp_path / "raw.h5ad", {small: 5}, {renamed: "NOTMEASURED"})
    caplog.set_level(logging.INFO, logger="scgpt_vcc")

    # convert: warns and keeps the cells
    convert_to_gears(raw, tmp_path / "converted.h5ad", chunk_size=500)
    assert "not among the measured genes" in caplog.text and "NOTMEASURED" in caplog.text

    # compute-de, go-filter: both conditions stay (GEARS keeps them without its GO files)
    compute_de(tmp_path / "converted.h5ad", tmp_path / "processed.h5ad", tmp_path / "stats.npz")
    report = go_filter_report(tmp_path / "processed.h5ad", tmp_path / "go.json", None)
    assert {"NOTMEASURED+ctrl", f"{small}+ctrl"} <= set(report["kept"])

    # QC: both reported
    vocab = {g: i for i, g in enumerate(_perturbed(synthetic_dir / "adata.h5ad"))}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    qc = qc_report(tmp_path / "stats.npz", tmp_path / "vocab.json", min_cells=10)
    assert qc["targets_not_measured"] == ["NOTMEASURED"]
    assert qc["below_min_cells"] == {f"{small}+ctrl": 5}

    # split: the small perturbation is left out of every set when min_cells is given
    caplog.clear()
    [path] = build_split(
        tmp_path / "processed.h5ad", tmp_path / "go.json", tmp_path, "t", "all_train", 1,
        min_cells=10,
    )  # fmt: skip
    train = pickle.loads(path.read_bytes())["train"]
    assert f"{small}+ctrl" not in train and "NOTMEASURED+ctrl" in train
    assert f"{small}+ctrl (5)" in caplog.text and "not trained on, not evaluated" in caplog.text
    [path] = build_split(
        tmp_path / "processed.h5ad", tmp_path / "go.json", tmp_path / "all", "t", "all_train", 1
    )
    assert f"{small}+ctrl" in pickle.loads(path.read_bytes())["train"]

    # training: cells of the unmeasured target are skipped (nothing to flag), with a log
    write_pairing(tmp_path / "processed.h5ad", tmp_path / "pairing.npz", seed=1)
    genes = list(ad.read_h5ad(tmp_path / "processed.h5ad", backed="r").var_names)
    vocab = {g: i for i, g in enumerate([*genes, "<pad>", "<cls>", "<eoc>"])}
    cells = PerturbationCells(
        tmp_path / "processed.h5ad", tmp_path / "pairing.npz", match_genes(genes, vocab)
    )
    assert cells.unlearnable == ["NOTMEASURED+ctrl"]
    assert "their cells are skipped: NOTMEASURED+ctrl" in caplog.text


def test_perturbation_with_one_cell_is_a_clear_error(synthetic_dir: Path, tmp_path: Path) -> None:
    raw = synthetic_dir / "adata.h5ad"
    one = _perturbed(raw)[0]
    raw = _reshape_perturbations(raw, tmp_path / "raw.h5ad", {one: 1}, {})
    convert_to_gears(raw, tmp_path / "converted.h5ad", chunk_size=500)
    with pytest.raises(InputError, match="a t-test needs two") as err:
        compute_de(tmp_path / "converted.h5ad", tmp_path / "p.h5ad", tmp_path / "s.npz")
    assert err.value.field == "obs.condition" and f"{one}+ctrl" in err.value.problem
    assert not (tmp_path / "p.h5ad").exists()


# --------------------------------------------------------------------- validation counts CSV

GENES = ["AAA", "BBB", "CCC"]


@pytest.mark.parametrize(
    ("text", "field", "phrase"),
    [
        ("target_gene,n_cells\nAAA,10\nZZZ,5\nYYY,1\n", "target_gene", "not in gene_names.csv"),
        ("target_gene,n_cells\nAAA,0\nBBB,4\n", "n_cells", "zero or negative"),
        ("target_gene,n_cells\nAAA,-3\n", "n_cells", "zero or negative"),
        ("target_gene,n_cells\nAAA,2.5\n", "n_cells", "not a whole number"),
        ("target_gene,n_cells\nAAA,many\n", "n_cells", "not a whole number"),
        ("target_gene,n_cells\nAAA,1\nAAA,2\n", "target_gene", "repeated genes"),
        ("target_gene,ncells\nAAA,10\n", "n_cells", "did you mean 'ncells'?"),
        ("gene,n_cells\nAAA,10\n", "target_gene", "column is missing"),
        ("AAA,10,54000.0\nBBB,5,53000.0\n", "target_gene", "the header is missing"),
        ("", "file", "not a readable CSV"),
    ],
)
def test_counts_csv_problems_name_file_field_and_fix(
    tmp_path: Path, text: str, field: str, phrase: str
) -> None:
    path = tmp_path / "counts.csv"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        read_counts(path, GENES)
    assert err.value.path == str(path) and err.value.field == field
    assert phrase in err.value.problem and err.value.fix


def test_a_minority_of_unmeasured_targets_is_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A screen's listed targets need not all be measured genes; a list mostly outside
    the gene list is another phase's and is refused (above)."""
    path = tmp_path / "counts.csv"
    path.write_text("target_gene,n_cells\nAAA,10\nBBB,4\nZZZ,5\n")
    assert read_counts(path, GENES) == {"AAA": 10, "BBB": 4, "ZZZ": 5}
    assert "1 listed targets are not measured genes of the gene list: ['ZZZ']" in caplog.text


def test_counts_csv_valid_and_real_reference(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    path.write_text("target_gene, n_cells ,median_umi_per_cell\nAAA,10,5.0\nCCC,3,1.0\n")
    assert read_counts(path, GENES) == {"AAA": 10, "CCC": 3}
    reference = Path(__file__).resolve().parents[1] / "resources" / "reference"
    genes = (reference / "vcc_gene_names.csv").read_text().split()
    counts = read_counts(reference / "vcc_pert_counts_Validation.csv", genes)
    assert len(counts) == 50 and min(counts.values()) > 0


# --------------------------------------------------------------------- pretrained folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    genes = [f"G{i}" for i in range(40)]
    write_random_checkpoint(out, genes, embsize=16, nlayers=1, nheads=2, d_hid=16, seed=0)
    return out


def _edit_json(folder: Path, name: str, edit) -> None:
    path = folder / name
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _extra_gene(vocab: dict) -> dict:
    return {**vocab, "EXTRA": len(vocab)}


def _args_not_json(path: Path) -> None:
    path.write_text("{embsize: 16")


def _module_prefix(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.save({f"module.{k}": v for k, v in state.items()}, path)


# The cases of issue 7 that tests/test_model.py does not already cover:
# (file changed, change, file named by the error, field, phrase of the problem).
CHECKPOINT_CASES = {
    "args_not_json": ("args.json", _args_not_json, "args.json", "file", "not valid JSON"),
    "args_zero_layers": ("args.json", {"nlayers": 0}, "args.json", "nlayers", "positive integer"),
    "heads_do_not_divide": ("args.json", {"nheads": 3}, "args.json", "embsize", "not divisible"),
    "vocab_larger": (
        "vocab.json", _extra_gene, "best_model.pt", "encoder.embedding.weight", "tokens) needs"
    ),
    "vocab_ids_gap": (
        "vocab.json", lambda v: {**v, "EXTRA": len(v) + 5}, "vocab.json", "ids", "each used once"
    ),
    "module_prefix": ("best_model.pt", _module_prefix, "best_model.pt", "parameters", "module."),
}  # fmt: skip


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_problems_name_file_and_field(ckpt: Path, tmp_path: Path, case: str) -> None:
    changed, change, named, field, phrase = CHECKPOINT_CASES[case]
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    if isinstance(change, dict):
        _edit_json(bad, changed, lambda args: {**args, **change})
    elif changed == "vocab.json":
        _edit_json(bad, changed, change)
    else:
        change(bad / changed)
    with pytest.raises(InputError) as err:
        load_pretrained(bad)
    assert Path(err.value.path).name == named and "Fix:" in str(err.value)
    assert err.value.field == field and phrase in str(err.value)


def test_vocab_reader_alone_rejects_missing_pad(ckpt: Path, tmp_path: Path) -> None:
    vocab = json.loads((ckpt / "vocab.json").read_text())
    pad = vocab.pop("<pad>")
    vocab = {g: (i if i < pad else i - 1) for g, i in vocab.items()}  # ids stay contiguous
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(InputError) as err:
        read_vocab(tmp_path / "vocab.json")
    assert err.value.field == "<pad>"


# --------------------------------------------------------------------- NaN / inf loss


def _finetune(inputs: dict, outdir: Path, data: Path | None = None, **cfg) -> None:
    finetune(
        data or inputs["data"],
        inputs["pairing"],
        inputs["checkpoint"],
        outdir,
        TrainConfig(epochs=1, **{**FAST, **cfg}),
        split=inputs["split_noval"],
    )


def test_diverging_loss_stops_with_a_diagnosis_and_keeps_the_old_model(
    train_inputs, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "best_model.pt").write_bytes(b"previous model")
    with pytest.raises(InputError) as err:
        _finetune(train_inputs, out, lr=1e30)
    assert err.value.field == "train.lr/train.precision"
    expected = precision_name(resolve_precision(TrainConfig(), torch.device("cpu")))
    assert "lr 1e+30" in err.value.problem and f"precision {expected}" in err.value.problem
    assert "lower train.lr" in err.value.fix
    assert (out / "best_model.pt").read_bytes() == b"previous model"
    assert not (out / "args.json").exists()


def test_inf_in_the_data_is_named_as_the_cause(train_inputs, tmp_path: Path) -> None:
    adata = ad.read_h5ad(train_inputs["data"])
    adata.X.data[::40] = np.inf
    adata.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(InputError) as err:
        _finetune(train_inputs, tmp_path / "model", data=tmp_path / "bad.h5ad")
    assert err.value.field == "X" and err.value.path == str(tmp_path / "bad.h5ad")
    assert "NaN or inf in cells" in err.value.problem
    assert not (tmp_path / "model" / "best_model.pt").exists()


# --------------------------------------------------------------------- disk full


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_perturb_processed(
    converted_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    output, stats = tmp_path / "perturb_processed.h5ad", tmp_path / "stats.npz"
    compute_de(converted_path, output, stats)
    before = output.read_bytes(), stats.read_bytes()

    write_elem = de.write_elem

    def fail_on_uns(group, key, value, **kwargs):  # X is already copied when uns is written
        if key == "uns" and group.file.filename != str(converted_path):
            _disk_full()
        return write_elem(group, key, value, **kwargs)

    monkeypatch.setattr(de, "write_elem", fail_on_uns)
    with pytest.raises(OSError) as err:
        compute_de(converted_path, output, stats)
    assert err.value.errno == errno.ENOSPC
    assert (output.read_bytes(), stats.read_bytes()) == before  # previous outputs untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perturb_processed.h5ad", "stats.npz"]

    # The CLI turns it into one line with the fix, exit status 3.
    argv = ["compute-de", str(converted_path), str(output), "--stats", str(stats)]
    with caplog.at_level(logging.ERROR):
        assert cli.main(argv) == 3
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert "disk full" in message and "Fix:" in message and "\n" not in message
    assert output.read_bytes() == before[0]
