"""Command line interface: one subcommand per workflow step.

Every Snakemake rule calls one of these subcommands, so each step also runs on its own:
``scgpt-vcc <command> --help`` lists its options. Each ``_add_*`` function below
declares one subcommand and binds it to the package function that does the work.
"""

from __future__ import annotations

import argparse
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
        from scgpt_vcc.model.checkpoint import write_random_checkpoint

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
        )

    p.set_defaults(handler=run)


# One entry per subcommand, in workflow order.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_make_synthetic_dataset,
    _add_make_synthetic_checkpoint,
    _add_convert_to_gears,
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
