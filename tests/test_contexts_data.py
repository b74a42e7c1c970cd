"""Several cell contexts (cell lines) in one dataset, through the data stages.

Each context's perturbations are ranked against that context's control cells, as GEARS
does per covariate, and paired with that context's controls. The reference is GEARS's
own ``get_DE_genes`` (per covariate) and, for the non-zero and non-dropout sets, GEARS
run on each context's cells alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scgpt_vcc.cli import main
from scgpt_vcc.data.convert import convert_to_gears
from scgpt_vcc.data.de import compute_de, load_stats
from scgpt_vcc.data.gears import CONTEXT
from scgpt_vcc.data.graphs import CellGraphBuilder
from scgpt_vcc.data.pairing import draw_control_rows, read_pairing, write_pairing
from scgpt_vcc.data.qc import qc_report
from scgpt_vcc.errors import InputError
from scgpt_vcc.model.vocab import SPECIAL_TOKENS, match_genes
from scgpt_vcc.predict.run import PredictSettings
from scgpt_vcc.submission import SubmissionSettings, make_submission
from scgpt_vcc.train.batches import EvalBatches, PerturbationCells
from scgpt_vcc.train.validation import condition_means, control_means, pearson_delta

gears_utils = pytest.importorskip("gears.data_utils")

GENES = [f"G{i}" for i in range(30)]
CONTEXTS = ("K562", "HepG2")
NT = "non-targeting"
N_CONTROL, N_PERTURBED = 40, 30
# G1's effect differs: in K562 it knocks G1 down to 10% and raises G10, in HepG2 it
# knocks G1 down to 50% and raises G20. G2 does the same in both.
EFFECTS = {
    ("K562", "G1"): {"G1": 0.1, "G10": 6.0},
    ("HepG2", "G1"): {"G1": 0.5, "G20": 6.0},
    ("K562", "G2"): {"G2": 0.2, "G15": 3.0, "G28": 0.0},  # G28: a dropout in K562
    ("HepG2", "G2"): {"G2": 0.2, "G15": 3.0},
}
SEED = 1


def _rates(context: str, target: str, base: np.ndarray) -> np.ndarray:
    rates = base.copy()
    if context == "HepG2":
        rates[3:7] *= 4  # other baselines: ranked against pooled controls, these would top
        rates[GENES.index("G1")] = 3.0
    else:
        rates[GENES.index("G29")] = 0  # never expressed in K562: a "true zero" there
        rates[GENES.index("G1")] = 10.0
    for gene, factor in EFFECTS.get((context, target), {}).items():
        rates[GENES.index(gene)] *= factor
    return rates


def two_context_counts(path: Path) -> Path:
    """Raw counts of two contexts in ``obs['cell_line']``, rows interleaved at random."""
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 8, len(GENES))
    rows, obs = [], []
    for context in CONTEXTS:
        for target, n in ((NT, N_CONTROL), ("G1", N_PERTURBED), ("G2", N_PERTURBED)):
            rows.append(rng.poisson(_rates(context, target, base), size=(n, len(GENES))))
            obs += [(target, context)] * n
    order = rng.permutation(len(obs))
    counts = np.vstack(rows)[order].astype(np.float32)
    frame = pd.DataFrame(
        [obs[i] for i in order],
        columns=["target_gene", "cell_line"],
        index=[f"c{i}" for i in range(len(obs))],
    )
    adata = ad.AnnData(sp.csr_matrix(counts), obs=frame, var=pd.DataFrame(index=GENES))
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contexts")
    raw = two_context_counts(root / "raw.h5ad")
    out = {"raw": raw, "converted": root / "converted.h5ad"}
    convert_to_gears(raw, out["converted"], context_column="cell_line", chunk_size=64)
    out.update(processed=root / "processed.h5ad", stats=root / "stats.npz")
    compute_de(out["converted"], out["processed"], out["stats"], chunk_size=50)
    out["pairing"] = root / f"pairing_seed{SEED}.npz"
    write_pairing(out["processed"], out["pairing"], SEED)
    return out


def _name(context: str, target: str) -> str:
    return f"{context}_{target}+ctrl_1+1"


def test_each_cell_keeps_its_context(stages: dict[str, Path]) -> None:
    raw = ad.read_h5ad(stages["raw"])
    converted = ad.read_h5ad(stages["converted"])
    assert list(converted.obs_names) == list(raw.obs_names)
    assert converted.obs[CONTEXT].dtype == "category"
    assert list(converted.obs[CONTEXT]) == list(raw.obs["cell_line"])
    assert set(converted.obs[CONTEXT].cat.categories) == set(CONTEXTS)
    assert converted.uns["scgpt_vcc"]["context_column"] == "cell_line"
    assert converted.uns["scgpt_vcc"]["n_perturbations"] == 2


def test_cli_takes_the_context_column(stages: dict[str, Path], tmp_path: Path) -> None:
    args = ["convert-to-gears", str(stages["raw"]), str(tmp_path / "out.h5ad")]
    assert main([*args, "--context-column", "cell_line"]) == 0
    obs = ad.read_h5ad(tmp_path / "out.h5ad").obs
    pd.testing.assert_series_equal(obs[CONTEXT], ad.read_h5ad(stages["converted"]).obs[CONTEXT])
    assert main([*args, "--context-column", "none", "--cell-type", "HeLa"]) == 0
    assert set(ad.read_h5ad(tmp_path / "out.h5ad").obs[CONTEXT]) == {"HeLa"}


def _gears_reference(adata: ad.AnnData) -> ad.AnnData:
    adata = adata.copy()
    del adata.layers["counts"]
    adata = gears_utils.get_DE_genes(adata, False)
    return gears_utils.get_dropout_non_zero_genes(adata)


def test_rankings_are_against_each_contexts_controls(stages: dict[str, Path]) -> None:
    """GEARS's rank_genes_groups_by_cov: same keys, same rankings."""
    ours = ad.read_h5ad(stages["processed"])
    theirs = gears_utils.get_DE_genes(ad.read_h5ad(stages["converted"]), False)
    key = "rank_genes_groups_cov_all"
    assert sorted(ours.uns[key]) == sorted(theirs.uns[key])  # h5ad groups read back sorted
    assert len(ours.uns[key]) == 4
    for name, genes in theirs.uns[key].items():
        np.testing.assert_array_equal(ours.uns[key][name], genes, err_msg=name)
    pd.testing.assert_frame_equal(ours.obs, theirs.obs)
    # the planted effects, each in its own context only
    top = {name: list(genes[:3]) for name, genes in ours.uns[key].items()}
    assert "G10" in top[_name("K562", "G1")] and "G10" not in top[_name("HepG2", "G1")]
    assert "G20" in top[_name("HepG2", "G1")] and "G20" not in top[_name("K562", "G1")]
    for baseline in ("G3", "G4", "G5", "G6"):  # context differences are no effect
        assert baseline not in top[_name("HepG2", "G1")]


