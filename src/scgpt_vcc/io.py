"""File helpers shared by every stage: atomic outputs and streaming h5ad access.

Every output is first written under a temporary name in the destination folder and
renamed into place only when complete, so a killed job never leaves a file that looks
finished. Large AnnData files are read and written in row chunks so memory does not
grow with the number of cells.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset, write_elem
from tqdm.auto import tqdm

from scgpt_vcc.errors import InputError

# HDF5 chunk length (elements) for the sparse arrays of a streamed matrix: 64 Ki
# elements (256 KiB of float32) hold ~8 full-VCC rows, so row reads touch few chunks,
# and a tiny file is not padded to megabytes.
H5_CHUNK = 1 << 16
# Largest non-zero count that int32 row pointers can address.
INT32_MAX = int(np.iinfo(np.int32).max)
# Stored values + column indices of one row chunk. A stage holds a few copies of its
# chunk (convert: counts, float64 normalisation, float32 output, write buffers); 128 MiB
# keeps every data stage near or below 1.5 GB at any number of cells or genes
# (bench/gears_processing.py).
CHUNK_BYTES = 128 * 2**20


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A job killed with SIGKILL cannot clean up; its stale temporary goes on the next run.
    for stale in final.parent.glob(f".{final.name}.tmp*"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any, *, sort_keys: bool = True) -> None:
    """Indented JSON (numpy scalars and arrays, paths as plain values), written atomically."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default)
    write_text_atomic(path, text + "\n")


