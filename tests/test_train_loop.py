"""Finetuning loop: OOM fallback, precision choice, loss goes down, outputs load, resume, DDP."""

# ruff: noqa: F811  (pytest fixtures imported from tests.train_support)

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scgpt_vcc.data.gears import perturbed_genes
from scgpt_vcc.data.genes import write_gene_list
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import CsrRowReader, read_annotations
from scgpt_vcc.model.checkpoint import read_state_dict, read_vocab
from scgpt_vcc.model.loading import load_finetuned
from scgpt_vcc.model.transformer import TransformerGenerator
from scgpt_vcc.predict.cells import ExpressionData
from scgpt_vcc.predict.run import PredictSettings, predict_heldout
from scgpt_vcc.predict.scgpt import load_predictor
from scgpt_vcc.submission import SubmissionSettings, write_submission_h5ad
from scgpt_vcc.train.config import TrainConfig
from scgpt_vcc.train.loop import finetune
from scgpt_vcc.train.precision import fit_micro_batch, resolve_precision
from tests.train_support import (  # noqa: F401
    run_finetune,
    train_cells,
    train_inputs,
    unmeasured_inputs,
)

CLI = str(Path(sys.executable).with_name("scgpt-vcc"))
FAST = {"max_seq_len": 128, "workers": 0, "batch_size": 16, "accumulation": 2}


def test_oom_halves_micro_batch_and_doubles_accumulation(caplog):
    tried = []

    def try_step(micro: int) -> None:
        tried.append(micro)
        if micro > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with caplog.at_level(logging.WARNING):
        assert fit_micro_batch(try_step, 64, 1) == (16, 4)
    assert tried == [64, 32, 16]
    assert "retrying with micro-batch 16 and accumulation 4" in caplog.text

    def never_fits(micro: int) -> None:
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(torch.OutOfMemoryError):
        fit_micro_batch(never_fits, 4, 1)
    with pytest.raises(InputError, match="cannot be halved"):
        fit_micro_batch(never_fits, 48, 1)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_precision_follows_device_and_config(monkeypatch, native_bf16):
    monkeypatch.setattr("scgpt_vcc.model.device.cpu_has_native_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    bf16_if_native = torch.bfloat16 if native_bf16 else None
    assert resolve_precision(TrainConfig(), cpu) is bf16_if_native
    assert resolve_precision(TrainConfig(precision="bf16", cpu_amp=False), cpu) is None
    assert resolve_precision(TrainConfig(cpu_amp=True, amp=False), cpu) is None
    assert resolve_precision(TrainConfig(precision="fp32"), cpu) is None


def test_finetune_lowers_training_loss_and_writes_loadable_outputs(train_inputs, tmp_path):
    cfg = TrainConfig(epochs=3, **FAST)
    out = run_finetune(train_inputs, tmp_path / "model", cfg)
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3]
    assert metrics["train_loss"].iloc[-1] < 0.8 * metrics["train_loss"].iloc[0]
    assert metrics["val_pearson_delta"].notna().all()  # validation set -> Pearson-delta
    for name in ("best_model.pt", "args.json", "vocab.json", "loss_curve.png", "steps.csv"):
        assert (out / name).stat().st_size > 0
    assert not (out / "resume").exists()
    log = (out / "run.log").read_text()
    assert "batch_size 16, accumulation 2, effective batch 32" in log
    assert "device cpu" in log and "selection on val_pearson_delta" in log

    model = load_finetuned(out)
    best = metrics.loc[metrics["best"], "epoch"].iloc[-1]
    assert best == metrics["val_pearson_delta"].idxmax() + 1
    saved = read_state_dict(out / "best_model.pt")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_oom_at_start_keeps_the_effective_batch(train_inputs, tmp_path, monkeypatch):
    forward = TransformerGenerator.forward

    def small_memory(self, gene_ids, *args, **kwargs):
        if gene_ids.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(self, gene_ids, *args, **kwargs)

    monkeypatch.setattr(TransformerGenerator, "forward", small_memory)
    cfg = TrainConfig(epochs=1, max_steps=2, **FAST)  # the set-up is what is checked
    out = run_finetune(train_inputs, tmp_path / "model", cfg, "split_noval")
    log = (out / "run.log").read_text()
    assert "retrying with micro-batch 8 and accumulation 4" in log
    assert "batch_size 4, accumulation 8, effective batch 32" in log
    assert "selection on train_loss" in log


