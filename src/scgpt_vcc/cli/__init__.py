"""Command line interface: one subcommand per workflow step.

Every Snakemake rule calls one of these subcommands, so each step also runs on its own:
``scgpt-vcc <command> --help`` lists its options. Each ``_add_*`` function below
declares one subcommand and binds it to the package function that does the work.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from scgpt_vcc.errors import InputError

Handler = Callable[[argparse.Namespace], None]


def _add_make_synthetic_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-synthetic-dataset",
        help="generate a VCC-shaped raw-count dataset with planted perturbation effects",
    )
    p.add_argument("--gene-list", type=Path, required=True, help="VCC gene_names.csv (no header)")
    p.add_argument("--out-adata", type=Path, required=True)
    p.add_argument("--out-validation-counts", type=Path, required=True)
    p.add_argument("--out-gene-names", type=Path, required=True)
    p.add_argument("--out-validation-truth", type=Path, default=None)
    p.add_argument("--n-cells", type=int, default=4000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--n-perturbations", type=int, default=40)
    p.add_argument("--n-validation-perturbations", type=int, default=10)
    p.add_argument("--control-fraction", type=float, default=0.17)
    p.add_argument("--median-umi", type=float, default=None)
    p.add_argument("--n-modules", type=int, default=12)
    p.add_argument("--n-batches", type=int, default=4)
    p.add_argument("--control-label", default="non-targeting")
    p.add_argument("--seed", type=int, default=0)

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.data.synthetic import SyntheticSpec, write_synthetic_dataset

        spec = SyntheticSpec(
            n_cells=a.n_cells,
            n_genes=a.n_genes,
            n_perturbations=a.n_perturbations,
            n_validation_perturbations=a.n_validation_perturbations,
            control_fraction=a.control_fraction,
            median_umi=a.median_umi,
            n_modules=a.n_modules,
            n_batches=a.n_batches,
            control_label=a.control_label,
            seed=a.seed,
        )
        write_synthetic_dataset(
            spec,
            gene_list=a.gene_list,
            adata_path=a.out_adata,
            validation_counts_path=a.out_validation_counts,
            gene_names_path=a.out_gene_names,
            validation_truth_path=a.out_validation_truth,
        )

    p.set_defaults(handler=run)


def _add_make_synthetic_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-synthetic-checkpoint",
        help="write a small random scGPT checkpoint in the whole-human format",
    )
    p.add_argument("--gene-names", type=Path, required=True, help="genes to cover (no header)")
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--embsize", type=int, default=64)
    p.add_argument("--nlayers", type=int, default=2)
    p.add_argument("--nheads", type=int, default=4)
    p.add_argument("--d-hid", type=int, default=64)
    p.add_argument("--vocab-fraction", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.data.genes import read_gene_list
        from scgpt_vcc.model.random_checkpoint import write_random_checkpoint

        write_random_checkpoint(
            a.outdir,
            read_gene_list(a.gene_names),
            vocab_fraction=a.vocab_fraction,
            embsize=a.embsize,
            nlayers=a.nlayers,
            nheads=a.nheads,
            d_hid=a.d_hid,
            seed=a.seed,
        )

    p.set_defaults(handler=run)


def _add_convert_to_gears(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-to-gears", help="VCC raw counts -> GEARS-format AnnData")
    p.add_argument("input", type=Path, help="VCC-format h5ad with raw counts")
    p.add_argument("output", type=Path, help="converted h5ad to write")
    p.add_argument("--cell-type", default="K562")
    p.add_argument("--control-label", default="non-targeting")
    p.add_argument("--perturbation-column", default="target_gene")
    p.add_argument("--target-sum", type=float, default=None, help="default: median total count")
    p.add_argument("--chunk-size", type=int, default=10000, help="cells read at a time")
    p.add_argument(
        "--drop-missing-labels",
        type=_bool,
        default=False,
        help="drop cells without a perturbation label instead of stopping (true/false)",
    )

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.data.convert import convert_to_gears

        convert_to_gears(
            a.input,
            a.output,
            cell_type=a.cell_type,
            control_label=a.control_label,
            perturbation_column=a.perturbation_column,
            target_sum=a.target_sum,
            chunk_size=a.chunk_size,
            drop_missing_labels=a.drop_missing_labels,
        )

    p.set_defaults(handler=run)


# --- GEARS processing stages (data/de.py, pairing.py, go.py, graphs.py, splits.py, qc.py) ---


def _add_compute_de(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compute-de", help="GEARS DE genes in one streaming pass")
    p.add_argument("converted", type=Path, help="converted.h5ad")
    p.add_argument("output", type=Path, help="perturb_processed.h5ad to write")
    p.add_argument("--stats", type=Path, required=True, help="per-condition statistics (.npz)")
    p.add_argument("--chunk-size", type=int, default=5000, help="cells read at a time")

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.data.de import compute_de

        compute_de(a.converted, a.output, a.stats, chunk_size=a.chunk_size)

    p.set_defaults(handler=run)


def _add_pair_controls(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pair-controls", help="draw GEARS's control cell for every cell")
    p.add_argument("processed", type=Path, help="perturb_processed.h5ad")
    p.add_argument("output", type=Path, help="pairing_seed{N}.npz to write")
    p.add_argument("--seed", type=int, required=True)

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.data.pairing import write_pairing

        write_pairing(a.processed, a.output, a.seed)

    p.set_defaults(handler=run)


def _add_download_gears_go(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download-gears-go", help="fetch GEARS's gene2go and essential-gene files")
    p.add_argument("outdir", type=Path)
    p.add_argument("--server", default="https://dataverse.harvard.edu")

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.data.go import download_gears_files

        download_gears_files(a.outdir, server=a.server)

    p.set_defaults(handler=run)


def _add_go_filter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("go-filter", help="GEARS's perturbation-gene list and GO filter report")
    p.add_argument("processed", type=Path, help="perturb_processed.h5ad")
    p.add_argument("output", type=Path, help="go_filter.json to write")
    p.add_argument("--gears-dir", type=Path, default=None, help="folder with gene2go_all.pkl")

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.data.go import go_filter_report

        go_filter_report(a.processed, a.output, a.gears_dir)

    p.set_defaults(handler=run)


def _add_write_cell_graphs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("write-cell-graphs", help="stream GEARS's data_pyg/cell_graphs.pkl")
    p.add_argument("processed", type=Path, help="perturb_processed.h5ad")
    p.add_argument("output", type=Path, help="cell_graphs.pkl to write")
    p.add_argument("--pairing", type=Path, required=True)
    p.add_argument("--go-filter", type=Path, required=True, help="go_filter.json")
    p.add_argument("--batch-size", type=int, default=256)

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.data.go import read_go_filter
        from scgpt_vcc.data.graphs import write_cell_graphs

        names = read_go_filter(a.go_filter)["pert_names"]
        write_cell_graphs(a.processed, a.pairing, names, a.output, batch_size=a.batch_size)

    p.set_defaults(handler=run)


def _add_build_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-split", help="GEARS split pickles made by GEARS's splitter")
    p.add_argument("processed", type=Path, help="perturb_processed.h5ad")
    p.add_argument("outdir", type=Path, help="splits folder")
    p.add_argument("--go-filter", type=Path, required=True, help="go_filter.json")
    p.add_argument("--name", required=True, help="dataset name (GEARS's file prefix)")
    p.add_argument("--split", default="simulation")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--train-gene-set-size", type=float, default=0.75)
    # extend: the workflow passes one flag per condition; nargs="*" alone keeps only the last.
    p.add_argument("--test-perts", nargs="+", action="extend", default=[], help="custom: test")
    p.add_argument("--val-perts", nargs="+", action="extend", default=[], help="custom: val")
    p.add_argument(
        "--min-cells", type=int, default=0, help="leave out perturbations with fewer cells"
    )

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.data.splits import build_split

        build_split(
            a.processed,
            a.go_filter,
            a.outdir,
            a.name,
            a.split,
            a.seed,
            a.train_gene_set_size,
            test_perts=a.test_perts,
            val_perts=a.val_perts,
            min_cells=a.min_cells,
        )

    p.set_defaults(handler=run)


def _add_data_qc(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data-qc", help="data report: cells, knockdown, vocabulary match")
    p.add_argument("stats", type=Path, help="condition_stats.npz from compute-de")
    p.add_argument("outdir", type=Path, help="qc folder")
    p.add_argument("--vocab", type=Path, required=True, help="pretrained vocab.json")
    p.add_argument("--min-cells", type=int, default=50)

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.data.qc import write_qc

        write_qc(a.stats, a.vocab, a.outdir, a.min_cells)

    p.set_defaults(handler=run)


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "all") else int(text)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from scgpt_vcc.precisions import PRECISIONS
    from scgpt_vcc.train.config import SELECTIONS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "finetune",
        help="finetune scGPT's perturbation model (torchrun/srun for several GPUs)",
    )
    p.add_argument("--data", type=Path, required=True, help="perturb_processed.h5ad")
    p.add_argument("--pairing", type=Path, required=True, help="data_pyg/pairing_seed{N}.npz")
    p.add_argument("--checkpoint-dir", type=Path, required=True, help="pretrained scGPT folder")
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--split", type=Path, default=None, help="GEARS split pickle (default: all)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="micro-batch per process")
    p.add_argument("--accumulation", type=int, default=d.accumulation)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--amp", type=_bool, default=d.amp, help="mixed precision (true/false)")
    p.add_argument("--cpu-amp", type=_bool, default=d.cpu_amp, help="bf16 autocast on CPU")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision)
    p.add_argument(
        "--compile", type=_bool, default=d.compile, help="torch.compile training (GPU only)"
    )
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--selection", choices=SELECTIONS, default=d.selection)
    p.add_argument("--checkpoint-every-steps", type=int, default=d.checkpoint_every_steps)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--workers", type=int, default=d.workers, help="batch-building processes")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda")
    p.add_argument("--gpu-class", default=None, help="recorded in run.log")
    p.add_argument(
        "--load-prefixes",
        default=",".join(d.load_prefixes),
        help="comma-separated checkpoint modules to load",
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop (resumable) after N steps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")

    def run(a: argparse.Namespace) -> None:
        import torch

        from scgpt_vcc.train.loop import finetune

        if a.threads:
            torch.set_num_threads(a.threads)
        cfg = TrainConfig(
            lr=a.lr,
            batch_size=a.batch_size,
            accumulation=a.accumulation,
            epochs=a.epochs,
            patience=a.patience,
            gamma=a.gamma,
            max_seq_len=a.max_seq_len,
            amp=a.amp,
            cpu_amp=a.cpu_amp,
            precision=a.precision,
            compile=a.compile,
            grad_clip=a.grad_clip,
            dropout=a.dropout,
            selection=a.selection,
            checkpoint_every_steps=a.checkpoint_every_steps,
            eval_batch_size=a.eval_batch_size,
            workers=a.workers,
            seed=a.seed,
            device=a.device,
            gpu_class=a.gpu_class,
            load_prefixes=tuple(x for x in a.load_prefixes.split(",") if x),
            max_steps=a.max_steps,
        )
        finetune(a.data, a.pairing, a.checkpoint_dir, a.outdir, cfg, split=a.split)

    p.set_defaults(handler=run)


# --- Evaluation (evaluate/) ---


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from scgpt_vcc.evaluate.run import DEFAULT_BASELINE, EvalSettings

    d = EvalSettings()
    p = sub.add_parser(
        "evaluate", help="GEARS/scGPT metrics and cell-eval's VCC metrics of one model type"
    )
    p.add_argument("--real", type=Path, required=True, help="held-out real cells + controls")
    p.add_argument("--pred", type=Path, required=True, help="predicted cells + controls")
    p.add_argument("--processed", type=Path, required=True, help="perturb_processed.h5ad")
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--model-type", required=True)
    p.add_argument("--baseline-metrics", type=Path, default=None, help="train_mean metrics.json")
    p.add_argument(
        "--baseline",
        type=float,
        nargs=3,
        metavar=("DES", "PDS", "MAE"),
        default=[DEFAULT_BASELINE[k] for k in ("des", "pds", "mae")],
        help="challenge-score baseline when --baseline-metrics is not given",
    )
    p.add_argument("--control-label", default=d.control_label)
    p.add_argument("--perturbation-column", default=d.perturbation_column)
    p.add_argument("--de-key", default=d.de_key)
    p.add_argument("--n-top-de", type=int, default=d.n_top_de)
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="cells read at a time")
    p.add_argument(
        "--vcc-group-size", type=int, default=d.vcc_group_size, help="perturbations per DE run"
    )
    p.add_argument("--threads", type=int, default=d.threads, help="cell-eval/pdex threads")

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.evaluate.run import evaluate_predictions

        settings = EvalSettings(
            control_label=a.control_label,
            perturbation_column=a.perturbation_column,
            de_key=a.de_key,
            n_top_de=a.n_top_de,
            chunk_size=a.chunk_size,
            vcc_group_size=a.vcc_group_size,
            threads=a.threads,
        )
        evaluate_predictions(
            a.real,
            a.pred,
            a.processed,
            a.outdir,
            a.model_type,
            settings,
            baseline_metrics=a.baseline_metrics,
            fallback_baseline=dict(zip(("des", "pds", "mae"), a.baseline, strict=True)),
        )

    p.set_defaults(handler=run)


def _add_summarize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summarize", help="mean ± sd over seeds, wins over train_mean, plots")
    p.add_argument("--eval-dir", type=Path, required=True, help="results/eval/{dataset}")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--model-types", nargs="+", required=True)
    p.add_argument("--out-md", type=Path, required=True)
    p.add_argument("--out-csv", type=Path, required=True)
    p.add_argument("--plots-dir", type=Path, default=None)

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.evaluate.summary import summarize

        summarize(a.eval_dir, a.seeds, a.model_types, a.out_md, a.out_csv, a.plots_dir)

    p.set_defaults(handler=run)


# --- prediction, baselines and submission (predict/, submission.py) ---


def _add_predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="perturb_processed.h5ad")
    p.add_argument("--split", type=Path, required=True, help="GEARS split pickle (test = held out)")
    p.add_argument("--pairing", type=Path, required=True, help="data_pyg/pairing_seed{N}.npz")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--n-cells", type=int, default=None, help="cells per perturbation (default: as real)"
    )
    p.add_argument("--n-control-cells", type=int, default=None, help="control cells (default: all)")
    _add_model_options(p)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Options of the models themselves, shared by predict, heldout-real and submission."""
    from scgpt_vcc.precisions import PRECISIONS
    from scgpt_vcc.predict.run import PredictSettings

    d = PredictSettings()
    p.add_argument(
        "--n-reference-cells",
        type=_optional_int,
        default=d.n_reference_cells,
        help="control cells scGPT's population mean is estimated over ('none': all)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="cells per model call")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="genes per model input")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="scGPT autocast on GPU, decided as in training (fp32 on CPU)",
    )
    p.add_argument("--linear-pca-dim", type=int, default=d.linear_pca_dim)
    p.add_argument("--linear-ridge", type=float, default=d.linear_ridge)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def _predict_settings(a: argparse.Namespace):
    import torch

    from scgpt_vcc.predict.run import PredictSettings

    if a.threads:
        torch.set_num_threads(a.threads)
    return PredictSettings(
        seed=a.seed,
        n_cells=getattr(a, "n_cells", None),
        n_control_cells=getattr(a, "n_control_cells", None),
        n_reference_cells=a.n_reference_cells,
        batch_size=a.batch_size,
        chunk_size=a.chunk_size,
        device=a.device,
        precision=a.precision,
        linear_pca_dim=a.linear_pca_dim,
        linear_ridge=a.linear_ridge,
    )


