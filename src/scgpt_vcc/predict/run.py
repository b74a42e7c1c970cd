"""Entry points: predict a split's held-out perturbations with one model type, or write the truth.

``scgpt-vcc predict --model-type M`` writes ``{M}.h5ad``; ``scgpt-vcc heldout-real`` writes
``real.h5ad``; both follow the contract in :mod:`scgpt_vcc.predict.cells`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scgpt_vcc.data.pairing import read_pairing
from scgpt_vcc.errors import InputError
from scgpt_vcc.predict import MODEL_TYPES
from scgpt_vcc.predict.baselines import (
    condition_means,
    control_predictor,
    fit_linear,
    linear_predictor,
    train_mean_predictor,
    train_mean_vector,
    training_perturbations,
)
from scgpt_vcc.predict.cells import (
    ExpressionData,
    Group,
    Predict,
    heldout_groups,
    sample_controls,
    write_cells,
)
from scgpt_vcc.predict.scgpt import DEFAULT_CHUNK_SIZE, load_predictor
from scgpt_vcc.train.batches import CONTROL_CONDITION, read_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictSettings:
    """Settings shared by every model type (config section ``predict``)."""

    seed: int = 1
    n_cells: int | None = None
    n_control_cells: int | None = None
    batch_size: int = 64
    chunk_size: int = DEFAULT_CHUNK_SIZE
    device: str = "auto"
    linear_pca_dim: int = 10
    linear_ridge: float = 0.1


def build_predictor(
    model_type: str,
    data: ExpressionData,
    train_conditions: list[str],
    settings: PredictSettings,
    model_dir: str | Path | None = None,
) -> Predict:
    """The prediction function of ``model_type``, fitted on ``train_conditions`` if needed."""
    if model_type not in MODEL_TYPES:
        raise InputError(
            "config", "predict.model_types", f"{model_type!r} is unknown", f"use {MODEL_TYPES}"
        )
    if model_type == "control":
        return control_predictor()
    if model_type.startswith("scgpt"):
        if model_dir is None:
            raise InputError("cli", "--model-dir", "is required for scGPT", "give the model folder")
        return load_predictor(
            model_dir,
            data.genes,
            finetuned=model_type == "scgpt_finetuned",
            chunk_size=settings.chunk_size,
            seed=settings.seed,
            device=settings.device,
        )
    perturbations = training_perturbations(train_conditions)
    if not perturbations:
        raise InputError(data.path, "split 'train'", "has no perturbation", "check the split")
    means = condition_means(data, [*perturbations, CONTROL_CONDITION])
    if model_type == "train_mean":
        return train_mean_predictor(train_mean_vector(means[:-1]))
    model = fit_linear(
        data.genes,
        means[:-1],
        perturbations,
        means[-1],
        pca_dim=settings.linear_pca_dim,
        ridge=settings.linear_ridge,
    )
    return linear_predictor(model)


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
    return {"scgpt_vcc_prediction": {"model_type": model_type, "split": str(split_path), **info}}


def predict_heldout(
    model_type: str,
    data_path: str | Path,
    split_path: str | Path,
    pairing_path: str | Path,
    output: str | Path,
    settings: PredictSettings,
    model_dir: str | Path | None = None,
) -> None:
    """Write ``{model_type}.h5ad``: controls plus predicted cells of each test condition."""
    data = ExpressionData(data_path)
    split, controls, groups = _plan(data, Path(split_path), Path(pairing_path), settings)
    predict = build_predictor(model_type, data, split["train"], settings, model_dir)
    log.info(
        "%s: %d held-out perturbations, %d control cells", model_type, len(groups), controls.size
    )
    write_cells(
        output,
        data,
        controls,
        groups,
        predict,
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
        batch_size=max(settings.batch_size, 1024),
        uns=_uns("real", Path(split_path), settings),
    )