def test_non_zero_and_dropout_sets_use_each_contexts_control(stages: dict[str, Path]) -> None:
    """Equal to GEARS run on each context's cells alone."""
    ours = ad.read_h5ad(stages["processed"])
    converted = ad.read_h5ad(stages["converted"])
    keys = ("top_non_dropout_de_20", "top_non_zero_de_20", "non_zeros_gene_idx")
    for context in CONTEXTS:
        reference = _gears_reference(converted[converted.obs[CONTEXT] == context])
        assert len(reference.uns["non_dropout_gene_idx"]) == 2
        for name, value in reference.uns["non_dropout_gene_idx"].items():
            # GEARS appends the true zeros after the non-zeros; ours are in gene order
            np.testing.assert_array_equal(ours.uns["non_dropout_gene_idx"][name], np.sort(value))
            for key in keys:
                np.testing.assert_array_equal(ours.uns[key][name], reference.uns[key][name])
    g28, g29 = GENES.index("G28"), GENES.index("G29")
    k562_g2 = _name("K562", "G2")
    assert g29 in ours.uns["non_dropout_gene_idx"][k562_g2]  # zero in K562's controls too
    assert g29 not in ours.uns["non_zeros_gene_idx"][k562_g2]
    assert g28 not in ours.uns["non_dropout_gene_idx"][k562_g2]  # expressed in its controls
    assert g28 in ours.uns["non_dropout_gene_idx"][_name("HepG2", "G2")]


