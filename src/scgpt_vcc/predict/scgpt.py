"""scGPT inference over every gene of the data, in gene chunks that always hold the target.

How the model covers all genes (18,080 for VCC, not only the 1,536 of a training step)
--------------------------------------------------------------------------------------
scGPT's perturbation model has no positional encoding and predicts each input position
from the whole input set, so a cell's genes can be split into groups and each group run
as its own sequence. For every batch of cells:

1. The in-vocabulary genes (17,840 for VCC) other than the perturbed gene(s) are put in a
   random order and cut into ``n = ceil((L - T) / (chunk_size - T))`` groups of nearly
   equal size (L input genes, T targets).
2. Each group plus the target gene(s), with the perturbation flag on the targets, is one
   model input of at most ``chunk_size`` genes (default 1,536: the training sequence
   length, so inference sees the same context size as training, unlike the tutorial's
   full-length inference); the input values are the control cell's log1p expression.
3. Every non-target gene is predicted once, by its group; the target gene, present in
   every group, gets the mean of its ``n`` predictions.

The random order is drawn per block of ``PARTITION_BLOCK`` cells: the j-th cell the
predictor is given with a set of targets belongs to block ``j // PARTITION_BLOCK``, whose
order is seeded by (seed, targets, block). So a cell's prediction does not depend on how
many cells go into one model call (``predict.batch_size``, a memory and speed setting) nor
on which other perturbations are predicted, and the population mean averages over
``n_reference_cells / PARTITION_BLOCK`` partitions (32 by default). A partition per cell
would cost 0.2-0.6 s of CPU per 1,024 cells, 4-10% of the model's time on an H200; one per
64 cells costs 0.003 s (docs/benchmarks.md).

A model call keeps its cells on the model's device: the inputs are copied there once, each
chunk is gathered and its output scattered there, and the predictions come back in one copy.

Attention memory per batch is ``B x heads x chunk_size^2`` instead of
``B x heads x L^2`` (~135x less at VCC size), and time grows linearly with L instead of
quadratically. Setting ``chunk_size`` to the number of genes or more gives full-length
inference in one group, as upstream ``pred_perturb`` does.

Population mean (see :mod:`scgpt_vcc.predict.population`)
---------------------------------------------------------
scGPT has no closed form for its response over the control population, so it is estimated
over the reference control cells ``R`` (``predict.n_reference_cells``, the same cells for
every perturbation and both scGPT models of a seed) with the regression estimator of
survey sampling, which uses the exactly known mean ``c`` of all control cells: per gene,
``mu = mean_R f + beta (c - mean_R x)`` with ``beta = cov_R(f, x) / var_R(x)`` (0 where
``x`` is constant over ``R``). The part of the prediction that follows the input control
value (the affine decoder's ``coeff * x``) then carries no sampling noise of ``R``; with
``R`` = all controls it is the plain mean. The same estimate on each half of ``R`` measures
how far a fresh draw of ``R`` would move each gene (``redraw_deviation``).

Genes outside the vocabulary are not model input; they and every gene of a perturbation
whose target is outside the vocabulary keep the control cell's value (policy in
:mod:`scgpt_vcc.model.vocab`), and the latter are logged. A target in the vocabulary that
is not a measured gene joins every group as its token, flagged, with the input value
``UNMEASURED_VALUE``, as in training; its own output is not part of the prediction.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from scgpt_vcc.model import TransformerGenerator, load_finetuned, match_genes
from scgpt_vcc.model.checkpoint import ARGS_FILE, VOCAB_FILE, read_args, read_vocab
from scgpt_vcc.model.device import (
    autocast_dtype,
    compiles,
    enable_tf32,
    pick_device,
    precision_name,
)
from scgpt_vcc.model.vocab import UNMEASURED_VALUE, unmeasured_tokens
from scgpt_vcc.predict.population import ControlReference, PopulationMean

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1536
# Cells that share one random gene partition (module docstring).
PARTITION_BLOCK = 64


def chunk_bounds(n_others: int, n_targets: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each group of the ``n_others`` non-target genes: as few groups
    as fit ``chunk_size`` with the targets, of nearly equal size."""
    room = chunk_size - n_targets
    if room < 1:
        raise ValueError(f"chunk_size {chunk_size} leaves no room beside {n_targets} targets")
    n_chunks = max(1, -(-n_others // room))
    edges = np.linspace(0, n_others, n_chunks + 1).round().astype(int)
    return list(itertools.pairwise(edges.tolist()))


def targets_key(targets: Sequence[str]) -> int:
    """A stable number for a set of targets (seeds its partitions)."""
    return zlib.crc32("+".join(sorted(targets)).encode())


class ScGPTPredictor:
    """Predict perturbed cells from control cells with a TransformerGenerator.

    A :class:`~scgpt_vcc.predict.population.CellModel`: ``cells(control [n, G], targets) -> [n, G]``
    on the data's gene order.
    """

    def __init__(
        self,
        model: TransformerGenerator,
        vocab: dict[str, int],
        genes: Sequence[str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        seed: int = 0,
        precision: str = "auto",
        renames: Mapping[str, str] | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = autocast_dtype(precision, self.device)
        self.compiled = compiles(compile, self.device)
        # Calls of many sizes and chunks of two lengths: one graph with dynamic shapes.
        self._forward = torch.compile(model, dynamic=True) if self.compiled else model
        enable_tf32(self.device)
        self.match = match_genes(list(genes), vocab, renames=renames)
        self.vocab, self.renames = vocab, dict(renames or {})
        self.input_columns = self.match.input_positions
        self.input_ids = torch.as_tensor(self.match.input_ids, dtype=torch.long, device=self.device)
        self.input_index = {str(genes[c]): i for i, c in enumerate(self.input_columns)}
        self.chunk_size = chunk_size
        self.seed = seed
        self._cells_seen: dict[int, int] = {}
        self._reported: set[tuple[str, ...]] = set()

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The training precision's autocast on GPU (same decision); fp32 on CPU."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _unmeasured_ids(self, targets: Sequence[str]) -> np.ndarray:
        """Tokens of the targets that are in the vocabulary but not measured genes."""
        tokens = unmeasured_tokens(targets, self.match, self.vocab, self.renames)
        return np.asarray(list(tokens.values()), dtype=np.int64)

    def knows(self, target: str) -> bool:
        """Whether the model can flag ``target``: a matched gene, or an unmeasured token."""
        return target in self.input_index or self._unmeasured_ids([target]).size > 0

    def _target_inputs(self, targets: Sequence[str], n_unmeasured: int) -> np.ndarray:
        found = [self.input_index[t] for t in targets if t in self.input_index]
        key = tuple(targets)
        if len(found) + n_unmeasured < len(targets) and key not in self._reported:
            self._reported.add(key)
            outside = [t for t in targets if t not in self.input_index]
            action = (
                "all genes of these cells keep the control values"
                if not found and not n_unmeasured
                else "only the other targets are flagged"
            )
            log.warning("target(s) %s outside the vocabulary or not measured: %s", outside, action)
        return np.asarray(found, dtype=np.int64)

    def _partitions(
        self, key: int, n: int, others: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The random orders of ``others`` for the next ``n`` cells with targets ``key``:
        one row per block those cells fall in, and each cell's row. The cells are counted
        once their call succeeds."""
        blocks = (self._cells_seen.get(key, 0) + np.arange(n)) // PARTITION_BLOCK
        unique, row_of_cell = np.unique(blocks, return_inverse=True)
        orders = np.stack(
            [np.random.default_rng([self.seed, key, b]).permutation(others) for b in unique]
        )
        return (
            torch.from_numpy(orders).to(self.device),
            torch.from_numpy(row_of_cell).to(self.device),
        )

    def cells(self, control: np.ndarray, targets: Sequence[str]) -> np.ndarray:
        """Predicted cells; a call that runs out of GPU memory is split in halves, which
        changes no prediction (module docstring)."""
        try:
            return self._model_call(control, targets)
        except torch.OutOfMemoryError:
            n = control.shape[0]
            if n == 1:
                raise
            torch.cuda.empty_cache()
            log.warning("CUDA out of memory with %d cells per model call: splitting it", n)
            half = n // 2
            return np.concatenate(
                [self.cells(control[:half], targets), self.cells(control[half:], targets)]
            )

    @torch.inference_mode()
    def _model_call(self, control: np.ndarray, targets: Sequence[str]) -> np.ndarray:
        result = np.array(control, dtype=np.float32, copy=True)
        unmeasured = self._unmeasured_ids(targets)
        target_inputs = np.unique(self._target_inputs(targets, unmeasured.size))
        if len(targets) and target_inputs.size == 0 and unmeasured.size == 0:
            return result
        n, n_targets, dev = result.shape[0], target_inputs.size, self.device
        others = np.setdiff1d(np.arange(len(self.input_columns)), target_inputs)
        key = targets_key(targets)
        orders, row_of_cell = self._partitions(key, n, others)
        bounds = chunk_bounds(others.size, n_targets, self.chunk_size)
        values_all = torch.from_numpy(result[:, self.input_columns]).to(dev)
        predicted = torch.empty_like(values_all)
        target_columns = torch.from_numpy(target_inputs).to(dev)
        target_index = target_columns.expand(n, -1)
        extra_ids = torch.from_numpy(unmeasured).to(dev).expand(n, -1)
        extra_values = torch.full((n, unmeasured.size), UNMEASURED_VALUE, device=dev)
        target_sum = torch.zeros((n, n_targets), device=dev)
        for lo, hi in bounds:
            part = orders[:, lo:hi][row_of_cell]
            index = torch.cat([part, target_index], dim=1)
            flags = torch.zeros(index.shape[1] + unmeasured.size, dtype=torch.long, device=dev)
            flags[hi - lo :] = 1  # the targets and the unmeasured targets' tokens
            with self._autocast():
                out = self._forward(
                    torch.cat([self.input_ids[index], extra_ids], dim=1),
                    torch.cat([values_all.gather(1, index), extra_values], dim=1),
                    flags.expand(n, -1),
                ).float()
            predicted.scatter_(1, part, out[:, : hi - lo])
            target_sum += out[:, hi - lo : hi - lo + n_targets]
        if n_targets:
            predicted[:, target_columns] = target_sum / len(bounds)
        result[:, self.input_columns] = predicted.cpu().numpy()
        self._cells_seen[key] = self._cells_seen.get(key, 0) + n
        return result

    def population_mean(
        self, targets: Sequence[str], reference: ControlReference
    ) -> PopulationMean:
        """Regression estimate over the reference controls (module docstring), with its
        re-draw deviation from the two halves of the reference (alternate cells)."""
        halves = [RegressionMoments(reference.mean.size) for _ in range(2)]
        seen = 0
        for control in reference.batches():
            predicted = self.cells(control, targets)
            half = (seen + np.arange(control.shape[0])) % 2
            for h, moments in enumerate(halves):
                moments.add(control[half == h], predicted[half == h])
            seen += control.shape[0]
        total = halves[0] + halves[1]
        mean = total.regression_mean(reference.mean)
        if min(h.n for h in halves) == 0:
            return PopulationMean(mean)
        a, b = (h.regression_mean(reference.mean) for h in halves)
        # Two half-size estimates differ by sqrt(2) x the spread of two full-size draws.
        return PopulationMean(mean, float(np.abs(a - b).max() / np.sqrt(2)))


class RegressionMoments:
    """Running sums for the regression estimator of a mean (float64, per gene)."""

    def __init__(self, n_genes: int) -> None:
        self.n = 0
        self.x, self.f, self.xx, self.xf = (np.zeros(n_genes) for _ in range(4))

    def add(self, x: np.ndarray, f: np.ndarray) -> None:
        x, f = x.astype(np.float64), f.astype(np.float64)
        self.n += x.shape[0]
        self.x += x.sum(axis=0)
        self.f += f.sum(axis=0)
        self.xx += (x * x).sum(axis=0)
        self.xf += (x * f).sum(axis=0)

    def __add__(self, other: RegressionMoments) -> RegressionMoments:
        out = RegressionMoments(self.x.size)
        out.n = self.n + other.n
        for name in ("x", "f", "xx", "xf"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def regression_mean(self, population_x: np.ndarray) -> np.ndarray:
        x_bar, f_bar = self.x / self.n, self.f / self.n
        var = self.xx / self.n - x_bar**2
        cov = self.xf / self.n - x_bar * f_bar
        beta = np.divide(cov, var, out=np.zeros_like(var), where=var > 1e-12)
        return f_bar + beta * (population_x - x_bar)


def load_predictor(
    model_dir: str | Path,
    genes: Sequence[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    renames: Mapping[str, str] | None = None,
    compile: bool = False,
) -> ScGPTPredictor:
    """Predictor from a trained folder (``finetune``'s output: every parameter is loaded);
    ``renames``: data gene -> vocabulary symbol, as in training."""
    folder = Path(model_dir)
    model = load_finetuned(folder, device=pick_device(device))
    vocab = read_vocab(folder / VOCAB_FILE, read_args(folder / ARGS_FILE)["pad_token"])
    predictor = ScGPTPredictor(
        model,
        vocab,
        genes,
        chunk_size=chunk_size,
        seed=seed,
        precision=precision,
        renames=renames,
        compile=compile,
    )
    log.info(
        "scGPT inference on %s in %s, gene chunks of %d, compiled %s",
        predictor.device,
        precision_name(predictor.dtype),
        chunk_size,
        predictor.compiled,
    )
    return predictor