def read_json(path: str | Path, fix: str) -> Any:
    """The JSON document in ``path``; an unreadable or invalid file raises InputError(fix)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, "file", f"is not valid JSON ({err})", fix) from err


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def open_h5ad(path: str | Path) -> h5py.File:
    """Open an h5ad file read-only, turning HDF5 failures into an :class:`InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file", "does not exist", "check the path in the config")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise InputError(
            path,
            "file",
            f"is not a readable HDF5/h5ad file ({err})",
            "re-download or re-create the file; it may be truncated or corrupt",
        ) from err


@contextlib.contextmanager
def _reading(path: str | Path, field: str) -> Iterator[None]:
    """Turn low-level read failures of ``field`` into an :class:`InputError`.

    h5py and anndata raise many exception types on a corrupt file (OSError, RuntimeError,
    KeyError, anndata's IORegistryError, ...; found by tests/test_convert_corruption.py), so
    any failure while reading the user's file is reported as that file being unreadable.
    """
    try:
        yield
    except Exception as err:
        if isinstance(err, InputError):
            raise
        raise InputError(
            path,
            field,
            f"cannot be read ({type(err).__name__}: {err})",
            "re-download or re-create the file; it may be truncated or corrupt",
        ) from err


def read_annotations(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ``obs`` and ``var`` of an h5ad file without touching ``X``."""
    with open_h5ad(path) as f, _reading(path, "obs/var"):
        for key in ("obs", "var", "X"):
            if key not in f:
                raise InputError(path, key, "is missing", "write the file with anndata")
        return read_elem(f["obs"]), read_elem(f["var"])


def read_uns(path: str | Path) -> dict[str, Any]:
    with open_h5ad(path) as f:
        return read_elem(f["uns"]) if "uns" in f else {}


def _check_row_pointers(group: h5py.Group, n_rows: int, path: str | Path, key: str) -> None:
    """Refuse a CSR matrix whose row pointers are inconsistent.

    Slicing rows trusts ``indptr``; a corrupt one crashed the reader (segmentation fault,
    found by tests/test_convert_corruption.py). It is one integer per cell, cheap to read.
    """
    indptr = group["indptr"][()]
    n_stored = group["data"].shape[0]
    consistent = (
        indptr.shape == (n_rows + 1,)
        and indptr[0] == 0
        and indptr[-1] == n_stored == group["indices"].shape[0]
        and bool(np.all(np.diff(indptr) >= 0))
    )
    if not consistent:
        raise InputError(
            path,
            f"{key}/indptr",
            "row pointers are inconsistent with the stored values",
            "re-download or re-create the file; it is corrupt",
        )


def row_chunk_bounds(
    entry_ends: np.ndarray, chunk_size: int, max_entries: int
) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of at most ``chunk_size`` rows and ``max_entries`` stored
    entries (at least one row each), given each row's cumulative entry count (CSR
    ``indptr[1:]``)."""
    n_rows, start = len(entry_ends), 0
    while start < n_rows:
        before = int(entry_ends[start - 1]) if start else 0
        fits = int(np.searchsorted(entry_ends, before + max_entries, side="right"))
        stop = min(start + chunk_size, max(fits, start + 1), n_rows)
        yield start, stop
        start = stop


def iter_row_chunks(
    path: str | Path,
    chunk_size: int,
    key: str = "X",
    desc: str | None = None,
    max_bytes: int = CHUNK_BYTES,
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(start_row, csr_chunk)`` over a matrix of an h5ad file, one chunk in memory.

    A chunk holds at most ``chunk_size`` rows and ``max_bytes`` of stored values and
    column indices (a dense matrix counts every entry), so memory stays bounded however
    wide or dense the rows are. ``key`` is ``"X"`` or ``"layers/<name>"``; a dense matrix
    is converted to CSR chunk by chunk.
    """
    with open_h5ad(path) as f:
        with _reading(path, key):
            node = f[key]
            dense = isinstance(node, h5py.Dataset)
            n_rows = node.shape[0] if dense else int(node.attrs["shape"][0])
            if dense:
                n_cols = node.shape[1] if node.ndim > 1 else 1
                entry_ends = np.arange(1, n_rows + 1, dtype=np.int64) * n_cols
                entry_bytes = node.dtype.itemsize
            else:
                _check_row_pointers(node, n_rows, path, key)
                entry_ends = node["indptr"][1:]
                entry_bytes = node["data"].dtype.itemsize + node["indices"].dtype.itemsize
            matrix = node if dense else sparse_dataset(node)
        bounds = row_chunk_bounds(entry_ends, chunk_size, max(max_bytes // entry_bytes, 1))
        with tqdm(total=n_rows, desc=desc or f"read {Path(path).name}", unit="cells") as bar:
            for start, stop in bounds:
                with _reading(path, f"{key} rows {start}-{stop}"):
                    block = sp.csr_matrix(matrix[start:stop])
                    # Corrupt indices would otherwise pass silently into every later
                    # stage (or crash scipy's C code); O(nnz), small next to the read.
                    block.check_format(full_check=True)
                    # Repeated column indices in a row are legal CSR but mean "sum them":
                    # make rows canonical so per-entry transforms (log1p) stay correct.
                    block.sum_duplicates()
                yield start, block
                bar.update(stop - start)


def save_figure(fig: Any, path: str | Path, *, dpi: int = 100, tight: bool = True) -> None:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)


class CsrRowReader:
    """Rows of a CSR matrix of an h5ad file (``X`` or ``layers/<name>``), without loading it.

    The one row reader of the package (training batches, predictions, cell graphs,
    evaluation subsets). Only ``indptr`` (8 bytes per cell) stays in memory and is checked
    on opening. Rows are read as contiguous runs, so consecutive rows cost one HDF5 read.
    The file is opened on first use, so a reader can be sent to DataLoader workers.
    """

    def __init__(self, path: str | Path, key: str = "X") -> None:
        self.path = Path(path)
        self.key = key
        with open_h5ad(self.path) as f:
            node = f.get(key)
            if not isinstance(node, h5py.Group) or node.attrs.get("encoding-type") != "csr_matrix":
                raise InputError(
                    self.path, key, "is not a CSR sparse matrix", "write X as scipy CSR"
                )
            self.shape = tuple(int(n) for n in node.attrs["shape"])
            _check_row_pointers(node, self.shape[0], self.path, key)
            self.indptr = node["indptr"][:].astype(np.int64)
        self._file: h5py.File | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def _group(self) -> h5py.Group:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[self.key]

    def _read(self, uniq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Column indices, values and stored-entry counts of the sorted unique rows."""
        group = self._group()
        if len(uniq) == 0:
            return np.zeros(0, np.int64), np.zeros(0, group["data"].dtype), np.zeros(0, np.int64)
        starts, stops = self.indptr[uniq], self.indptr[uniq + 1]
        # Merge rows whose stored entries are adjacent (consecutive rows) into one read.
        breaks = np.flatnonzero(starts[1:] != stops[:-1]) + 1
        run_first = np.concatenate([[0], breaks])
        run_last = np.concatenate([breaks, [len(uniq)]]) - 1
        idx_parts, val_parts = [], []
        for a, b in zip(starts[run_first], stops[run_last], strict=True):
            idx_parts.append(group["indices"][a:b])
            val_parts.append(group["data"][a:b])
        indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
        data = np.concatenate(val_parts) if val_parts else np.zeros(0, group["data"].dtype)
        return indices, data, stops - starts

    def read_dense(self, rows: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """Dense float32 [len(rows), len(columns)]: the given rows restricted to ``columns``
        (column indices of the matrix; None: all). ``rows`` may repeat, in any order."""
        uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        indices, data, lengths = self._read(uniq)
        local_row = np.repeat(np.arange(len(uniq)), lengths)
        if columns is None:
            dense = np.zeros((len(uniq), self.shape[1]), dtype=np.float32)
            dense[local_row, indices] = data
            return dense[inverse]
        position = np.full(self.shape[1], -1, dtype=np.int64)
        position[columns] = np.arange(len(columns))
        col = position[indices]
        keep = col >= 0
        dense = np.zeros((len(uniq), len(columns)), dtype=np.float32)
        dense[local_row[keep], col[keep]] = data[keep]
        return dense[inverse]

    def read_csr(self, rows: np.ndarray) -> sp.csr_matrix:
        """The given rows (may repeat, any order) as CSR, in the file's value dtype."""
        uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        indices, data, lengths = self._read(uniq)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        matrix = sp.csr_matrix((data, indices, indptr), shape=(len(uniq), self.shape[1]))
        return matrix[inverse]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class H5adStreamWriter:
    """Write an h5ad file whose sparse matrices arrive in row chunks.

    ``obs``, ``var`` and ``uns`` are written up front; :meth:`append` adds rows to ``X``
    and to any named layers. The result reads back with :func:`anndata.read_h5ad`. Use
    it on a temporary path (see :func:`atomic_path`): a half-written file is not valid.
    """

    def __init__(
        self,
        path: str | Path,
        obs: pd.DataFrame,
        var: pd.DataFrame,
        uns: Mapping[str, Any] | None = None,
        layers: tuple[str, ...] = (),
    ) -> None:
        self._file = h5py.File(path, "w")
        self._n_obs = len(obs)
        self._n_vars = len(var)
        self._rows = {"X": 0, **{f"layers/{name}": 0 for name in layers}}
        self._file.attrs["encoding-type"] = "anndata"
        self._file.attrs["encoding-version"] = "0.1.0"
        write_elem(self._file, "obs", obs)
        write_elem(self._file, "var", var)
        write_elem(self._file, "uns", dict(uns or {}))
        write_elem(self._file, "layers", {})
        for group in ("obsm", "varm", "obsp", "varp"):
            write_elem(self._file, group, {})

    def set_uns(self, uns: Mapping[str, Any]) -> None:
        """Replace ``uns`` (for what is known only once the rows are written)."""
        del self._file["uns"]
        write_elem(self._file, "uns", dict(uns))

    def append(self, x: sp.csr_matrix, layers: Mapping[str, sp.csr_matrix] | None = None) -> None:
        self._append("X", x)
        for name, block in (layers or {}).items():
            self._append(f"layers/{name}", block)

    def _append(self, key: str, block: sp.csr_matrix) -> None:
        if key not in self._rows:
            raise KeyError(f"layer {key!r} was not declared when the writer was created")
        block = sp.csr_matrix(block)
        if block.shape[1] != self._n_vars:
            raise ValueError(f"{key}: chunk has {block.shape[1]} columns, expected {self._n_vars}")
        if self._rows[key] == 0:
            # int64 row pointers while streaming (the full VCC matrix has ~1.7e9 non-zeros,
            # close to 2**31); close() settles on one index type.
            block.indptr = block.indptr.astype(np.int64)
            block.indices = block.indices.astype(np.int32)
            write_elem(self._file, key, block, dataset_kwargs={"chunks": (H5_CHUNK,)})
        else:
            sparse_dataset(self._file[key]).append(block)
        self._rows[key] += block.shape[0]

    def close(self) -> None:
        incomplete = {k: n for k, n in self._rows.items() if n != self._n_obs}
        if not incomplete:
            for key in self._rows:
                if key in self._file:  # absent when there are no rows at all
                    _unify_index_dtype(self._file[key])
        self._file.close()
        if incomplete:
            raise ValueError(f"rows written {incomplete} differ from n_obs={self._n_obs}")

    def __enter__(self) -> H5adStreamWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def _unify_index_dtype(group: h5py.Group) -> None:
    """Store ``indptr`` and ``indices`` of a CSR group with one integer type.

    anndata reads both arrays as stored, and scipy indexes rows of a matrix with mixed
    int32/int64 index arrays by first copying all of ``indices`` to int64: on 10% of VCC
    (172 M non-zeros) every row lookup then cost 0.125 s, and GEARS's
    ``create_cell_graph_dataset``, which looks up one control row per cell, ran for hours
    instead of minutes. int32 for both while the non-zeros fit, else int64 for both.
    """
    indptr = group["indptr"][()]
    if indptr[-1] <= INT32_MAX:
        del group["indptr"]
        group.create_dataset("indptr", data=indptr.astype(np.int32))
        return
    old = group["indices"]
    wide = group.create_dataset(
        "indices_int64", shape=old.shape, dtype=np.int64, chunks=old.chunks, maxshape=old.maxshape
    )
    step = 64 * H5_CHUNK
    for start in range(0, old.shape[0], step):
        wide[start : start + step] = old[start : start + step]
    del group["indices"]
    group.move("indices_int64", "indices")


def _entry_bytes(path: str | Path) -> int:
    """Bytes of one stored entry of ``X`` (value + column index)."""
    with open_h5ad(path) as f:
        return f["X"]["data"].dtype.itemsize + f["X"]["indices"].dtype.itemsize


def write_rows(
    source: str | Path, rows: np.ndarray, obs: pd.DataFrame, output: str | Path, chunk_size: int
) -> None:
    """``rows`` of ``source``'s CSR ``X`` in that order, with their ``obs``, as a new h5ad file.

    Read and written in chunks of at most ``chunk_size`` rows and ``CHUNK_BYTES``.
    """
    reader = CsrRowReader(source)
    try:
        _, var = read_annotations(source)
        ends = np.cumsum(np.diff(reader.indptr)[rows])
        max_entries = max(CHUNK_BYTES // _entry_bytes(source), 1)
        with H5adStreamWriter(output, obs.iloc[rows], pd.DataFrame(index=var.index)) as writer:
            for start, stop in row_chunk_bounds(ends, chunk_size, max_entries):
                writer.append(reader.read_csr(rows[start:stop]))
    finally:
        reader.close()