def test_stats_rows_are_context_and_condition(stages: dict[str, Path]) -> None:
    stats = load_stats(stages["stats"])
    adata = ad.read_h5ad(stages["converted"])
    x = adata.X.toarray().astype(np.float64)
    obs = adata.obs
    expected = sorted((c, k) for c in CONTEXTS for k in ("ctrl", "G1+ctrl", "G2+ctrl"))
    rows = list(zip(stats["contexts"].tolist(), stats["conditions"].tolist(), strict=True))
    assert rows == expected
    assert stats["condition_names"].tolist() == [
        f"{c}_{k}_{'1' if k == 'ctrl' else '1+1'}" for c, k in expected
    ]
    for row, (context, condition) in enumerate(rows):
        cells = ((obs[CONTEXT] == context) & (obs["condition"] == condition)).to_numpy()
        assert stats["n_cells"][row] == cells.sum()
        np.testing.assert_allclose(stats["mean"][row], x[cells].mean(axis=0), rtol=1e-6)


def test_controls_are_paired_within_their_context(stages: dict[str, Path]) -> None:
    obs = ad.read_h5ad(stages["processed"], backed="r").obs
    rows = read_pairing(stages["pairing"], len(obs))
    condition = obs["condition"].astype(str).to_numpy()
    context = obs[CONTEXT].astype(str).to_numpy()
    assert (condition[rows] == "ctrl").all()
    assert (context[rows] == context).all()
    ctrl = np.flatnonzero(condition == "ctrl")
    np.testing.assert_array_equal(rows[ctrl], ctrl)
    for name in CONTEXTS:  # draws spread over each context's controls
        perturbed = (condition != "ctrl") & (context == name)
        assert len(np.unique(rows[perturbed])) > N_CONTROL // 2


def test_one_context_column_draws_as_without_contexts(stages: dict[str, Path]) -> None:
    obs = ad.read_h5ad(stages["processed"], backed="r").obs
    one = pd.Series(["K562"] * len(obs), index=obs.index)
    np.testing.assert_array_equal(
        draw_control_rows(obs["condition"], SEED, one), draw_control_rows(obs["condition"], SEED)
    )
    with pytest.raises(ValueError, match=r"no 'ctrl' cells to pair with in the contexts \['B'\]"):
        draw_control_rows(pd.Series(["ctrl", "G1+ctrl", "G1+ctrl"]), SEED, pd.Series(list("ABB")))


def test_cell_graphs_take_de_genes_of_their_context(stages: dict[str, Path]) -> None:
    processed = ad.read_h5ad(stages["processed"])
    top = processed.uns["rank_genes_groups_cov_all"]
    rows = read_pairing(stages["pairing"], processed.n_obs)
    builder = CellGraphBuilder(stages["processed"], stages["pairing"], ["G1", "G2"])
    try:
        de = {}
        for context in CONTEXTS:
            cells = processed.obs[CONTEXT].eq(context) & processed.obs["condition"].eq("G1+ctrl")
            row = int(np.flatnonzero(cells.to_numpy())[0])
            graph = builder.graph(row)
            expected = np.flatnonzero(processed.var_names.isin(top[_name(context, "G1")][:20]))
            np.testing.assert_array_equal(graph.de_idx, expected)
            np.testing.assert_array_equal(
                graph.x.numpy().ravel(), processed.X[rows[row]].toarray()[0]
            )
            de[context] = set(np.asarray(graph.de_idx).tolist())
    finally:
        builder.close()
    assert de["K562"] != de["HepG2"]