def _cli_args(inputs: dict, outdir: Path, *extra: str) -> list[str]:
    return [
        CLI,
        "finetune",
        "--data", str(inputs["data"]),
        "--pairing", str(inputs["pairing"]),
        "--checkpoint-dir", str(inputs["checkpoint"]),
        "--split", str(inputs["split_noval"]),
        "--outdir", str(outdir),
        "--max-seq-len", "64",
        "--workers", "0",
        "--threads", "1",
        "--dropout", "0.1",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_model(train_inputs, tmp_path):
    settings = ["--epochs", "2", "--batch-size", "16", "--checkpoint-every-steps", "5"]
    subprocess.run(_cli_args(train_inputs, tmp_path / "whole", *settings), check=True)

    killed = tmp_path / "killed"
    state = killed / "resume" / "state.pt"
    proc = subprocess.Popen(_cli_args(train_inputs, killed, *settings), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    # Kill after the first mid-epoch checkpoint of epoch 2.
    while proc.poll() is None and time.monotonic() < deadline:
        if state.exists() and (killed / "metrics.csv").exists():
            break
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (killed / "best_model.pt").exists()

    subprocess.run(_cli_args(train_inputs, killed, *settings), check=True)
    assert "resuming from" in (killed / "run.log").read_text()
    whole = read_state_dict(tmp_path / "whole" / "best_model.pt")
    resumed = read_state_dict(killed / "best_model.pt")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "whole" / "steps.csv"), pd.read_csv(killed / "steps.csv")
    )


