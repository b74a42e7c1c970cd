"""Entry points: predict a split's held-out perturbations with one model type, or write the truth.

``scgpt-vcc predict --model-type M`` writes ``{M}.h5ad``; ``scgpt-vcc heldout-real`` writes
``real.h5ad``; both follow the contract in :mod:`scgpt_vcc.predict.cells`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from scgpt_vcc.data.gears import read_split
from scgpt_vcc.data.pairing import read_pairing
from scgpt_vcc.errors import InputError
from scgpt_vcc.model.device import pick_device
from scgpt_vcc.model.renames import read_renames
from scgpt_vcc.predict import MODEL_TYPES, SCGPT_MODEL_TYPES
from scgpt_vcc.predict.baselines import fit_baseline, training_perturbations
from scgpt_vcc.predict.cells import (
    PREDICTION_UNS,
    REAL_MODEL_TYPE,
    ExpressionData,
    Group,
    context_views,
    heldout_groups,
    sample_controls,
    write_cells,
)
from scgpt_vcc.predict.population import (
    CellModel,
    ContextModel,
    ControlReference,
    control_reference,
)
from scgpt_vcc.predict.scgpt import DEFAULT_CHUNK_SIZE, load_predictor

log = logging.getLogger(__name__)


# Cells per model call on a CPU: 1.6x the scGPT cells/s of 1,024 there (docs/benchmarks.md).
CPU_BATCH_SIZE = 64


@dataclass(frozen=True)
class PredictSettings:
    """Settings shared by every model type (config section ``predict``).

    ``batch_size``: cells per model call, or None to decide by device (:meth:`for_model`);
    ``gpu_batch_size``: the GPU class's. No prediction depends on either.
    """

    seed: int = 1
    n_cells: int | None = None
    n_control_cells: int | None = None
    n_reference_cells: int | None = 2048
    batch_size: int | None = None
    gpu_batch_size: int = 1024
    chunk_size: int = DEFAULT_CHUNK_SIZE
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    linear_pca_dim: int = 10
    linear_ridge: float = 0.1
    # vocab_match.json of match-vocabulary: data genes under renamed symbols (scGPT models
    # and linear_scgpt; the same file as their training's).
    gene_renames: str | None = None

    def for_model(self, model_type: str) -> PredictSettings:
        """These settings with ``batch_size`` decided: as set, else ``gpu_batch_size`` for an
        scGPT model on a GPU and ``CPU_BATCH_SIZE`` otherwise."""
        if self.batch_size is not None:
            return self
        on_gpu = model_type in SCGPT_MODEL_TYPES and pick_device(self.device).type == "cuda"
        return replace(self, batch_size=self.gpu_batch_size if on_gpu else CPU_BATCH_SIZE)


def build_model(
    model_type: str,
    data: ExpressionData,
    train_conditions: list[str],
    settings: PredictSettings,
    model_dir: str | Path | None = None,
) -> CellModel:
    """The model of ``model_type``, fitted on ``train_conditions`` if it is a baseline.

    ``model_dir``: the trained folder for scGPT models, the pretrained checkpoint for
    ``linear_scgpt`` (its gene embeddings).
    """
    if model_type not in MODEL_TYPES:
        raise InputError(
            "config", "predict.model_types", f"{model_type!r} is unknown", f"use {MODEL_TYPES}"
        )
    needs_folder = model_type in (*SCGPT_MODEL_TYPES, "linear_scgpt")
    if needs_folder and model_dir is None:
        raise InputError("cli", "--model-dir", f"is required for {model_type}", "give the folder")
    if model_type in SCGPT_MODEL_TYPES:
        return load_predictor(
            model_dir,
            data.genes,
            chunk_size=settings.chunk_size,
            seed=settings.seed,
            device=settings.device,
            precision=settings.precision,
            renames=read_renames(settings.gene_renames),
            compile=settings.compile,
        )
    if model_type != "control" and not training_perturbations(train_conditions):
        raise InputError(data.path, "split 'train'", "has no perturbation", "check the split")
    return fit_baseline(
        model_type,
        data,
        train_conditions,
        pca_dim=settings.linear_pca_dim,
        ridge=settings.linear_ridge,
        checkpoint_dir=model_dir,
        renames=read_renames(settings.gene_renames),
    )


def reference_for(data: ExpressionData, settings: PredictSettings) -> ControlReference:
    """The seed's reference controls: the same for every model type and perturbation
    (``settings`` with its ``batch_size`` decided, :meth:`PredictSettings.for_model`)."""
    return control_reference(
        data, settings.n_reference_cells, settings.seed, batch_size=settings.batch_size
    )


def context_models(
    model_type: str,
    data: ExpressionData,
    train_conditions: list[str],
    settings: PredictSettings,
    model_dir: str | Path | None = None,
) -> dict[str | None, ContextModel]:
    """The model of each context with that context's reference controls.

    A baseline is fitted on each context's own training cells (the training perturbations
    it measured); an scGPT model is loaded once: its context comes from its input cells.
    """
    shared = None
    if model_type in SCGPT_MODEL_TYPES:
        shared = build_model(model_type, data, train_conditions, settings, model_dir)
    models = {}
    for context, view in context_views(data):
        model = shared
        if model is None:
            measured = set(view.condition)
            train = [c for c in train_conditions if context is None or c in measured]
            model = build_model(model_type, view, train, settings, model_dir)
        models[context] = ContextModel(model, reference_for(view, settings))
    return models


def _plan(
    data: ExpressionData, split_path: Path, pairing_path: Path, settings: PredictSettings
) -> tuple[dict[str, list[str]], np.ndarray, list[Group]]:
    split = read_split(split_path)
    if not split["test"]:
        log.warning("%s has no test conditions: the files hold control cells only", split_path)
    pairing = read_pairing(pairing_path, len(data.condition))
    controls = sample_controls(data, settings.n_control_cells, settings.seed)
    groups = heldout_groups(data, split["test"], pairing, settings.n_cells, settings.seed)
    return split, controls, groups


def _uns(model_type: str, split_path: Path, settings: PredictSettings) -> dict:
    info = {k: v for k, v in asdict(settings).items() if v is not None}
    return {PREDICTION_UNS: {"model_type": model_type, "split": str(split_path), **info}}


def predict_heldout(
    model_type: str,
    data_path: str | Path,
    split_path: str | Path,
    pairing_path: str | Path,
    output: str | Path,
    settings: PredictSettings,
    model_dir: str | Path | None = None,
) -> None:
    """Write ``{model_type}.h5ad``: controls plus predicted cells of each test condition (in
    each context)."""
    data = ExpressionData(data_path)
    settings = settings.for_model(model_type)
    split, controls, groups = _plan(data, Path(split_path), Path(pairing_path), settings)
    models = context_models(model_type, data, split["train"], settings, model_dir)
    log.info(
        "%s: %d held-out perturbations, %d control cells", model_type, len(groups), controls.size
    )
    write_cells(
        output,
        data,
        controls,
        groups,
        models,
        batch_size=settings.batch_size,
        uns=_uns(model_type, Path(split_path), settings),
    )


def write_real(
    data_path: str | Path,
    split_path: str | Path,
    pairing_path: str | Path,
    output: str | Path,
    settings: PredictSettings,
) -> None:
    """Write ``real.h5ad``: the same control cells plus every real held-out cell."""
    data = ExpressionData(data_path)
    _, controls, groups = _plan(data, Path(split_path), Path(pairing_path), settings)
    write_cells(
        output,
        data,
        controls,
        groups,
        None,
        batch_size=max(settings.for_model(REAL_MODEL_TYPE).batch_size, 1024),
        uns=_uns(REAL_MODEL_TYPE, Path(split_path), settings),
    )