def test_knockdown_against_each_contexts_controls(stages: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text(json.dumps({g: i for i, g in enumerate(GENES)}))
    report = qc_report(stages["stats"], tmp_path / "vocab.json", min_cells=2 * N_PERTURBED + 1)
    adata = ad.read_h5ad(stages["processed"])
    counts = np.expm1(adata.X.toarray().astype(np.float64))
    obs = adata.obs
    assert set(report["knockdown"]) == {_name(c, g) for c in CONTEXTS for g in ("G1", "G2")}
    for context in CONTEXTS:
        in_context = obs[CONTEXT].eq(context).to_numpy()
        ctrl = counts[in_context & obs["condition"].eq("ctrl").to_numpy()]
        for gene in ("G1", "G2"):
            g = GENES.index(gene)
            perturbed = counts[in_context & obs["condition"].eq(f"{gene}+ctrl").to_numpy()]
            row = report["knockdown"][_name(context, gene)]
            base = ctrl[:, g].mean()
            assert row["target_mean_normalized_counts_control"] == pytest.approx(base, rel=1e-5)
            assert row["knockdown"] == pytest.approx(1 - perturbed[:, g].mean() / base, rel=1e-4)
    assert report["knockdown"][_name("K562", "G1")]["knockdown"] > 0.8
    assert report["knockdown"][_name("HepG2", "G1")]["knockdown"] < 0.7
    # a perturbation is one condition, whatever its contexts
    assert report["cells_per_perturbation"] == {"G1+ctrl": 2 * N_PERTURBED, "G2+ctrl": 60}
    assert report["n_perturbations"] == 2 and report["n_control_cells"] == 2 * N_CONTROL
    assert report["n_cells"] == 2 * (N_CONTROL + 2 * N_PERTURBED)
    assert report["below_min_cells"] == report["cells_per_perturbation"]


def _raw(tmp_path: Path, contexts: list[object], targets: list[str] | None = None) -> Path:
    targets = targets or [NT, "G1"] * (len(contexts) // 2)
    obs = pd.DataFrame(
        {"target_gene": targets, "cell_line": contexts},
        index=[f"c{i}" for i in range(len(contexts))],
    )
    x = sp.csr_matrix(np.ones((len(contexts), 3), dtype=np.float32))
    path = tmp_path / "in.h5ad"
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=GENES[:3])).write_h5ad(path)
    return path


def test_missing_context_column_is_named(tmp_path: Path) -> None:
    path = _raw(tmp_path, ["A"] * 4)
    with pytest.raises(InputError, match=r"obs\['line'\]: no such column") as err:
        convert_to_gears(path, tmp_path / "out.h5ad", context_column="line")
    assert "cell_line" in str(err.value) and "context_column" in str(err.value)
    assert not (tmp_path / "out.h5ad").exists()


@pytest.mark.parametrize("blank", [np.nan, None, "", "  "], ids=["nan", "none", "empty", "blank"])
def test_cells_without_context_are_refused(tmp_path: Path, blank: object) -> None:
    path = _raw(tmp_path, ["A", "A", blank, "B"])
    with pytest.raises(InputError, match=r"obs\['cell_line'\]: 1 cells have no context"):
        convert_to_gears(path, tmp_path / "out.h5ad", context_column="cell_line")
    assert not (tmp_path / "out.h5ad").exists()


def test_a_blank_context_of_a_cell_left_out_is_no_error(tmp_path: Path) -> None:
    path = _raw(tmp_path, ["A", "A", None, "A"], [NT, "G1", "unassigned", "G1"])
    convert_to_gears(
        path, tmp_path / "out.h5ad", context_column="cell_line", exclude_labels=["unassigned"]
    )
    assert list(ad.read_h5ad(tmp_path / "out.h5ad").obs[CONTEXT]) == ["A"] * 3


def test_contexts_with_underscores_are_refused(tmp_path: Path) -> None:
    path = _raw(tmp_path, ["A", "A", "K_562", "K_562"])
    with pytest.raises(InputError, match=r"contexts \['K_562'\] contain '_'"):
        convert_to_gears(path, tmp_path / "out.h5ad", context_column="cell_line")


