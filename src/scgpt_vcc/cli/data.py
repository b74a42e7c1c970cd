"""Subcommands of the data stages: demo inputs, conversion and GEARS processing."""

from __future__ import annotations

import argparse
from pathlib import Path

from scgpt_vcc.cli.options import add_options, call, command


@command(
    "make-synthetic-dataset",
    "generate a VCC-shaped raw-count dataset with planted perturbation effects",
)
def declare_make_synthetic_dataset(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.data.synthetic import SyntheticSpec, write_synthetic_dataset

    p.add_argument("--gene-list", type=Path, required=True, help="VCC gene_names.csv (no header)")
    p.add_argument("--out-adata", dest="adata_path", type=Path, required=True)
    p.add_argument("--out-validation-counts", dest="validation_counts_path", type=Path,
                   required=True)  # fmt: skip
    p.add_argument("--out-gene-names", dest="gene_names_path", type=Path, required=True)
    p.add_argument("--out-validation-truth", dest="validation_truth_path", type=Path)
    add_options(p, SyntheticSpec, helps={"median_umi": "default: the real depth scaled to n_genes"})
    p.set_defaults(handler=lambda a: call(write_synthetic_dataset, a, spec=call(SyntheticSpec, a)))


@command(
    "make-synthetic-checkpoint", "write a small random scGPT checkpoint in the whole-human format"
)
def declare_make_synthetic_checkpoint(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.data.genes import read_gene_list
    from scgpt_vcc.model.random_checkpoint import write_random_checkpoint

    p.add_argument("--gene-names", type=Path, required=True, help="genes to cover (no header)")
    p.add_argument("--outdir", dest="out_dir", type=Path, required=True)
    add_options(p, write_random_checkpoint)
    p.set_defaults(
        handler=lambda a: call(write_random_checkpoint, a, gene_names=read_gene_list(a.gene_names))
    )


@command("convert-to-gears", "VCC raw counts -> GEARS-format AnnData")
def declare_convert_to_gears(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.data.convert import convert_to_gears

    p.add_argument("input_path", type=Path, help="VCC-format h5ad with raw counts")
    p.add_argument("output_path", type=Path, help="converted h5ad to write")
    add_options(
        p,
        convert_to_gears,
        helps={
            "target_sum": "per-cell total before log1p; none: the median total count",
            "chunk_size": "cells read at a time",
            "drop_missing_labels": "drop cells without a perturbation label instead of stopping",
        },
    )
    p.set_defaults(handler=lambda a: call(convert_to_gears, a))


@command("compute-de", "GEARS DE genes in one streaming pass")
def declare_compute_de(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.data.de import compute_de

    p.add_argument("converted", type=Path, help="converted.h5ad")
    p.add_argument("output", type=Path, help="perturb_processed.h5ad to write")
    p.add_argument("--stats", dest="stats_path", type=Path, required=True,
                   help="per-condition statistics (.npz)")  # fmt: skip
    add_options(p, compute_de, helps={"chunk_size": "cells read at a time"})
    p.set_defaults(handler=lambda a: call(compute_de, a))


@command("pair-controls", "draw GEARS's control cell for every cell")
def declare_pair_controls(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.data.pairing import write_pairing

    p.add_argument("processed", type=Path, help="perturb_processed.h5ad")
    p.add_argument("output", type=Path, help="pairing_seed{N}.npz to write")
    p.add_argument("--seed", type=int, required=True)
    p.set_defaults(handler=lambda a: call(write_pairing, a))


@command("download-gears-go", "fetch GEARS's gene2go and essential-gene files")
def declare_download_gears_go(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.data.go import download_gears_files

    p.add_argument("outdir", type=Path)
    add_options(p, download_gears_files, helps={"timeout": "seconds per download"})
    p.set_defaults(handler=lambda a: call(download_gears_files, a))


@command("go-filter", "GEARS's perturbation-gene list and GO filter report")
def declare_go_filter(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.data.go import go_filter_report

    p.add_argument("processed", type=Path, help="perturb_processed.h5ad")
    p.add_argument("output", type=Path, help="go_filter.json to write")
    p.add_argument("--gears-dir", type=Path, default=None, help="folder with gene2go_all.pkl")
    p.set_defaults(handler=lambda a: call(go_filter_report, a))


@command("write-cell-graphs", "stream GEARS's data_pyg/cell_graphs.pkl")
def declare_write_cell_graphs(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.data.go import read_go_filter
    from scgpt_vcc.data.graphs import write_cell_graphs

    p.add_argument("processed", type=Path, help="perturb_processed.h5ad")
    p.add_argument("output", type=Path, help="cell_graphs.pkl to write")
    p.add_argument("--pairing", type=Path, required=True)
    p.add_argument("--go-filter", type=Path, required=True, help="go_filter.json")
    add_options(p, write_cell_graphs, helps={"batch_size": "cells per pickled batch"})
    p.set_defaults(
        handler=lambda a: call(
            write_cell_graphs, a, pert_names=read_go_filter(a.go_filter)["pert_names"]
        )
    )


@command("build-split", "GEARS split pickles made by GEARS's splitter")
def declare_build_split(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.data.splits import build_split

    p.add_argument("processed", type=Path, help="perturb_processed.h5ad")
    p.add_argument("outdir", type=Path, help="splits folder")
    p.add_argument("--go-filter", type=Path, required=True, help="go_filter.json")
    p.add_argument("--name", required=True, help="dataset name (GEARS's file prefix)")
    p.add_argument("--split", required=True, help="simulation, simulation_single, custom, ...")
    p.add_argument("--seed", type=int, required=True)
    # test_perts/val_perts extend: the workflow passes one flag per condition.
    add_options(
        p,
        build_split,
        helps={
            "test_perts": "custom split: held-out test conditions",
            "val_perts": "custom split: validation conditions",
            "min_cells": "leave out perturbations with fewer cells",
        },
    )
    p.set_defaults(handler=lambda a: call(build_split, a))


@command("data-qc", "data report: cells, knockdown, vocabulary match")
def declare_data_qc(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.data.qc import write_qc

    p.add_argument("stats_path", type=Path, help="condition_stats.npz from compute-de")
    p.add_argument("outdir", type=Path, help="qc folder")
    p.add_argument("--vocab", dest="vocab_path", type=Path, required=True,
                   help="pretrained vocab.json")  # fmt: skip
    add_options(p, write_qc, helps={"min_cells": "flag perturbations with fewer cells"})
    p.set_defaults(handler=lambda a: call(write_qc, a))
