"""Subcommands that train and run models: finetuning, held-out predictions, the submission."""

from __future__ import annotations

import argparse
from pathlib import Path

from scgpt_vcc.cli.options import add_options, call, command
from scgpt_vcc.precisions import PRECISIONS
from scgpt_vcc.predict import MODEL_TYPES

# Options of the held-out cells themselves (which cells, how many), not of any model.
CELL_OPTIONS = ("seed", "n_cells", "n_control_cells")
PREDICT_HELP = {
    "n_cells": "cells per perturbation (none: as many as the real data has)",
    "n_control_cells": "control cells (none: all)",
    "n_reference_cells": "control cells scGPT's population mean is estimated over (none: all)",
    "batch_size": "cells per model call (none: --gpu-batch-size for scGPT on a GPU, else a CPU's)",
    "gpu_batch_size": "cells per model call of scGPT on a GPU when --batch-size is none",
    "compile": "torch.compile scGPT's inference on a GPU (ignored on a CPU)",
    "chunk_size": "genes per model input",
    "device": "auto, cpu or cuda",
    "precision": "scGPT autocast on a GPU, decided as in training (fp32 on CPU)",
}


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _add_model_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="trained folder (scgpt_*), pretrained checkpoint (linear_scgpt)",
    )


@command("match-vocabulary", "data genes to vocabulary tokens, with HGNC's renames")
def declare_match_vocabulary(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.model.renames import write_vocab_match

    p.add_argument("processed", type=Path, help="perturb_processed.h5ad")
    p.add_argument("vocab_path", type=Path, help="pretrained vocab.json")
    p.add_argument("output", type=Path, help="vocab_match.json to write")
    add_options(
        p, write_vocab_match, helps={"hgnc_table": "HGNC's complete set (hgnc_complete_set.txt)"}
    )
    p.set_defaults(handler=lambda a: call(write_vocab_match, a))


@command("finetune", "finetune scGPT's perturbation model (torchrun/srun for several GPUs)")
def declare_finetune(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.train.config import SELECTIONS, TrainConfig

    p.add_argument("--data", type=Path, required=True, help="perturb_processed.h5ad")
    p.add_argument("--pairing", type=Path, required=True, help="data_pyg/pairing_seed{N}.npz")
    p.add_argument("--checkpoint-dir", type=Path, required=True, help="pretrained scGPT folder")
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--split", type=Path, default=None, help="GEARS split pickle (default: all)")
    add_options(
        p,
        TrainConfig,
        helps={
            "batch_size": "micro-batch per process",
            "amp": "mixed precision",
            "cpu_amp": "bf16 autocast on a CPU that computes bf16 natively",
            "compile": "torch.compile training (GPU only)",
            "workers": "batch-building processes",
            "device": "auto, cpu or cuda",
            "gpu_class": "recorded in run.log",
            "load_prefixes": "comma-separated checkpoint modules to load",
            "max_steps": "stop (resumable) after N steps",
        },
        choices={"precision": PRECISIONS, "selection": SELECTIONS},
    )
    _add_threads(p)

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.train.loop import finetune

        _set_threads(a)
        finetune(a.data, a.pairing, a.checkpoint_dir, a.outdir, call(TrainConfig, a), a.split)

    p.set_defaults(handler=run)


def _add_heldout_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="perturb_processed.h5ad")
    p.add_argument("--split", type=Path, required=True, help="GEARS split pickle (test = held out)")
    p.add_argument("--pairing", type=Path, required=True, help="data_pyg/pairing_seed{N}.npz")


@command("predict", "predict the held-out perturbations with one model type")
def declare_predict(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.predict.run import PredictSettings, predict_heldout

    p.add_argument("--model-type", choices=MODEL_TYPES, required=True)
    _add_model_dir(p)
    p.add_argument("--output", type=Path, required=True, help="{model_type}.h5ad to write")
    _add_heldout_inputs(p)
    add_options(p, PredictSettings, helps=PREDICT_HELP, choices={"precision": PRECISIONS})
    _add_threads(p)

    def run(a: argparse.Namespace) -> None:
        _set_threads(a)
        predict_heldout(
            a.model_type, a.data, a.split, a.pairing, a.output, call(PredictSettings, a),
            a.model_dir,
        )  # fmt: skip

    p.set_defaults(handler=run)


@command("heldout-real", "real held-out cells and their controls (real.h5ad)")
def declare_heldout_real(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.predict.run import PredictSettings, write_real

    p.add_argument("--output", type=Path, required=True, help="real.h5ad to write")
    _add_heldout_inputs(p)
    model_options = {f.name for f in PredictSettings.__dataclass_fields__.values()}
    add_options(p, PredictSettings, helps=PREDICT_HELP, exclude=model_options - {*CELL_OPTIONS})
    p.set_defaults(
        handler=lambda a: write_real(a.data, a.split, a.pairing, a.output, call(PredictSettings, a))
    )


@command("counts", "a prediction file (or real.h5ad) as raw integer counts")
def declare_counts(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.predict.counts import CountSettings, write_counts

    p.add_argument("--pred", dest="pred_path", type=Path, required=True,
                   help="{model_type}.h5ad or real.h5ad")  # fmt: skip
    p.add_argument("--converted", dest="converted_path", type=Path, required=True,
                   help="converted.h5ad (layers counts)")  # fmt: skip
    p.add_argument("--output", type=Path, required=True, help="counts h5ad to write")
    add_options(p, CountSettings, helps={"chunk_size": "cells per chunk"})
    p.set_defaults(handler=lambda a: call(write_counts, a, settings=call(CountSettings, a)))


@command("submission-counts", "the VCC 2026 form of a submission: raw counts, validated")
def declare_submission_counts(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.predict.counts import CountSettings
    from scgpt_vcc.submission_counts import make_counts_submission

    p.add_argument("--submission", type=Path, required=True, help="prediction.h5ad")
    p.add_argument("--converted", type=Path, required=True,
                   help="converted.h5ad (layers counts)")  # fmt: skip
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--control-label", required=True, help="the control value of target_gene")
    p.add_argument("--truth", type=Path, default=None,
                   help="true counts of the list (synthetic data): check the pair")  # fmt: skip
    add_options(p, CountSettings, helps={"chunk_size": "cells per chunk"})
    p.set_defaults(
        handler=lambda a: call(make_counts_submission, a, settings=call(CountSettings, a))
    )


@command("submission", "VCC submission h5ad and .vcc file (cell-eval prep)")
def declare_submission(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.predict.run import PredictSettings
    from scgpt_vcc.submission import SubmissionSettings, make_submission

    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument(
        "--data", type=Path, required=True, help="perturb_processed.h5ad (training data)"
    )
    p.add_argument("--split", type=Path, required=True, help="all_train split: what it fits on")
    p.add_argument("--counts", type=Path, required=True, help="target_gene,n_cells,... CSV")
    p.add_argument("--gene-names", type=Path, required=True, help="gene_names.csv (no header)")
    _add_model_dir(p)
    add_options(
        p,
        SubmissionSettings,
        helps={"target_sum": "depth of the submission's scale (none: from the counts CSV)"},
        choices={"model_type": MODEL_TYPES},
    )
    add_options(
        p,
        PredictSettings,
        helps=PREDICT_HELP,
        exclude=CELL_OPTIONS,
        choices={"precision": PRECISIONS},
    )
    _add_threads(p)

    def run(a: argparse.Namespace) -> None:
        _set_threads(a)
        make_submission(
            a.data, a.split, a.counts, a.gene_names, a.outdir, call(SubmissionSettings, a),
            call(PredictSettings, a), a.model_dir,
        )  # fmt: skip

    p.set_defaults(handler=run)