def _add_model_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="trained folder (scgpt_*), pretrained checkpoint (linear_scgpt)",
    )


def _add_predict(sub: argparse._SubParsersAction) -> None:
    from scgpt_vcc.predict import MODEL_TYPES

    p = sub.add_parser("predict", help="predict the held-out perturbations with one model type")
    p.add_argument("--model-type", choices=MODEL_TYPES, required=True)
    _add_model_dir(p)
    p.add_argument("--output", type=Path, required=True, help="{model_type}.h5ad to write")
    _add_predict_options(p)

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.predict.run import predict_heldout

        predict_heldout(
            a.model_type, a.data, a.split, a.pairing, a.output, _predict_settings(a), a.model_dir
        )

    p.set_defaults(handler=run)


def _add_heldout_real(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heldout-real", help="real held-out cells and their controls (real.h5ad)")
    p.add_argument("--output", type=Path, required=True, help="real.h5ad to write")
    _add_predict_options(p)

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.predict.run import write_real

        write_real(a.data, a.split, a.pairing, a.output, _predict_settings(a))

    p.set_defaults(handler=run)


def _add_submission_options(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.predict import MODEL_TYPES

    p.add_argument(
        "--data", type=Path, required=True, help="perturb_processed.h5ad (training data)"
    )
    p.add_argument("--counts", type=Path, required=True, help="target_gene,n_cells,... CSV")
    p.add_argument("--gene-names", type=Path, required=True, help="gene_names.csv (no header)")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="scgpt_finetuned")
    _add_model_dir(p)
    p.add_argument("--split", type=Path, required=True, help="all_train split: what it fits on")
    p.add_argument("--max-cells", type=int, default=100_000)
    p.add_argument("--min-control-cells", type=int, default=1000)
    p.add_argument(
        "--target-sum",
        type=float,
        default=None,
        help="depth of the submission's scale (default: estimated from the counts CSV)",
    )
    p.add_argument("--seed", type=int, default=1)
    _add_model_options(p)


def _submission_settings(a: argparse.Namespace):
    from scgpt_vcc.submission import SubmissionSettings

    return SubmissionSettings(
        model_type=a.model_type,
        max_cells=a.max_cells,
        min_control_cells=a.min_control_cells,
        seed=a.seed,
        target_sum=a.target_sum,
    )


def _add_submission(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submission", help="VCC submission h5ad and .vcc file (cell-eval prep)")
    p.add_argument("--outdir", type=Path, required=True)
    _add_submission_options(p)

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.submission import make_submission

        make_submission(
            a.data,
            a.split,
            a.counts,
            a.gene_names,
            a.outdir,
            _submission_settings(a),
            _predict_settings(a),
            a.model_dir,
        )

    p.set_defaults(handler=run)


def _add_score_submission(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score-submission", help="score a submission against true held-out cells")
    p.add_argument("--submission", type=Path, required=True, help="prediction.h5ad")
    p.add_argument("--truth", type=Path, required=True, help="true cells (raw counts h5ad)")
    p.add_argument("--output", type=Path, required=True, help="score.json to write")
    _add_submission_options(p)

    def run(a: argparse.Namespace) -> None:
        from scgpt_vcc.submission import score_submission

        score_submission(
            a.submission,
            a.truth,
            a.data,
            a.split,
            a.counts,
            a.gene_names,
            a.output,
            _submission_settings(a),
            _predict_settings(a),
            threads=a.threads or 1,
        )

    p.set_defaults(handler=run)


# One entry per subcommand, in workflow order.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_make_synthetic_dataset,
    _add_make_synthetic_checkpoint,
    _add_convert_to_gears,
    _add_compute_de,
    _add_pair_controls,
    _add_download_gears_go,
    _add_go_filter,
    _add_write_cell_graphs,
    _add_build_split,
    _add_data_qc,
    _add_finetune,
    _add_predict,
    _add_heldout_real,
    _add_submission,
    _add_score_submission,
    _add_evaluate,
    _add_summarize,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scgpt-vcc", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.handler(args)
    except InputError as err:
        logging.getLogger("scgpt_vcc").error("%s", err)
        return 2
    except OSError as err:
        if err.errno != errno.ENOSPC and "No space left on device" not in str(err):
            raise
        logging.getLogger("scgpt_vcc").error(
            "disk full while writing %s (%s). Fix: free space or move results/ (and TMPDIR) to "
            "a larger disk, then rerun; the partial file was removed and earlier outputs are "
            "unchanged",
            err.filename or "an output",
            err.strerror or str(err).splitlines()[0],
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
