"""Scores of a dataset with several cell contexts: each context on its own, then averaged.

A perturbation's response depends on the cell line, and so do the controls it is compared
with: DES tests a perturbation's cells against its own context's controls, PDS ranks it
among the perturbations of its context. So every evaluation (VCC 2025 metrics, their
ceiling, the VCC 2026 suite) runs once per context on that context's cells, real and
predicted alike, and a file's score is the mean over contexts, each context weighing the
same (as cell-eval2 averages its contexts). The per-context numbers stay in ``contexts``.

A context's cells are copied into a temporary h5ad file in row chunks
(:func:`~scgpt_vcc.io.write_rows`), so every scorer runs unchanged on one context.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from scgpt_vcc.data.gears import CONTEXT, cell_contexts
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import read_annotations, write_rows


def several_contexts(path: str | Path) -> list[str]:
    """The contexts of ``path``'s cells (sorted) when there are several, else ``[]``."""
    obs, _ = read_annotations(path)
    contexts = sorted(set(cell_contexts(obs)))
    return contexts if len(contexts) > 1 else []


@contextlib.contextmanager
def context_files(
    paths: Mapping[str, str | Path], contexts: Sequence[str], chunk_size: int
) -> Iterator[dict[str, dict[str, Path]]]:
    """``{context: {name: file}}``: each file of ``paths`` cut into one temporary file per
    context (deleted on exit). Every file must hold every context."""
    with tempfile.TemporaryDirectory(prefix="contexts_") as tmp:
        files: dict[str, dict[str, Path]] = {context: {} for context in contexts}
        for name, path in paths.items():
            obs, _ = read_annotations(path)
            labels = cell_contexts(obs)
            for context in contexts:
                rows = np.flatnonzero(labels == context)
                if rows.size == 0:
                    raise InputError(
                        path,
                        f"obs.{CONTEXT}",
                        f"has no cells of context {context!r}",
                        "predict every context of the real file",
                    )
                files[context][name] = Path(tmp) / context / f"{name}.h5ad"
                files[context][name].parent.mkdir(exist_ok=True)
                write_rows(path, rows, obs, files[context][name], chunk_size)
        yield files


def mean_over_contexts(values: Sequence[Any]) -> Any:
    """The mean of per-context results, leaf by leaf: numbers are averaged (null and NaN
    left out; none left: null), dicts key by key, anything else is taken from the first."""
    first = values[0]
    if isinstance(first, Mapping):
        return {key: mean_over_contexts([v.get(key) for v in values]) for key in first}
    if isinstance(first, Real) and not isinstance(first, bool):
        finite = [float(v) for v in values if isinstance(v, Real) and not math.isnan(v)]
        return float(np.mean(finite)) if finite else None
    numbers = [v for v in values if isinstance(v, Real) and not isinstance(v, bool)]
    if first is None and numbers:
        return mean_over_contexts(numbers)
    return first
