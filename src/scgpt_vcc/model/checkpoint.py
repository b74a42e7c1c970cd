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

Building a model from a folder: :mod:`scgpt_vcc.model.loading`.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scgpt_vcc.errors import InputError
from scgpt_vcc.io import atomic_path, read_json, write_json_atomic
from scgpt_vcc.model.transformer import TransformerGenerator
from scgpt_vcc.model.vocab import PAD_TOKEN

log = logging.getLogger(__name__)

__all__ = [
    "ARGS_FILE",
    "DEFAULT_LOAD_PREFIXES",
    "MODEL_FILE",
    "MODEL_SIZE_KEYS",
    "VOCAB_FILE",
    "read_args",
    "read_state_dict",
    "read_vocab",
    "scgpt_human_args",
    "save_checkpoint",
]

ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
MODEL_FILE = "best_model.pt"
CHECKPOINT_FILES = (ARGS_FILE, VOCAB_FILE, MODEL_FILE)

# The modules the scGPT perturbation tutorial copies from the pretrained checkpoint.
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


def scgpt_human_args() -> dict[str, Any]:
    """The released whole-human ``args.json`` (scGPT repository, MIT licence), in order.

    Shipped as ``scgpt_human_args.json`` beside this module: the template of the random
    checkpoints and the source of the values error messages suggest.
    """
    return json.loads(resources.files(__package__).joinpath("scgpt_human_args.json").read_text())


# --------------------------------------------------------------------------- reading


def check_folder(checkpoint_dir: Path) -> None:
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
    return read_json(path, "re-download the checkpoint file")


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
                f"{scgpt_human_args()[key]!r}) or re-download args.json",
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


def to_torch_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename flash-attn 1.x attention keys (``Wqkv.``) to torch's (``in_proj_``)."""
    return {k.replace(".self_attn.Wqkv.", ".self_attn.in_proj_"): v for k, v in state.items()}


def has_prefix(key: str, prefixes: Sequence[str]) -> bool:
    # Whole module-path components only: "encoder" selects "encoder.*", not "value_encoder.*".
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def shape_text(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


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
