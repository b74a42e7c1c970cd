"""Read and write scGPT checkpoint folders (``args.json``, ``vocab.json``, ``best_model.pt``).

Whole-human checkpoint format (what :func:`load_pretrained` reads and
:func:`scgpt_vcc.model.random_checkpoint.write_random_checkpoint` imitates):

* ``args.json``: the pretraining run's settings; only the model-size fields
  (:data:`MODEL_SIZE_KEYS`) and ``pad_token`` are used, as in the scGPT tutorials.
* ``vocab.json``: ``{gene symbol: id}``; 60,694 genes then ``<pad>``, ``<cls>``, ``<eoc>``
  as the last three ids. The gene embedding has one row per entry.
* ``best_model.pt``: a plain state dict of the pretraining model, saved with flash-attn
  1.x: attention weights are ``...self_attn.Wqkv.weight/bias`` (same [q; k; v] layout as
  torch's ``in_proj_weight/bias``). Besides the encoder it holds pretraining-only heads:
  ``flag_encoder.weight`` (generative-training flag), ``decoder.fc.{0,2,4}`` (plain
  expression decoder) and ``mvc_decoder.{gene2query,W}`` (masked value prediction from
  the cell embedding); it has no ``cls_decoder``. This key set and its size (51.33 M
  parameters, 196 MiB at fp32) agree with the file's reported size and with the
  missing/unexpected keys users report when loading it into scgpt's models (scGPT issues
  #78, #123, #173; RCHENLAB/scGPT_fineTune_protocol#2).

:func:`load_pretrained` follows the perturbation tutorial: build a ``TransformerGenerator``
of the size in ``args.json``, rename ``Wqkv.`` to ``in_proj_``, copy only parameters under
``load_prefixes`` (by default the gene encoder, value encoder and transformer) and leave
the rest (perturbation embedding, affine decoder, cls head) at their fresh initialisation.
:func:`load_finetuned` reads a trained folder (:func:`save_checkpoint`'s) whole. The two
cannot be swapped silently: a finetuned folder given to ``load_pretrained`` and a
pretrained one given to ``load_finetuned`` are both refused.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scgpt_vcc.errors import InputError
from scgpt_vcc.io import atomic_path, write_json_atomic
from scgpt_vcc.model.transformer import TransformerGenerator
from scgpt_vcc.model.vocab import PAD_TOKEN

log = logging.getLogger(__name__)

__all__ = [
    "ARGS_FILE",
    "DEFAULT_LOAD_PREFIXES",
    "MODEL_FILE",
    "MODEL_SIZE_KEYS",
    "SCGPT_HUMAN_ARGS_KEYS",
    "VOCAB_FILE",
    "load_finetuned",
    "load_pretrained",
    "read_args",
    "read_state_dict",
    "read_vocab",
    "save_checkpoint",
]

ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
MODEL_FILE = "best_model.pt"
CHECKPOINT_FILES = (ARGS_FILE, VOCAB_FILE, MODEL_FILE)

DEFAULT_LOAD_PREFIXES: tuple[str, ...] = ("encoder", "value_encoder", "transformer_encoder")

# args.json field -> TransformerGenerator argument.
MODEL_SIZE_KEYS: dict[str, str] = {
    "embsize": "d_model",
    "nheads": "nhead",
    "d_hid": "d_hid",
    "nlayers": "nlayers",
    "n_layers_cls": "nlayers_cls",
}
REQUIRED_ARGS_KEYS: tuple[str, ...] = (*MODEL_SIZE_KEYS, "pad_token")

# Keys of the released scGPT_human/args.json, in file order, with the pretraining values.
# Source: recalled from the released file (scGPT "whole-human" Google Drive folder) and
# cross-checked without network access against public code that reproduces the same
# config dict key for key (a scGPT pretraining-config class: data_source ... gpu) and a
# research log quoting the file's fields (save_dir ...May23-08-36-2023, input_style
# "binned", input_emb_style "continuous", n_bins 51, MVC and USE_GENERATIVE_TRAINING
# true, nlayers 12, nheads 8, embsize 512, d_hid 512). Host-specific values (paths,
# dist_url) are placeholders here; only the key set and the model-size values matter.
SCGPT_HUMAN_ARGS: dict[str, Any] = {
    "data_source": "/scratch/ssd004/datasets/cellxgene/scb_strict/human",
    "save_dir": "/scratch/ssd004/datasets/cellxgene/save/cellxgene_census_human-May23-08-36-2023",
    "load_model": None,
    "n_hvg": None,
    "valid_size_or_ratio": 0.003,
    "dist_backend": "nccl",
    "grad_accu_steps": 1,
    "pad_token": "<pad>",
    "input_style": "binned",
    "input_emb_style": "continuous",
    "n_bins": 51,
    "max_seq_len": 1200,
    "training_tasks": "both",
    "dist_url": "tcp://localhost:53833",
    "mask_ratio": [0.25, 0.5, 0.75],
    "trunc_by_sample": True,
    "vocab_path": (
        "/scratch/ssd004/datasets/cellxgene/scFormer/scformer/tokenizer/default_census_vocab.json"
    ),
    "rank": 0,
    "batch_size": 32,
    "eval_batch_size": 64,
    "epochs": 6,
    "lr": 0.0001,
    "scheduler_interval": 100,
    "scheduler_factor": 0.99,
    "warmup_ratio_or_step": 10000.0,
    "no_cls": True,
    "no_cce": True,
    "fp16": True,
    "fast_transformer": True,
    "nlayers": 12,
    "nheads": 8,
    "embsize": 512,
    "d_hid": 512,
    "dropout": 0.2,
    "n_layers_cls": 3,
    "log_interval": 9000,
    "save_interval": 27000,
    "mask_value": -1,
    "pad_value": -2,
    "USE_CLS": False,
    "USE_CCE": False,
    "MVC": True,
    "USE_GENERATIVE_TRAINING": True,
    "world_size": 16,
    "distributed": True,
    "local_rank": 0,
    "gpu": 0,
}
SCGPT_HUMAN_ARGS_KEYS: tuple[str, ...] = tuple(SCGPT_HUMAN_ARGS)


# --------------------------------------------------------------------------- reading


def _check_folder(checkpoint_dir: Path) -> None:
    if not checkpoint_dir.is_dir():
        raise InputError(
            checkpoint_dir,
            "checkpoint folder",
            "does not exist or is not a folder",
            "download the scGPT whole-human checkpoint (args.json, vocab.json, best_model.pt) "
            "and point the config at its folder",
        )
    missing = [name for name in CHECKPOINT_FILES if not (checkpoint_dir / name).is_file()]
    if missing:
        raise InputError(
            checkpoint_dir / missing[0],
            "file",
            f"is missing (checkpoint folder lacks {', '.join(missing)})",
            "copy the complete checkpoint folder: args.json, vocab.json and best_model.pt",
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(
            path, "file", f"is not valid JSON ({err})", "re-download the checkpoint file"
        ) from err


def read_args(path: str | Path) -> dict[str, Any]:
    """Read ``args.json`` and check the fields needed to build the model."""
    path = Path(path)
    args = _read_json(path)
    if not isinstance(args, dict):
        raise InputError(path, "file", "is not a JSON object", "re-download the checkpoint")
    for key in REQUIRED_ARGS_KEYS:
        if key not in args:
            raise InputError(
                path,
                key,
                "is missing",
                f"add {key!r} from the pretraining run (scGPT_human: "
                f"{SCGPT_HUMAN_ARGS[key]!r}) or re-download args.json",
            )
    for key in MODEL_SIZE_KEYS:
        value = args[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(path, key, f"is {value!r}, not a positive integer", "fix args.json")
    if args["embsize"] % args["nheads"]:
        raise InputError(
            path,
            "embsize",
            f"{args['embsize']} is not divisible by nheads={args['nheads']}",
            "use the args.json that belongs to best_model.pt",
        )
    if not isinstance(args["pad_token"], str):
        raise InputError(path, "pad_token", "is not a string", 'set it to "<pad>"')
    return args


def read_vocab(path: str | Path, pad_token: str = PAD_TOKEN) -> dict[str, int]:
    """Read ``vocab.json``: ids must be 0..n-1, each once, and ``pad_token`` present."""
    path = Path(path)
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in vocab.items()
    ):
        raise InputError(
            path, "file", "is not a {gene: integer id} JSON object", "re-download vocab.json"
        )
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise InputError(
            path,
            "ids",
            f"are not the integers 0..{len(vocab) - 1}, each used once",
            "re-download vocab.json; the gene embedding rows are indexed by these ids",
        )
    if pad_token not in vocab:
        raise InputError(path, pad_token, "is missing", "use the vocab.json of the checkpoint")
    return vocab


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load ``best_model.pt`` as a state dict on the CPU (tensors only, no pickled code)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(
            path,
            "file",
            f"cannot be read as a torch state dict ({type(err).__name__}: {str(err)[:200]})",
            "re-download best_model.pt; a pickled whole model or a truncated file is not "
            "accepted, save model.state_dict() instead",
        ) from err
    if not isinstance(obj, Mapping) or not obj:
        raise InputError(
            path,
            "file",
            f"holds a {type(obj).__name__}, not a non-empty state dict",
            "save model.state_dict() with torch.save",
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise InputError(
            path,
            str(bad[0]),
            "is not a parameter name mapped to a tensor (not a state dict)",
            "if it is a training checkpoint, save its model state_dict() as best_model.pt",
        )
    return dict(obj)


def _to_torch_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename flash-attn 1.x attention keys (``Wqkv.``) to torch's (``in_proj_``)."""
    return {k.replace(".self_attn.Wqkv.", ".self_attn.in_proj_"): v for k, v in state.items()}


