"""Atomic outputs and streamed h5ad files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgpt_vcc.io import H5adStreamWriter, atomic_path, iter_row_chunks, row_chunk_bounds


def test_atomic_path_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_stale_temporary_of_a_killed_writer_is_removed(tmp_path: Path) -> None:
    target = tmp_path / "big.h5ad"
    script = (
        "import time, sys\n"
        "from scgpt_vcc.io import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = list(tmp_path.iterdir())
    assert not target.exists() and len(leftovers) == 1 and leftovers[0].name.startswith(".big")

    with atomic_path(target) as tmp:
        tmp.write_text("complete")
    assert target.read_text() == "complete"
    assert list(tmp_path.iterdir()) == [target]


def test_stream_writer_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blocks = [
        sp.random(n, 5, density=0.4, format="csr", dtype=np.float32, random_state=rng)
        for n in (3, 4, 2)
    ]
    obs = pd.DataFrame(
        {"group": pd.Categorical(list("abcabcabc"))}, index=[f"c{i}" for i in range(9)]
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(5)])
    with H5adStreamWriter(tmp_path / "x.h5ad", obs, var, {"k": 1}, layers=("counts",)) as writer:
        for block in blocks:
            writer.append(block, {"counts": block * 2})
    adata = ad.read_h5ad(tmp_path / "x.h5ad")
    expected = sp.vstack(blocks).toarray()
    np.testing.assert_array_equal(adata.X.toarray(), expected)
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), 2 * expected)
    assert adata.uns["k"] == 1 and list(adata.obs["group"]) == list("abcabcabc")
    chunks = list(iter_row_chunks(tmp_path / "x.h5ad", 4, key="layers/counts"))
    assert [start for start, _ in chunks] == [0, 4, 8]
    np.testing.assert_array_equal(sp.vstack([c for _, c in chunks]).toarray(), 2 * expected)


@pytest.mark.parametrize("dense", [False, True])
def test_row_chunks_are_bounded_by_bytes_as_well_as_rows(tmp_path: Path, dense: bool) -> None:
    """Wide or dense rows make smaller chunks: each holds at most max_bytes of values and
    indices (or one row), and together they are the whole matrix in order."""
    rng = np.random.default_rng(0)
    widths = rng.integers(0, 50, size=40)  # stored entries per row, 0 to 49
    rows = [sp.csr_matrix((np.ones(w, np.float32), (np.zeros(w), np.arange(w))), shape=(1, 60))
            for w in widths]  # fmt: skip
    matrix = sp.vstack(rows).tocsr()
    adata = ad.AnnData(matrix.toarray() if dense else matrix)
    adata.write_h5ad(tmp_path / "x.h5ad")
    entry = 4 if dense else 4 + 4  # float32 value (+ int32 index)
    budget = 100 * entry
    chunks = list(iter_row_chunks(tmp_path / "x.h5ad", 25, max_bytes=budget))
    assert len(chunks) > 40 / 25 + 1, "bytes, not rows, cut most chunks"
    for start, chunk in chunks:
        stored = chunk.shape[0] * 60 if dense else widths[start : start + chunk.shape[0]].sum()
        assert chunk.shape[0] <= 25 and (stored * entry <= budget or chunk.shape[0] == 1)
    assert [s for s, _ in chunks] == list(np.cumsum([0] + [c.shape[0] for _, c in chunks])[:-1])
    np.testing.assert_array_equal(sp.vstack([c for _, c in chunks]).toarray(), matrix.toarray())


def test_row_chunk_bounds_take_as_many_rows_as_fit() -> None:
    ends = np.cumsum([3, 3, 10, 0, 0, 1, 4])
    assert list(row_chunk_bounds(ends, 100, 6)) == [(0, 2), (2, 3), (3, 7)]
    assert list(row_chunk_bounds(ends, 2, 1000)) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert list(row_chunk_bounds(np.array([], dtype=np.int64), 5, 5)) == []


def test_stream_writer_refuses_incomplete_matrix(tmp_path: Path) -> None:
    obs = pd.DataFrame(index=["a", "b"])
    var = pd.DataFrame(index=["g"])
    with pytest.raises(ValueError, match="rows written"):
        with H5adStreamWriter(tmp_path / "x.h5ad", obs, var) as writer:
            writer.append(sp.csr_matrix(np.ones((1, 1), dtype=np.float32)))


def _write_blocks(path: Path, blocks: list[sp.csr_matrix]) -> None:
    n_rows = sum(block.shape[0] for block in blocks)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_rows)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(blocks[0].shape[1])])
    with H5adStreamWriter(path, obs, var, layers=("counts",)) as writer:
        for block in blocks:
            writer.append(block, {"counts": block})


@pytest.mark.parametrize(("int32_max", "expected"), [(None, np.int32), (10, np.int64)])
def test_stream_writer_stores_one_index_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, int32_max: int | None, expected: type
) -> None:
    """Mixed int32/int64 index arrays make scipy copy all indices on every row lookup."""
    if int32_max is not None:
        monkeypatch.setattr("scgpt_vcc.io.INT32_MAX", int32_max)
    rng = np.random.default_rng(1)
    blocks = [
        sp.random(n, 6, density=0.5, format="csr", dtype=np.float32, random_state=rng)
        for n in (4, 3)
    ]
    _write_blocks(tmp_path / "x.h5ad", blocks)
    adata = ad.read_h5ad(tmp_path / "x.h5ad")
    for matrix in (adata.X, adata.layers["counts"]):
        assert matrix.indptr.dtype == matrix.indices.dtype == expected
        np.testing.assert_array_equal(matrix.toarray(), sp.vstack(blocks).toarray())
    rows = [5, 0, 5]
    np.testing.assert_array_equal(adata.X[rows].toarray(), sp.vstack(blocks).toarray()[rows])
