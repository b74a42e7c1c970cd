"""Finetuning of scGPT's perturbation model: lazy batches, training loop, multi-process set-up."""
