"""GEARS cell graphs: built lazily per cell, or streamed into ``cell_graphs.pkl``.

A GEARS cell graph (``PertData.create_cell_graph``) is a PyG ``Data`` with
``x`` = the paired control cell's expression [G, 1], ``y`` = the cell's expression
[1, G], ``de_idx`` = positions of the top-20 DE genes of the cell's ``condition_name``
(its condition in its context, in gene order; ``[-1] * 20`` for control),
``pert_idx`` = positions of the perturbed genes in GEARS's perturbation-gene list
(``[-1]`` for control or a gene outside the list) and ``pert`` = the condition.
:class:`CellGraphBuilder` makes any cell's graph from the h5ad and the pairing file,
reading two rows; :func:`write_cell_graphs` writes GEARS's pickle (condition -> list
of Data, conditions in order of first appearance) one batch at a time, so memory stays
at one batch however large the file gets.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import torch
from torch_geometric.data import Data
from tqdm.auto import tqdm

from scgpt_vcc.data.gears import CONTROL, perturbed_genes
from scgpt_vcc.data.pairing import read_pairing
from scgpt_vcc.io import CsrRowReader, atomic_path, open_h5ad, read_annotations

log = logging.getLogger(__name__)

N_DE = 20
DE_KEY = "rank_genes_groups_cov_all"
# Protocol 3 memoises with explicit indices (no FRAME/MEMOIZE opcodes), so separately
# pickled pieces can be spliced into one stream and still load as one object.
PICKLE_PROTOCOL = 3


def _top_de_genes(path: str | Path) -> dict[str, np.ndarray]:
    """First 20 genes of each ranking, without reading the full rankings."""
    with open_h5ad(path) as f:
        if f"uns/{DE_KEY}" not in f:
            return {}
        group = f[f"uns/{DE_KEY}"]
        return {k: np.asarray(group[k].asstr()[:N_DE], dtype=object) for k in group}


class CellGraphBuilder:
    """Build GEARS's ``Data`` for any cell of ``perturb_processed.h5ad``."""

    def __init__(
        self, processed: str | Path, pairing: str | Path, pert_names: Sequence[str]
    ) -> None:
        obs, var = read_annotations(processed)
        self.condition = np.asarray(obs["condition"].astype(str))
        # the DE genes are those of the cell's condition in its own context
        self.condition_name = np.asarray(obs["condition_name"].astype(str))
        self.control_row = read_pairing(pairing, len(obs))
        top = _top_de_genes(processed)
        self._de_idx: dict[str, np.ndarray | list[int]] = {}
        groups = pd.DataFrame({"name": self.condition_name, "cond": self.condition})
        for name, cond in groups.drop_duplicates("name").itertuples(index=False):
            if cond == CONTROL:
                self._de_idx[name] = [-1] * (N_DE if top else 1)
            else:
                self._de_idx[name] = np.where(var.index.isin(top[name]))[0] if top else [-1]
        pert_pos = {g: i for i, g in enumerate(pert_names)}
        self._pert_idx: dict[str, list] = {}
        for cond in pd.unique(self.condition):
            genes = perturbed_genes(cond)
            idx = [np.int64(pert_pos[g]) for g in genes if g in pert_pos]
            self._pert_idx[cond] = idx if cond != CONTROL and len(idx) == len(genes) else [-1]
        self._reader = CsrRowReader(processed)

    def graph(self, row: int) -> Data:
        return self.graphs([row])[0]

    def graphs(self, rows: Sequence[int]) -> list[Data]:
        rows = np.asarray(rows, dtype=np.int64)
        y = self._reader.read_dense(rows)
        x = self._reader.read_dense(self.control_row[rows])
        out = []
        for i, r in enumerate(rows):
            cond = self.condition[r]
            out.append(
                Data(
                    x=torch.tensor(x[i : i + 1]).T,
                    pert_idx=self._pert_idx[cond],
                    y=torch.tensor(y[i : i + 1]),
                    de_idx=self._de_idx[self.condition_name[r]],
                    pert=cond,
                )
            )
        return out

    def condition_rows(self) -> Iterator[tuple[str, np.ndarray]]:
        """Conditions in order of first appearance (GEARS's order) with their rows."""
        for cond in pd.unique(self.condition):
            yield cond, np.flatnonzero(self.condition == cond)

    def close(self) -> None:
        self._reader.close()


def _fragment(obj: object) -> bytes:
    """A pickle of ``obj`` without its PROTO header and STOP, for splicing."""
    blob = pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    return blob[2:-1]


def _write_list(
    fh: BinaryIO, builder: CellGraphBuilder, rows: np.ndarray, batch: int, bar: tqdm
) -> None:
    fh.write(pickle.EMPTY_LIST)
    for start in range(0, len(rows), batch):
        fh.write(pickle.MARK)
        for graph in builder.graphs(rows[start : start + batch]):
            fh.write(_fragment(graph))
        fh.write(pickle.APPENDS)
        bar.update(min(batch, len(rows) - start))


def write_cell_graphs(
    processed: str | Path,
    pairing: str | Path,
    pert_names: Sequence[str],
    output: str | Path,
    batch_size: int = 256,
) -> None:
    """Stream GEARS's ``cell_graphs.pkl``: ``{condition: [Data, ...]}``."""
    builder = CellGraphBuilder(processed, pairing, pert_names)
    try:
        with (
            atomic_path(output) as tmp,
            open(tmp, "wb") as fh,
            tqdm(total=len(builder.condition), desc="cell graphs", unit="cells") as bar,
        ):
            fh.write(pickle.PROTO + bytes([PICKLE_PROTOCOL]) + pickle.EMPTY_DICT)
            for cond, rows in builder.condition_rows():
                fh.write(_fragment(cond))
                _write_list(fh, builder, rows, batch_size, bar)
                fh.write(pickle.SETITEM)
            fh.write(pickle.STOP)
    finally:
        builder.close()
    log.info("wrote %s (%d cells)", output, len(builder.condition))
