"""Prediction of held-out perturbations: scGPT (finetuned, from scratch) and baselines."""

# scGPT models trained by the workflow: the pretrained checkpoint finetuned, and the same
# finetuning from random initialisation (the scGPT paper's ablation of pretraining).
SCGPT_MODEL_TYPES: tuple[str, ...] = ("scgpt_finetuned", "scgpt_scratch")
MODEL_TYPES: tuple[str, ...] = (
    *SCGPT_MODEL_TYPES,
    "control",
    "train_mean",
    "linear",
    "linear_scgpt",
)

__all__ = ["MODEL_TYPES", "SCGPT_MODEL_TYPES"]
