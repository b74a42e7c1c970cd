"""scGPT inference over every gene of the data, in gene chunks that always hold the target.

How the model covers all genes (18,080 for VCC, not only the 1,536 of a training step)
--------------------------------------------------------------------------------------
scGPT's perturbation model has no positional encoding and predicts each input position
from the whole input set, so a cell's genes can be split into groups and each group run
as its own sequence. For every batch of cells:

1. The in-vocabulary genes (17,840 for VCC) other than the perturbed gene(s) are put in a
   random order (seeded) and cut into ``n = ceil((L - T) / (chunk_size - T))`` groups of
   nearly equal size (L input genes, T targets).
2. Each group plus the target gene(s), with the perturbation flag on the targets, is one
   model input of at most ``chunk_size`` genes (default 1,536: the training sequence
   length, so inference sees the same context size as training, unlike the tutorial's
   full-length inference); the input values are the control cell's log1p expression.
3. Every non-target gene is predicted once, by its group; the target gene, present in
   every group, gets the mean of its ``n`` predictions.

Attention memory per batch is ``B x heads x chunk_size^2`` instead of
``B x heads x L^2`` (~135x less at VCC size), and time grows linearly with L instead of
quadratically. Setting ``chunk_size`` to the number of genes or more gives full-length
inference in one group, as upstream ``pred_perturb`` does.

Genes outside the vocabulary are not model input; they and every gene of a perturbation
whose target is outside the vocabulary keep the control cell's value (policy in
:mod:`scgpt_vcc.model.vocab`), and the latter are logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from scgpt_vcc.model import TransformerGenerator, load_model, match_genes
from scgpt_vcc.model.checkpoint import (
    ARGS_FILE,
    DEFAULT_LOAD_PREFIXES,
    VOCAB_FILE,
    read_args,
    read_vocab,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1536


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def gene_chunks(
    n_inputs: int, targets: np.ndarray, chunk_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Groups of input indices covering ``range(n_inputs)``, each holding every target."""
    targets = np.unique(targets)
    room = chunk_size - targets.size
    if room < 1:
        raise ValueError(f"chunk_size {chunk_size} leaves no room beside {targets.size} targets")
    mask = np.ones(n_inputs, dtype=bool)
    mask[targets] = False
    others = rng.permutation(np.flatnonzero(mask))
    n_chunks = max(1, -(-others.size // room))
    return [np.sort(np.concatenate([part, targets])) for part in np.array_split(others, n_chunks)]


class ScGPTPredictor:
    """Predict perturbed cells from control cells with a TransformerGenerator.

    Called as ``predictor(control [n, G], targets) -> [n, G]`` on the data's gene order.
    """

    def __init__(
        self,
        model: TransformerGenerator,
        vocab: dict[str, int],
        genes: Sequence[str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        seed: int = 0,
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.match = match_genes(list(genes), vocab)
        self.input_columns = self.match.input_positions
        self.input_ids = torch.as_tensor(self.match.input_ids, dtype=torch.long)
        self.input_index = {str(genes[c]): i for i, c in enumerate(self.input_columns)}
        self.chunk_size = chunk_size
        self.seed = seed
        self._calls = 0
        self._reported: set[tuple[str, ...]] = set()

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 (fp16 before Ampere) autocast on GPU, as in training; fp32 on CPU."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _target_inputs(self, targets: Sequence[str]) -> np.ndarray:
        found = [self.input_index[t] for t in targets if t in self.input_index]
        key = tuple(targets)
        if len(found) < len(targets) and key not in self._reported:
            self._reported.add(key)
            outside = [t for t in targets if t not in self.input_index]
            action = (
                "all genes of these cells keep the control values"
                if not found
                else "only the other targets are flagged"
            )
            log.warning("target(s) %s outside the vocabulary or not measured: %s", outside, action)
        return np.asarray(found, dtype=np.int64)

    @torch.inference_mode()
    def __call__(self, control: np.ndarray, targets: Sequence[str]) -> np.ndarray:
        result = np.array(control, dtype=np.float32, copy=True)
        target_inputs = self._target_inputs(targets)
        if len(targets) and target_inputs.size == 0:
            return result
        rng = np.random.default_rng([self.seed, self._calls])
        self._calls += 1
        values_all = torch.from_numpy(result[:, self.input_columns])
        predicted = np.empty_like(values_all.numpy())
        target_sum = np.zeros((result.shape[0], target_inputs.size), dtype=np.float64)
        chunks = gene_chunks(len(self.input_columns), target_inputs, self.chunk_size, rng)
        for chunk in chunks:
            index = torch.from_numpy(chunk)
            n = result.shape[0]
            ids = self.input_ids[index].expand(n, -1).to(self.device)
            values = values_all[:, index].to(self.device)
            flags = torch.from_numpy(np.isin(chunk, target_inputs)).long().expand(n, -1)
            with self._autocast():
                out = self.model(ids, values, flags.to(self.device))
            out = out.float().cpu().numpy()
            predicted[:, chunk] = out
            if target_inputs.size:
                target_sum += out[:, np.searchsorted(chunk, target_inputs)]
        if target_inputs.size:
            predicted[:, target_inputs] = target_sum / len(chunks)
        result[:, self.input_columns] = predicted
        return result


def load_predictor(
    model_dir: str | Path,
    genes: Sequence[str],
    *,
    finetuned: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    seed: int = 0,
    device: str = "auto",
) -> ScGPTPredictor:
    """Predictor from a finetuned folder (all parameters) or the pretrained one.

    The pretrained folder holds no perturbation embedding or affine decoder: like the
    tutorial, only the encoder, value encoder and transformer are loaded and the rest is
    freshly initialised (seeded), which is what "no finetuning" means here.
    """
    folder = Path(model_dir)
    torch.manual_seed(seed)
    prefixes = None if finetuned else DEFAULT_LOAD_PREFIXES
    model = load_model(folder, load_prefixes=prefixes, device=pick_device(device))
    vocab = read_vocab(folder / VOCAB_FILE, read_args(folder / ARGS_FILE)["pad_token"])
    log.info(
        "scGPT inference on %s, gene chunks of %d",
        model.encoder.embedding.weight.device,
        chunk_size,
    )
    return ScGPTPredictor(model, vocab, genes, chunk_size=chunk_size, seed=seed)