@pytest.mark.slow
def test_two_gloo_processes_follow_the_single_process_loss_curve(train_inputs, tmp_path):
    base = ["--epochs", "1", "--dropout", "0", "--cpu-amp", "false"]  # exact arithmetic
    single = _cli_args(train_inputs, tmp_path / "one", *base, "--batch-size", "8",
                       "--accumulation", "2")  # fmt: skip
    subprocess.run(single, check=True)
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        *_cli_args(train_inputs, tmp_path / "two", *base, "--batch-size", "8",
                   "--accumulation", "1", "--device", "cpu"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(torchrun, check=True, env=env)
    one = pd.read_csv(tmp_path / "one" / "steps.csv")
    two = pd.read_csv(tmp_path / "two" / "steps.csv")
    assert len(one) == len(two) > 10
    pd.testing.assert_series_equal(one["loss"], two["loss"], rtol=1e-4)
    log = (tmp_path / "two" / "run.log").read_text()
    assert "processes 2" in log and "effective batch 16 (= 8 x 1 x 2 processes)" in log
    a = read_state_dict(tmp_path / "one" / "best_model.pt")
    b = read_state_dict(tmp_path / "two" / "best_model.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.parametrize("split", [{"test": ["A+ctrl"]}, {"train": [], "val": [], "test": []}])
def test_a_split_that_trains_nothing_is_refused(train_inputs, tmp_path, split):
    """GEARS's no_split (only 'test') and an empty train list never mean 'train on all'."""
    path = tmp_path / "split.pkl"
    with path.open("wb") as fh:
        pickle.dump(split, fh)
    cfg = TrainConfig(epochs=1, **FAST)
    with pytest.raises(InputError, match="train"):
        finetune(
            train_inputs["data"], train_inputs["pairing"], train_inputs["checkpoint"],
            tmp_path / "model", cfg, split=path,
        )  # fmt: skip
    assert not (tmp_path / "model" / "best_model.pt").exists()


def test_scratch_run_loads_nothing_from_the_checkpoint(train_inputs, tmp_path):
    """``--load-prefixes ''`` (scgpt_scratch): every parameter starts from random values."""
    out = tmp_path / "scratch"
    subprocess.run(
        [CLI, "finetune", "--data", str(train_inputs["data"]),
         "--pairing", str(train_inputs["pairing"]), "--split", str(train_inputs["split_noval"]),
         "--checkpoint-dir", str(train_inputs["checkpoint"]), "--outdir", str(out),
         "--load-prefixes", "", "--max-seq-len", "128", "--batch-size", "16", "--workers", "0",
         "--epochs", "1", "--max-steps", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    log = (out / "run.log").read_text()
    assert "loaded 0 tensors" in log
    assert "split split_noval.pkl:" in log


def test_a_panel_smaller_than_the_sequence_length_trains_on_every_gene(train_inputs, tmp_path):
    """Targeted panels have fewer genes (here 400) than the default max_seq_len (1,536):
    every step then sees all genes, and training runs with the defaults."""
    defaults = TrainConfig()
    assert defaults.max_seq_len > 400
    cfg = TrainConfig(epochs=1, workers=0, batch_size=64, accumulation=1)
    out = run_finetune(train_inputs, tmp_path / "model", cfg, split="split_noval")
    losses = pd.read_csv(out / "steps.csv")["loss"]
    assert len(losses) > 10 and losses.notna().all() and (losses > 0).all()
    genes = re.search(r"max_seq_len 1536 of (\d+) input genes", (out / "run.log").read_text())
    assert genes and int(genes.group(1)) <= 400

    # ... and predicts with the default gene chunk (1,536): one chunk holds the whole panel.
    train = pickle.loads(train_inputs["split_noval"].read_bytes())["train"]
    held_out = [c for c in train if c != "ctrl"][:2]
    split = tmp_path / "split.pkl"
    split.write_bytes(pickle.dumps({"train": train, "val": [], "test": held_out}))
    settings = PredictSettings(n_cells=4, n_control_cells=8)
    assert settings.chunk_size > 400
    predicted = tmp_path / "scgpt_finetuned.h5ad"
    args = (train_inputs["data"], split, train_inputs["pairing"], predicted, settings, out)
    predict_heldout("scgpt_finetuned", *args)
    cells = ad.read_h5ad(predicted)
    assert cells.n_vars == 400 and np.isfinite(cells.X.toarray()).all()
    assert (cells.obs["condition"].isin(held_out)).sum() == 8


def test_renamed_genes_join_the_model_input(train_inputs, tmp_path):
    """Genes outside the vocabulary that vocab_match.json renames to a vocabulary symbol are
    fed to the model, and a prediction with the same file sees them too."""
    _, var = read_annotations(train_inputs["data"])
    vocab = read_vocab(train_inputs["checkpoint"] / "vocab.json")
    missing = [g for g in var.index if g not in vocab][:5]
    spare = [t for t in vocab if t.startswith("LOC")][:5]  # vocabulary symbols no data gene has
    assert len(missing) == len(spare) == 5
    renames = tmp_path / "vocab_match.json"
    renames.write_text(json.dumps({"renames": dict(zip(missing, spare, strict=True))}))
    cfg = TrainConfig(epochs=1, max_steps=2, gene_renames=str(renames), **FAST)
    out = run_finetune(train_inputs, tmp_path / "model", cfg, split="split_noval")
    log = (out / "run.log").read_text()
    matched = int(re.search(r"(\d+) of 400 genes .* are in the scGPT vocabulary", log).group(1))
    assert matched == 400 - len([g for g in var.index if g not in vocab]) + 5
    assert "5 genes matched under their current HGNC symbol" in log


def test_cells_of_an_unmeasured_target_train_and_predict(unmeasured_inputs, tmp_path):
    """A perturbation of a gene the panel does not measure (but the vocabulary knows) is
    learnt from its token, and the trained model predicts it."""
    cfg = TrainConfig(epochs=1, **FAST)
    out = run_finetune(unmeasured_inputs, tmp_path / "model", cfg, split="split_noval")
    log = (out / "run.log").read_text()
    target = unmeasured_inputs["target"]
    assert "1 perturbation targets are not measured but in the vocabulary" in log
    assert f"{target}+ctrl" not in log.split("their cells are skipped")[-1]
    assert pd.read_csv(out / "steps.csv")["loss"].notna().all()

    data = ExpressionData(unmeasured_inputs["data"])
    predictor = load_predictor(out, data.genes, chunk_size=64)
    control = CsrRowReader(unmeasured_inputs["data"]).read_dense(data.control_rows[:6])
    perturbed = predictor.cells(control, [target])
    assert perturbed.shape == control.shape and np.isfinite(perturbed).all()
    assert not np.allclose(perturbed, control)  # the model ran on these cells
    unknown = predictor.cells(control, ["NOT_A_GENE"])  # outside the vocabulary
    np.testing.assert_array_equal(unknown, control)

    # A submission may list it, even among mostly unmeasured targets the vocabulary knows:
    # their cells are the model's prediction for the target.
    measured_target = perturbed_genes(unmeasured_inputs["renamed"])[0]
    vocab = read_vocab(unmeasured_inputs["checkpoint"] / "vocab.json")
    other = next(t for t in vocab if t.startswith("LOC") and t != target and predictor.knows(t))
    assert not predictor.knows("NOT_A_GENE")
    (tmp_path / "counts.csv").write_text(
        "target_gene,n_cells,median_umi_per_cell\n"
        f"{target},4,900\n{other},2,900\n{measured_target},3,900\n"
    )
    write_gene_list(list(data.genes), tmp_path / "genes.csv")
    summary = write_submission_h5ad(
        data, predictor, tmp_path / "counts.csv", tmp_path / "genes.csv",
        tmp_path / "prediction.h5ad", SubmissionSettings(max_cells=100, min_control_cells=10),
        PredictSettings(n_reference_cells=32),
    )  # fmt: skip
    assert summary["n_cells"] == {target: 4, other: 2, measured_target: 3}
    cells = ad.read_h5ad(tmp_path / "prediction.h5ad")
    assert (cells.obs["target_gene"] == target).sum() == 4
