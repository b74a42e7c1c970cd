"""Subcommands that score predictions: per model, over seeds, and the VCC submission."""

from __future__ import annotations

import argparse
from pathlib import Path

from scgpt_vcc.cli.options import add_options, call, command

# Help of the EvalSettings options, shared by evaluate and vcc-ceiling.
SETTINGS_HELP = {
    "chunk_size": "cells read at a time",
    "vcc_group_size": "perturbations per DE run",
    "threads": "cell-eval/pdex threads",
    "ceiling_seed": "seed of the split into two halves",
}


@command("evaluate", "GEARS/scGPT metrics and cell-eval's VCC metrics of one model type")
def declare_evaluate(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.evaluate.run import DEFAULT_BASELINE, EvalSettings, evaluate_predictions
    from scgpt_vcc.evaluate.vcc import VCC_METRICS

    p.add_argument("--real", dest="real_path", type=Path, required=True,
                   help="held-out real cells + controls")  # fmt: skip
    p.add_argument("--pred", dest="pred_path", type=Path, required=True,
                   help="predicted cells + controls")  # fmt: skip
    p.add_argument("--processed", dest="processed_path", type=Path, required=True,
                   help="perturb_processed.h5ad")  # fmt: skip
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--model-type", required=True)
    p.add_argument("--baseline-metrics", type=Path, default=None, help="train_mean metrics.json")
    p.add_argument("--ceiling", dest="ceiling_path", type=Path, default=None,
                   help="the real file's ceiling_vcc2025.json (calibrated scores)")  # fmt: skip
    p.add_argument(
        "--baseline",
        type=float,
        nargs=len(VCC_METRICS),
        metavar=tuple(m.upper() for m in VCC_METRICS),
        default=[DEFAULT_BASELINE[k] for k in VCC_METRICS],
        help="challenge-score baseline when --baseline-metrics is not given",
    )
    add_options(
        p,
        EvalSettings,
        exclude=("ceiling_seed",),
        helps=SETTINGS_HELP,
    )
    p.set_defaults(
        handler=lambda a: call(
            evaluate_predictions,
            a,
            settings=call(EvalSettings, a),
            fallback_baseline=dict(zip(VCC_METRICS, a.baseline, strict=True)),
        )
    )


@command("vcc-ceiling", "VCC 2025 ceiling: half of the real cells scored against the other half")
def declare_vcc_ceiling(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.evaluate.ceiling import vcc_ceiling
    from scgpt_vcc.evaluate.run import EvalSettings

    p.add_argument("--real", dest="real_path", type=Path, required=True,
                   help="held-out real cells + controls")  # fmt: skip
    p.add_argument("--output", type=Path, required=True, help="ceiling_vcc2025.json to write")
    add_options(
        p,
        EvalSettings,
        exclude=("de_key", "n_top_de"),
        helps=SETTINGS_HELP,
    )
    p.set_defaults(handler=lambda a: call(vcc_ceiling, a, settings=call(EvalSettings, a)))


@command("vcc2026-reference", "cell-eval2's baseline and replicate of the real counts")
def declare_vcc2026_reference(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.evaluate.vcc2026 import Vcc2026Settings, build_reference

    p.add_argument("--real", dest="real_counts", type=Path, required=True,
                   help="counts/real.h5ad")  # fmt: skip
    p.add_argument("--output", type=Path, required=True, help="reference folder to write")
    add_options(p, Vcc2026Settings, helps={"threads": "cell-eval2 threads"})
    p.set_defaults(handler=lambda a: call(build_reference, a, settings=call(Vcc2026Settings, a)))


@command("evaluate-vcc2026", "cell-eval2's VCC 2026 metrics of one model type's counts")
def declare_evaluate_vcc2026(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.evaluate.vcc2026 import Vcc2026Settings, score_vcc2026

    p.add_argument("--real", dest="real_counts", type=Path, required=True,
                   help="counts/real.h5ad")  # fmt: skip
    p.add_argument("--pred", dest="pred_counts", type=Path, required=True,
                   help="counts/{model_type}.h5ad")  # fmt: skip
    p.add_argument("--reference", type=Path, required=True, help="vcc2026-reference folder")
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--model-type", required=True)
    add_options(p, Vcc2026Settings, helps={"threads": "cell-eval2 threads"})
    p.set_defaults(handler=lambda a: call(score_vcc2026, a, settings=call(Vcc2026Settings, a)))


@command("summarize", "mean ± sd over seeds, wins over train_mean, plots")
def declare_summarize(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.evaluate.run import PROFILES
    from scgpt_vcc.evaluate.summary import summarize

    p.add_argument("--eval-dir", type=Path, required=True, help="results/eval/{dataset}")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--model-types", nargs="+", required=True)
    p.add_argument("--out-md", type=Path, required=True)
    p.add_argument("--out-csv", type=Path, required=True)
    p.add_argument("--plots-dir", type=Path, default=None)
    p.add_argument("--profiles", nargs="+", default=[PROFILES[0]], choices=PROFILES)
    p.set_defaults(handler=lambda a: call(summarize, a))


@command("score-submission", "score a submission against true held-out cells")
def declare_score_submission(p: argparse.ArgumentParser) -> None:
    from scgpt_vcc.evaluate.score import score_submission

    p.add_argument("--submission", type=Path, required=True, help="prediction.h5ad")
    p.add_argument("--baseline", type=Path, required=True,
                   help="train_mean's prediction.h5ad for the same list")  # fmt: skip
    p.add_argument("--truth", type=Path, required=True,
                   help="true cells, converted by convert-to-gears")  # fmt: skip
    p.add_argument("--output", type=Path, required=True, help="score.json to write")
    p.add_argument("--control-label", required=True, help="the control value of target_gene")
    add_options(p, score_submission, helps={"threads": "cell-eval/pdex threads"})
    p.set_defaults(handler=lambda a: call(score_submission, a))
