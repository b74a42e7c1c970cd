"""A random checkpoint in the exact whole-human folder format, for demos, tests and benches.

Reading and writing real checkpoints is :mod:`scgpt_vcc.model.checkpoint`; this module only
imitates the released ``scGPT_human`` folder (its keys, shapes and ``args.json`` fields) so
the workflow and the tests run without the 196 MB download; its ``args.json`` is the
released one (:func:`~scgpt_vcc.model.checkpoint.scgpt_human_args`) with the model size
changed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from scgpt_vcc.io import write_json_atomic
from scgpt_vcc.model.checkpoint import (
    ARGS_FILE,
    DEFAULT_LOAD_PREFIXES,
    MODEL_FILE,
    VOCAB_FILE,
    has_prefix,
    save_state_dict,
    scgpt_human_args,
)
from scgpt_vcc.model.transformer import ExprDecoder, TransformerGenerator
from scgpt_vcc.model.vocab import PAD_TOKEN, SPECIAL_TOKENS

log = logging.getLogger(__name__)


def _pretraining_state_dict(
    ntoken: int, pad_id: int, embsize: int, nheads: int, d_hid: int, nlayers: int
) -> dict[str, Tensor]:
    """Random tensors with the keys and shapes of the whole-human ``best_model.pt``."""
    core = TransformerGenerator(
        ntoken, embsize, nheads, d_hid, nlayers, pad_token_id=pad_id, dropout=0.0
    )
    plain_decoder = ExprDecoder(embsize)
    flag_encoder = nn.Embedding(2, embsize)
    gene2query = nn.Linear(embsize, embsize)
    mvc_w = nn.Linear(embsize, embsize, bias=False)

    state: dict[str, Tensor] = {}
    for key, value in core.state_dict().items():
        if has_prefix(key, DEFAULT_LOAD_PREFIXES):
            state[key.replace(".self_attn.in_proj_", ".self_attn.Wqkv.")] = value
    # Pretraining-only heads, in the order the pretraining model registers them.
    ordered: dict[str, Tensor] = {}
    for key in list(state):
        if key.startswith("value_encoder.") and "flag_encoder.weight" not in ordered:
            ordered["flag_encoder.weight"] = flag_encoder.weight.data
        ordered[key] = state[key]
    ordered.update({f"decoder.{k}": v for k, v in plain_decoder.state_dict().items()})
    ordered["mvc_decoder.gene2query.weight"] = gene2query.weight.data
    ordered["mvc_decoder.gene2query.bias"] = gene2query.bias.data
    ordered["mvc_decoder.W.weight"] = mvc_w.weight.data

    # Default init leaves LayerNorms at (1, 0) and attention biases at 0; a trained model
    # has neither, and parity tests must be able to tell norm1 from norm2, so jitter them.
    for key, value in ordered.items():
        if key.endswith("bias"):
            value.add_(0.05 * torch.randn_like(value))
        if (".norm" in key or "enc_norm" in key) and key.endswith("weight"):
            value.add_(0.1 * torch.randn_like(value))
    return {k: v.detach().clone().contiguous() for k, v in ordered.items()}


def write_random_checkpoint(
    out_dir: str | Path,
    gene_names: Sequence[str],
    *,
    vocab_fraction: float = 0.95,
    embsize: int = 64,
    nlayers: int = 2,
    nheads: int = 4,
    d_hid: int = 64,
    seed: int = 0,
    extra_vocab_genes: int = 200,
) -> None:
    """Write a small random checkpoint in the exact whole-human folder format.

    For tests and dry runs without the 196 MB download. ``vocab.json`` holds a
    ``vocab_fraction`` share of ``gene_names`` plus ``extra_vocab_genes`` gene-like names
    absent from the data (``LOC...`` symbols), shuffled, then ``<pad>``, ``<cls>``, ``<eoc>``
    as the last ids. ``args.json`` has every key of the released scGPT_human file with the
    given model size. ``best_model.pt`` has the released file's keys (flash-attn ``Wqkv``
    names and the pretraining-only heads) with random values. Same seed, same files.
    """
    if not 0.0 <= vocab_fraction <= 1.0:
        raise ValueError(f"vocab_fraction={vocab_fraction} is not within [0, 1]")
    if extra_vocab_genes < 0:
        raise ValueError(f"extra_vocab_genes={extra_vocab_genes} is negative")
    genes = list(dict.fromkeys(str(g) for g in gene_names))
    clash = sorted(set(genes) & set(SPECIAL_TOKENS))
    if clash:
        raise ValueError(f"gene names collide with special tokens: {clash}")
    rng = np.random.default_rng(seed)

    n_keep = int(round(vocab_fraction * len(genes)))
    kept = [genes[i] for i in rng.choice(len(genes), size=n_keep, replace=False)]
    present = set(genes)
    extras: list[str] = []
    number = 100_000_000 + int(rng.integers(0, 900_000_000))
    while len(extras) < extra_vocab_genes:
        name = f"LOC{number}"
        number += int(rng.integers(1, 5000))
        if name not in present:
            extras.append(name)
    vocab_genes = kept + extras
    vocab_genes = [vocab_genes[i] for i in rng.permutation(len(vocab_genes))]
    vocab = {g: i for i, g in enumerate([*vocab_genes, *SPECIAL_TOKENS])}

    args = scgpt_human_args()
    args.update(embsize=embsize, nheads=nheads, d_hid=d_hid, nlayers=nlayers)
    args["save_dir"] = f"random-init (scgpt_vcc write_random_checkpoint, seed {seed})"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = _pretraining_state_dict(
            len(vocab), vocab[PAD_TOKEN], embsize, nheads, d_hid, nlayers
        )
    out = Path(out_dir)
    save_state_dict(state, out / MODEL_FILE)
    write_json_atomic(out / VOCAB_FILE, vocab, sort_keys=False)
    write_json_atomic(out / ARGS_FILE, args, sort_keys=False)
    log.info(
        "wrote random checkpoint %s: %d vocab entries (%d of %d data genes), %d tensors",
        out,
        len(vocab),
        n_keep,
        len(genes),
        len(state),
    )
