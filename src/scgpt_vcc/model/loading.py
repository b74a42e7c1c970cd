"""Build a perturbation model from a checkpoint folder: pretrained (finetuning's start) or
finetuned (prediction's input).

:func:`load_pretrained` follows the perturbation tutorial: build a ``TransformerGenerator``
of the size in ``args.json``, rename ``Wqkv.`` to ``in_proj_``, copy only parameters under
``load_prefixes`` (by default the gene encoder, value encoder and transformer) and leave
the rest (perturbation embedding, affine decoder, cls head) at their fresh initialisation.
:func:`load_finetuned` reads a trained folder (:func:`save_checkpoint`'s) whole. The two
cannot be swapped silently: a finetuned folder given to ``load_pretrained`` and a
pretrained one given to ``load_finetuned`` are both refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scgpt_vcc.errors import InputError
from scgpt_vcc.model.checkpoint import (
    ARGS_FILE,
    DEFAULT_LOAD_PREFIXES,
    MODEL_FILE,
    VOCAB_FILE,
    check_folder,
    has_prefix,
    read_args,
    read_state_dict,
    read_vocab,
    shape_text,
    to_torch_names,
)
from scgpt_vcc.model.transformer import TransformerGenerator

log = logging.getLogger(__name__)

__all__ = ["FINETUNED_MARKER", "load_finetuned", "load_pretrained"]

# Only a perturbation model has it: the pretrained whole-human checkpoint does not.
FINETUNED_MARKER = "pert_encoder.weight"


def load_pretrained(
    checkpoint_dir: str | Path,
    *,
    load_prefixes: Sequence[str] = DEFAULT_LOAD_PREFIXES,
    device: str | torch.device = "cpu",
    dropout: float = 0.0,
    pert_pad_id: int = 0,
) -> TransformerGenerator:
    """A perturbation model started from a pretrained scGPT checkpoint (what finetuning does).

    Args:
        checkpoint_dir: the pretrained folder (``args.json``, ``vocab.json``,
            ``best_model.pt``), e.g. the whole-human model.
        load_prefixes: module prefixes copied from the checkpoint (the tutorial's: encoder,
            value_encoder, transformer_encoder); every other parameter, the perturbation
            encoder and the decoder among them, starts from its fresh initialisation. Empty:
            nothing is loaded (training from scratch).
        device: where the model is placed.
        dropout: finetuning dropout. ``args.json``'s ``dropout`` is the pretraining value and
            is ignored, as in the tutorial (which finetunes with 0).
        pert_pad_id: perturbation flag with a fixed zero embedding (see the model).

    Raises:
        InputError: incomplete folder, unreadable or malformed files, checkpoint parameters
            that do not fit the model described by ``args.json``/``vocab.json``, or a
            finetuned folder (its decoder would be silently re-initialised: use
            :func:`load_finetuned`).
    """
    folder, args, vocab, state = _read_folder(checkpoint_dir)
    if FINETUNED_MARKER in state:
        raise InputError(
            folder / MODEL_FILE,
            FINETUNED_MARKER,
            "belongs to a finetuned perturbation model, not a pretrained checkpoint; loading "
            "only its encoder would re-initialise its decoder",
            "load a trained folder with load_finetuned (every parameter), or give the "
            "pretrained scGPT folder",
        )
    return _build(folder, args, vocab, state, tuple(load_prefixes), device, dropout, pert_pad_id)


def load_finetuned(
    model_dir: str | Path, *, device: str | torch.device = "cpu", pert_pad_id: int = 0
) -> TransformerGenerator:
    """A trained perturbation model (``finetune``'s output folder), every parameter loaded.

    Raises:
        InputError: as :func:`load_pretrained`, and when ``best_model.pt`` does not cover the
            whole model (e.g. a pretrained checkpoint: use :func:`load_pretrained`).
    """
    folder, args, vocab, state = _read_folder(model_dir)
    return _build(folder, args, vocab, state, None, device, 0.0, pert_pad_id)


def _read_folder(
    checkpoint_dir: str | Path,
) -> tuple[Path, dict[str, Any], dict[str, int], dict[str, Tensor]]:
    folder = Path(checkpoint_dir)
    check_folder(folder)
    args = read_args(folder / ARGS_FILE)
    vocab = read_vocab(folder / VOCAB_FILE, args["pad_token"])
    state = to_torch_names(read_state_dict(folder / MODEL_FILE))
    return folder, args, vocab, state


def _build(
    folder: Path,
    args: dict[str, Any],
    vocab: dict[str, int],
    state: dict[str, Tensor],
    load_prefixes: tuple[str, ...] | None,
    device: str | torch.device,
    dropout: float,
    pert_pad_id: int,
) -> TransformerGenerator:
    """The model of ``args``/``vocab`` with the ``load_prefixes`` part of ``state`` (None: all,
    which must then cover the whole model)."""
    model_path = folder / MODEL_FILE

    model = TransformerGenerator(
        len(vocab),
        args["embsize"],
        args["nheads"],
        args["d_hid"],
        args["nlayers"],
        nlayers_cls=args["n_layers_cls"],
        n_cls=1,
        dropout=dropout,
        pad_token_id=vocab[args["pad_token"]],
        pert_pad_id=pert_pad_id,
    )
    target = model.state_dict()
    prefixes = tuple(load_prefixes or ())

    def selected(key: str) -> bool:
        return load_prefixes is None or has_prefix(key, prefixes)

    loaded: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        if not selected(key):
            skipped.append(key)
            continue
        if key not in target:
            raise InputError(
                model_path,
                key,
                f"(shape {shape_text(value)}) has no counterpart in a TransformerGenerator built "
                f"from args.json (nlayers={args['nlayers']}, embsize={args['embsize']})",
                "use the args.json that belongs to this best_model.pt, or leave this module "
                "out of load_prefixes",
            )
        if value.shape != target[key].shape:
            raise InputError(
                model_path,
                key,
                f"has shape {shape_text(value)} but the model built from args.json and "
                f"vocab.json ({len(vocab)} tokens) needs {shape_text(target[key])}",
                "use the vocab.json and args.json shipped with this best_model.pt (the gene "
                "embedding has one row per vocab.json entry)",
            )
        loaded[key] = value
    if not loaded and (load_prefixes is None or prefixes):
        raise InputError(
            model_path,
            "parameters",
            f"none start with {', '.join(prefixes)} (first keys: {', '.join(list(state)[:3])})",
            "check that this is an scGPT checkpoint; strip a 'module.' prefix if it was "
            "saved from DistributedDataParallel",
        )

    not_covered = [k for k in target if selected(k) and k not in loaded]
    if not_covered:
        raise InputError(
            model_path,
            not_covered[0],
            f"is missing ({len(not_covered)} parameters under the loaded prefixes are absent)",
            "use the args.json that belongs to this best_model.pt (e.g. nlayers), or the "
            "complete checkpoint file",
        )
    model.load_state_dict(loaded, strict=False)
    reinitialised = [k for k in target if k not in loaded]
    for key in loaded:
        log.info("loaded %s %s", key, shape_text(loaded[key]))
    for key in skipped:
        log.info("skipped (not under %s) %s %s", "/".join(prefixes), key, shape_text(state[key]))
    for key in reinitialised:
        log.info("re-initialised (not in checkpoint selection) %s %s", key, shape_text(target[key]))
    log.info(
        "%s: loaded %d tensors (%d parameters), skipped %d checkpoint tensors, "
        "re-initialised %d model tensors",
        model_path,
        len(loaded),
        sum(v.numel() for v in loaded.values()),
        len(skipped),
        len(reinitialised),
    )
    return model.to(device)
