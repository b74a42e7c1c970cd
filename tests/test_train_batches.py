"""Lazy training batches: exact rows, control pairing, flags from names, target always sampled."""

# ruff: noqa: F811  (pytest fixtures imported from tests.train_support)

from __future__ import annotations

import anndata as ad
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scgpt_vcc.data.gears import condition_of, perturbed_genes
from scgpt_vcc.io import CsrRowReader, read_annotations
from scgpt_vcc.model.checkpoint import read_vocab
from scgpt_vcc.model.vocab import match_genes, unmeasured_tokens
from scgpt_vcc.train.batches import (
    EvalBatches,
    PerturbationCells,
    StepPlan,
    TrainSteps,
    sample_genes,
)
from tests.train_support import train_cells, train_inputs, unmeasured_inputs  # noqa: F401


def test_perturbed_genes_from_condition_names():
    assert perturbed_genes("ctrl") == []
    assert perturbed_genes("TP53+ctrl") == ["TP53"]
    assert perturbed_genes("ctrl+TP53") == ["TP53"]
    assert perturbed_genes("A+B") == ["A", "B"]
    assert condition_of("TP53") == "TP53+ctrl" and condition_of("A+B") == "A+B"
    assert all(perturbed_genes(condition_of(g)) == [g] for g in ("TP53", "MYC"))


def test_row_reader_matches_dense_matrix(train_inputs):
    x = ad.read_h5ad(train_inputs["data"]).X.toarray()
    rng = np.random.default_rng(0)
    rows = rng.integers(0, x.shape[0], 50)
    rows[:5] = rows[5]  # repeats and runs of consecutive rows
    rows[10:15] = np.arange(100, 105)
    columns = rng.permutation(x.shape[1])[:37]
    reader = CsrRowReader(train_inputs["data"])
    np.testing.assert_array_equal(reader.read_dense(rows, columns), x[np.ix_(rows, columns)])
    np.testing.assert_array_equal(reader.read_dense(rows), x[rows])
    csr = reader.read_csr(rows)
    assert csr.dtype == ad.read_h5ad(train_inputs["data"]).X.dtype
    np.testing.assert_array_equal(csr.toarray(), x[rows])
    assert reader.read_csr(np.array([], dtype=int)).shape == (0, x.shape[1])
    reader.close()


@settings(max_examples=200, deadline=None)
@given(
    n_genes=st.integers(1, 300),
    max_len=st.integers(1, 64),
    data=st.data(),
)
def test_sample_genes_keeps_every_required_gene(n_genes, max_len, data):
    required = np.array(data.draw(st.lists(st.integers(0, n_genes - 1), max_size=20)), dtype=int)
    got = sample_genes(
        n_genes, required, max_len, np.random.default_rng(data.draw(st.integers(0, 2**32)))
    )
    assert len(got) == min(n_genes, max_len)
    assert len(np.unique(got)) == len(got)
    assert got.min() >= 0 and got.max() < n_genes
    if len(np.unique(required)) <= max_len:
        assert set(required) <= set(got)


def test_step_plan_splits_each_step_across_ranks_and_accumulation():
    rows = np.arange(1000, 1100)
    whole = StepPlan(seed=4, micro_batch=3, accumulation=4)
    parts = [StepPlan(4, 3, 2, world_size=2, rank=r) for r in (0, 1)]
    assert whole.steps_per_epoch(100) == parts[0].steps_per_epoch(100) == 8
    step = whole.step_rows(rows, epoch=2, step=5)
    assert np.array_equal(step, parts[1].step_rows(rows, 2, 5))
    pieces = [p.micro_rows(step, j) for p in parts for j in range(2)]
    assert sorted(np.concatenate(pieces)) == sorted(step)
    # Another epoch, another order; same epoch, same order.
    assert not np.array_equal(step, whole.step_rows(rows, epoch=3, step=5))