def test_a_context_without_controls_is_named(tmp_path: Path) -> None:
    path = _raw(tmp_path, ["A", "A", "A", "A", "B", "B"], [NT, "G1", NT, "G1", "G1", "G1"])
    convert_to_gears(path, tmp_path / "conv.h5ad", context_column="cell_line")
    with pytest.raises(InputError, match=r"no 'ctrl' cells in the contexts.*\['B'\]"):
        compute_de(tmp_path / "conv.h5ad", tmp_path / "p.h5ad", tmp_path / "s.npz")
    assert not (tmp_path / "p.h5ad").exists() and not (tmp_path / "s.npz").exists()


def test_a_submission_of_several_contexts_is_refused(
    stages: dict[str, Path], tmp_path: Path
) -> None:
    """A VCC submission holds one cell context; the workflow makes none for several."""
    with pytest.raises(InputError, match=r"obs.cell_type.*2 cell contexts.*context_column"):
        make_submission(
            stages["processed"],
            tmp_path / "split.pkl",
            tmp_path / "counts.csv",
            tmp_path / "genes.csv",
            tmp_path / "out",
            SubmissionSettings(model_type="control"),
            PredictSettings(),
        )
    assert not (tmp_path / "out").exists()


class PairedControl(torch.nn.Module):
    """A model that predicts each cell as its paired control cell (its input values)."""

    def forward(self, ids: torch.Tensor, values: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        return values


def test_model_selection_compares_each_context_with_its_own_controls(
    stages: dict[str, Path],
) -> None:
    processed = ad.read_h5ad(stages["processed"])
    genes = list(processed.var_names)
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *genes])}
    cells = PerturbationCells(stages["processed"], stages["pairing"], match_genes(genes, vocab))
    assert cells.contexts == sorted(CONTEXTS)
    rows = cells.rows_of([c for c in cells.conditions if c != "ctrl"])
    batches = EvalBatches(cells, rows, batch_size=16, max_seq_len=12)
    pred, true, group_context = condition_means(
        PairedControl(), cells, rows, batches, torch.device("cpu"), None
    )
    x = processed.X.toarray()[:, cells.input_columns]
    context = processed.obs[CONTEXT].astype(str).to_numpy()
    condition = processed.obs["condition"].astype(str).to_numpy()
    groups = sorted({(condition[r], context[r]) for r in rows})  # condition-major, as coded
    assert [cells.contexts[c] for c in group_context] == [ctx for _, ctx in groups]
    for g, (cond, ctx) in enumerate(groups):
        members = np.flatnonzero((condition == cond) & (context == ctx))
        np.testing.assert_allclose(true[g], x[members].mean(0), atol=1e-5)
        np.testing.assert_allclose(pred[g], x[cells.control_row[members]].mean(0), atol=1e-5)

    controls = control_means(cells)
    for code, ctx in enumerate(cells.contexts):
        mine = (condition == "ctrl") & (context == ctx)
        np.testing.assert_allclose(controls[code], x[mine].mean(0), atol=1e-5)

    def expected(keep: np.ndarray) -> float:  # per context, then over contexts
        pearsons = [
            np.corrcoef(pred[g] - controls[group_context[g]], true[g] - controls[group_context[g]])
            for g in keep
        ]
        by_context = [
            np.mean([r[0, 1] for r, g in zip(pearsons, keep, strict=True) if group_context[g] == c])
            for c in np.unique(group_context[keep])
        ]
        return float(np.mean(by_context))

    value = pearson_delta(pred, true, controls, group_context)
    assert value == pytest.approx(expected(np.arange(len(groups))), abs=1e-9)
    odd = np.arange(1, len(groups))  # one context has a group fewer: contexts weigh the same
    assert pearson_delta(pred[odd], true[odd], controls, group_context[odd]) == pytest.approx(
        expected(odd), abs=1e-9
    )
    # One pooled control for every group measures something else.
    pooled = torch.as_tensor(x[condition == "ctrl"].mean(0), dtype=torch.float64)
    assert pearson_delta(pred, true, pooled[None], np.zeros_like(group_context)) != pytest.approx(
        value, abs=1e-3
    )
