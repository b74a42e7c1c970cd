"""Prediction of held-out perturbations: scGPT (finetuned, pretrained) and baselines."""

MODEL_TYPES: tuple[str, ...] = (
    "scgpt_finetuned",
    "scgpt_pretrained",
    "control",
    "train_mean",
    "linear",
)

__all__ = ["MODEL_TYPES"]