def has_prefix(key: str, prefixes: Sequence[str]) -> bool:
    # Whole module-path components only: "encoder" selects "encoder.*", not "value_encoder.*".
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


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
    _check_folder(folder)
    args = read_args(folder / ARGS_FILE)
    vocab = read_vocab(folder / VOCAB_FILE, args["pad_token"])
    state = _to_torch_names(read_state_dict(folder / MODEL_FILE))
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
                f"(shape {_shape(value)}) has no counterpart in a TransformerGenerator built "
                f"from args.json (nlayers={args['nlayers']}, embsize={args['embsize']})",
                "use the args.json that belongs to this best_model.pt, or leave this module "
                "out of load_prefixes",
            )
        if value.shape != target[key].shape:
            raise InputError(
                model_path,
                key,
                f"has shape {_shape(value)} but the model built from args.json and "
                f"vocab.json ({len(vocab)} tokens) needs {_shape(target[key])}",
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
        log.info("loaded %s %s", key, _shape(loaded[key]))
    for key in skipped:
        log.info("skipped (not under %s) %s %s", "/".join(prefixes), key, _shape(state[key]))
    for key in reinitialised:
        log.info("re-initialised (not in checkpoint selection) %s %s", key, _shape(target[key]))
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


# --------------------------------------------------------------------------- writing


def save_state_dict(state: Mapping[str, Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, tmp)


def save_checkpoint(
    model: TransformerGenerator,
    out_dir: str | Path,
    vocab: Mapping[str, int],
    args: Mapping[str, Any],
) -> None:
    """Write ``args.json``, ``vocab.json`` and ``best_model.pt`` for ``model``.

    ``best_model.pt`` holds the model's state dict with torch attention names, so it loads
    into scgpt's ``TransformerGenerator`` with ``strict=True`` and back through
    :func:`load_finetuned`. The model-size fields
    of ``args`` are set from the model; a conflicting value raises ``ValueError``.
    Each file is written atomically; ``best_model.pt`` is written first.
    """
    out = Path(out_dir)
    sizes = {
        "embsize": model.d_model,
        "nheads": model.nhead,
        "d_hid": model.d_hid,
        "nlayers": model.nlayers,
        "n_layers_cls": model.nlayers_cls,
    }
    conflicts = {k: (args[k], v) for k, v in sizes.items() if k in args and args[k] != v}
    if conflicts:
        raise ValueError(f"args disagree with the model (args, model): {conflicts}")
    if len(vocab) != model.ntoken:
        raise ValueError(f"vocab has {len(vocab)} entries, the model {model.ntoken} tokens")
    pad_token = str(args.get("pad_token", PAD_TOKEN))
    if vocab.get(pad_token) != model.pad_token_id:
        raise ValueError(
            f"vocab[{pad_token!r}]={vocab.get(pad_token)} but model.pad_token_id="
            f"{model.pad_token_id}"
        )
    full_args = {**dict(args), **sizes, "pad_token": pad_token}
    save_state_dict(model.state_dict(), out / MODEL_FILE)
    write_json_atomic(out / VOCAB_FILE, dict(vocab), sort_keys=False)
    write_json_atomic(out / ARGS_FILE, full_args, sort_keys=False)