def test_batches_pair_controls_and_flag_the_sampled_target(train_inputs, train_cells):
    cells = train_cells
    x = ad.read_h5ad(train_inputs["data"]).X.toarray()
    genes = np.array(cells.match.genes)
    rows = cells.rows_of(None)
    plan = StepPlan(seed=1, micro_batch=8, accumulation=2)
    steps = TrainSteps(cells, rows, plan, epoch=0, start_step=0, max_seq_len=24)
    assert len(steps) == 2 * plan.steps_per_epoch(len(rows))
    n_flagged = 0
    for i in range(len(steps)):
        batch = steps[i]
        assert batch.values.shape == batch.target.shape == batch.pert_flags.shape == (8, 24)
        # Gene ids -> X columns through the vocabulary match.
        id_to_column = {
            int(v): c for c, v in zip(cells.input_columns, cells.input_ids, strict=True)
        }
        columns = np.array([id_to_column[int(g)] for g in batch.gene_ids])
        r = batch.rows.numpy()
        np.testing.assert_array_equal(batch.target.numpy(), x[np.ix_(r, columns)])
        np.testing.assert_array_equal(
            batch.values.numpy(), x[np.ix_(cells.control_row[r], columns)]
        )
        for k, row in enumerate(r):
            condition = cells.conditions[cells.cond_code[row]]
            sampled = set(genes[columns])
            in_vocab = set(genes[cells.match.matched])
            wanted = [g for g in perturbed_genes(condition) if g in in_vocab]
            targets = [g for g in perturbed_genes(condition) if g in sampled]
            # The perturbed gene is always in the sampled subset ...
            assert targets == wanted
            # ... and flagged exactly there.
            flagged = set(genes[columns[batch.pert_flags[k].numpy() == 1]])
            assert flagged == set(wanted)
            n_flagged += len(flagged)
    assert n_flagged > 0


def test_cells_with_targets_outside_the_vocabulary_are_skipped(train_cells):
    for condition in train_cells.unlearnable:
        assert condition != "ctrl"
    skipped = set(train_cells.unlearnable)
    kept = {train_cells.conditions[c] for c in train_cells.cond_code[train_cells.rows_of(None)]}
    assert not kept & skipped


def test_eval_batches_cover_every_gene_with_the_target_in_each_chunk(train_cells):
    cells = train_cells
    rows = cells.rows_of(None)[::7]
    batches = EvalBatches(cells, rows, batch_size=16, max_seq_len=50)
    seen: dict[int, set[int]] = {}
    for i in range(len(batches)):
        batch = batches[i]
        genes = cells.gene_index(batch.gene_ids)
        assert len(genes) <= 50 and len(set(genes)) == len(genes)
        assert set(cells.targets_of(batch.rows.numpy())) <= set(genes)
        for row in batch.rows.tolist():
            seen.setdefault(row, set()).update(genes.tolist())
    assert sorted(seen) == sorted(rows.tolist())
    assert all(len(g) == cells.n_input_genes for g in seen.values())


def test_an_unmeasured_target_in_the_vocabulary_is_a_flagged_virtual_input(unmeasured_inputs):
    """A perturbation whose target is not measured (a targeted panel, a knockout screen)
    trains: its token joins the input, flagged, with value 0, and is never scored."""
    _, var = read_annotations(unmeasured_inputs["data"])
    vocab = read_vocab(unmeasured_inputs["checkpoint"] / "vocab.json")
    match = match_genes(list(var.index), vocab)
    target = unmeasured_inputs["target"]
    tokens = unmeasured_tokens([target, "NOT_A_GENE"], match, vocab)
    assert tokens == {target: vocab[target]}
    cells = PerturbationCells(
        unmeasured_inputs["data"], unmeasured_inputs["pairing"], match, tokens
    )
    condition = f"{target}+ctrl"
    assert condition not in cells.unlearnable
    rows = cells.rows_of([condition])
    assert len(rows) > 0

    plan = StepPlan(seed=0, micro_batch=len(rows), accumulation=1)
    batch = TrainSteps(cells, rows, plan, 0, 0, 64)[0]
    virtual = ~batch.measured.numpy()
    assert virtual.sum() == 1 and len(batch.gene_ids) == 64  # 63 measured + the target
    assert int(batch.gene_ids[virtual][0]) == vocab[target]
    assert (batch.pert_flags[:, virtual] == 1).all() and (batch.pert_flags[:, ~virtual] == 0).all()
    assert (batch.values[:, virtual] == 0).all() and (batch.target[:, virtual] == 0).all()

    # Without the token the perturbation cannot be learnt and its cells are skipped.
    skipped = PerturbationCells(unmeasured_inputs["data"], unmeasured_inputs["pairing"], match)
    assert condition in skipped.unlearnable
    # Evaluation batches carry the virtual target in every gene chunk.
    for item in range(len(EvalBatches(cells, rows[:8], 8, 64))):
        assert (~EvalBatches(cells, rows[:8], 8, 64)[item].measured).sum() == 1
