"""Map measured genes to scGPT vocabulary ids.

Policy for genes outside the vocabulary (followed by the training and prediction helpers)
---------------------------------------------------------------------------------------
A gene matches when its symbol (``var`` index / ``gene_names.csv`` entry) equals a key of
``vocab.json`` exactly (case-sensitive), or when ``renames`` maps it to one (a symbol HGNC
has renamed since the data were annotated: :mod:`scgpt_vcc.model.renames`); the special
tokens ``<pad>``, ``<cls>`` and ``<eoc>`` never match a gene. The data keep their own names.

* **Excluded from model input.** Unmatched genes are dropped from the token sequence. The
  upstream tutorial instead feeds them with the ``<pad>`` id, so that all of them share one
  embedding and the model cannot tell them apart; dropping them avoids that noise and
  shortens the sequence. For VCC 240 of 18,080 genes (1.3%) miss the whole-human
  vocabulary by symbol, 156 with a table of HGNC's renames (``tests/test_renames.py``).
* **Fallback prediction = the input control value.** For every predicted cell, an
  unmatched gene gets the expression of the same gene in the control cell that was fed to
  the model (i.e. "no perturbation effect"); averaged over cells this is the control mean,
  so the gene contributes zero predicted effect to DES/PDS and control-level MAE.
* **Perturbation targets that are not measured but are in the vocabulary** (targeted
  panels, knockout screens): the model does not need the target measured, only its token.
  The target is fed as one more input position, its token with the perturbation flag and
  the input value :data:`UNMEASURED_VALUE` (0: no expression measured), and its output is
  neither scored in training nor part of a prediction.
* **Perturbation targets outside the vocabulary.** Such a target has no token to carry the
  perturbation flag, so the model cannot see the perturbation at all. The helpers list
  these perturbations in their log and predict all their genes with the same fallback
  (control values). Training cells of such perturbations are still usable as inputs with
  no flagged position, but the helpers skip them because their targets are unlearnable.

:func:`match_genes` reports the match count, percentage and the unmatched names; the
helpers log that report so a run shows how much of the data the model can see.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<cls>", "<eoc>")
# Input value of a perturbation target that is in the vocabulary but not measured.
UNMEASURED_VALUE = 0.0

__all__ = [
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNMEASURED_VALUE",
    "VocabMatch",
    "match_genes",
    "unmeasured_tokens",
]


@dataclass(frozen=True)
class VocabMatch:
    """Result of :func:`match_genes` for an ordered list of measured genes.

    Attributes:
        genes: the measured gene names, in input order.
        vocab_ids: int64 array, same length as ``genes``; the vocabulary id, or -1 when
            the gene is outside the vocabulary.
    """

    genes: tuple[str, ...]
    vocab_ids: np.ndarray

    @property
    def matched(self) -> np.ndarray:
        """Boolean mask over ``genes``: True where the gene is in the vocabulary."""
        return self.vocab_ids >= 0

    @property
    def input_positions(self) -> np.ndarray:
        """Column indices (into ``genes``) of the genes fed to the model, in input order."""
        return np.flatnonzero(self.matched)

    @property
    def input_ids(self) -> np.ndarray:
        """Vocabulary ids of the genes at :attr:`input_positions`."""
        return self.vocab_ids[self.matched]

    @property
    def n_matched(self) -> int:
        return int(self.matched.sum())

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def percent_matched(self) -> float:
        return 100.0 * self.n_matched / self.n_genes if self.n_genes else 0.0

    @property
    def unmatched(self) -> list[str]:
        """Names of the genes outside the vocabulary, in input order."""
        return [g for g, ok in zip(self.genes, self.matched, strict=True) if not ok]

    def summary(self, max_listed: int = 20) -> str:
        missing = self.unmatched
        shown = ", ".join(missing[:max_listed])
        more = f", ... (+{len(missing) - max_listed} more)" if len(missing) > max_listed else ""
        text = (
            f"{self.n_matched} of {self.n_genes} genes ({self.percent_matched:.1f}%) are in "
            f"the scGPT vocabulary; {len(missing)} outside"
        )
        return text + (f": {shown}{more}" if missing else "")


def match_genes(
    genes: Sequence[str],
    vocab: Mapping[str, int],
    *,
    renames: Mapping[str, str] | None = None,
    specials: Sequence[str] = SPECIAL_TOKENS,
) -> VocabMatch:
    """Look up each gene symbol, or its rename, in ``vocab`` and log a summary."""
    special = set(specials)
    renames = renames or {}
    symbols = [renames.get(g, g) for g in genes]
    ids = np.fromiter(
        (vocab[s] if s in vocab and s not in special else -1 for s in symbols),
        dtype=np.int64,
        count=len(genes),
    )
    if renames:
        renamed = sum(g in renames for g in genes)
        log.info("%d genes matched under their current HGNC symbol", renamed)
    result = VocabMatch(genes=tuple(str(g) for g in genes), vocab_ids=ids)
    log.info("%s", result.summary())
    return result


def unmeasured_tokens(
    targets: Sequence[str],
    match: VocabMatch,
    vocab: Mapping[str, int],
    renames: Mapping[str, str] | None = None,
    *,
    specials: Sequence[str] = SPECIAL_TOKENS,
) -> dict[str, int]:
    """Vocabulary ids of the ``targets`` that are not measured genes (under their
    ``renames``), by target name; targets outside the vocabulary are left out."""
    measured, special, renames = set(match.genes), set(specials), renames or {}
    tokens = {}
    for target in dict.fromkeys(targets):
        symbol = renames.get(target, target)
        if target not in measured and symbol in vocab and symbol not in special:
            tokens[target] = int(vocab[symbol])
    return tokens
