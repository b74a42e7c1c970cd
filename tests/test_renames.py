"""Renamed gene symbols: data genes matched to the vocabulary under their current HGNC symbol,
measured on the real VCC gene list and the real scGPT whole-human vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scgpt_vcc.cli import main
from scgpt_vcc.data.genes import read_gene_list
from scgpt_vcc.errors import InputError
from scgpt_vcc.model.renames import (
    likely_renames,
    read_hgnc_table,
    read_renames,
    resolve_renames,
    vocab_match_report,
)
from scgpt_vcc.model.vocab import match_genes

REFERENCE = Path(__file__).resolve().parents[1] / "resources" / "reference"
VCC_GENES = read_gene_list(REFERENCE / "vcc_gene_names.csv")
VOCAB = json.loads((REFERENCE / "scgpt_human_vocab.json").read_text())
# 84 renames of VCC genes from HGNC's symbol changes, in HGNC's format (an excerpt written
# for the tests: the complete set cannot be downloaded here).
EXCERPT = Path(__file__).parent / "data" / "hgnc_vcc_renames.tsv"


def test_real_vcc_coverage_before_and_after_the_renames() -> None:
    before = vocab_match_report(VCC_GENES, VOCAB)
    assert (before["n_genes"], before["n_matched"]) == (18080, 17840)
    assert round(before["percent_matched"], 2) == 98.67
    # Without a table: the renames HGNC's systematic patterns make visible, not applied.
    likely = before["likely_renames"]
    assert likely["YARS"] == "YARS1" and likely["MARCH7"] == "MARCHF7"
    assert likely["MARC1"] == "MTARC1" and "H2AFZ" not in likely
    assert before["renames"] == {}

    after = vocab_match_report(VCC_GENES, VOCAB, EXCERPT)
    assert after["n_matched_exact"] == 17840
    assert after["n_matched"] == 17840 + 84
    assert round(after["percent_matched"], 2) == 99.14
    renames = after["renames"]
    assert renames["H2AFZ"] == "H2AZ1" and renames["HIST1H4C"] == "H4C3"
    assert renames["ADSS"] == "ADSS2" and renames["ADSSL1"] == "ADSS1"
    assert len(set(renames.values())) == len(renames)
    assert not set(renames.values()) & set(VCC_GENES)
    assert "YARS" not in after["unmatched"] and "AL391650.1" in after["unmatched"]


def _table(tmp_path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A table in HGNC's format: tab-separated, several values quoted and |-separated."""
    lines = ["hgnc_id\tsymbol\tname\talias_symbol\tprev_symbol"]
    lines += [f"HGNC:{i}\t{s}\tsome gene\t{a}\t{p}" for i, (s, a, p) in enumerate(rows)]
    path = tmp_path / "hgnc_complete_set.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_only_unambiguous_renames_are_used(tmp_path: Path) -> None:
    table = read_hgnc_table(
        _table(
            tmp_path,
            [
                ("NEW1", "", '"OLD1|OLDER1"'),  # OLD1 -> NEW1
                ("NEW2", "OLD2", ""),  # alias only
                ("NEW3", "", "OLD3"),  # OLD3 claimed by two current symbols
                ("NEW3B", "", "OLD3"),
                ("NEW4", "", "OLD4"),  # NEW4 is itself a data gene
                ("NEW5", "", "OLD5"),  # two data genes map to NEW5
                ("NEW5", "", "OLD5B"),
                ("NEW6", "OLD6", "X"),  # an alias of a symbol outside the vocabulary
                ("NEW7", "OLD7", ""),  # previous symbol beats alias
                ("NEW7B", "", "OLD7"),
            ],
        )
    )
    vocab = {s: i for i, s in enumerate(
        ["NEW1", "NEW2", "NEW3", "NEW3B", "NEW4", "NEW5", "NEW7", "NEW7B", "KEPT"]
    )}  # fmt: skip
    genes = ["OLD1", "OLD2", "OLD3", "OLD4", "NEW4", "OLD5", "OLD5B", "OLD6", "OLD7", "KEPT"]
    renames, refused = resolve_renames(genes, vocab, table)
    assert renames == {"OLD1": "NEW1", "OLD2": "NEW2", "OLD7": "NEW7B"}
    assert set(refused) == {"OLD3", "OLD4", "OLD5", "OLD5B"}
    assert "several vocabulary symbols" in refused["OLD3"]
    assert "itself a data gene" in refused["OLD4"]
    assert "claimed by several data genes" in refused["OLD5"]
    # The data keep their names; the renamed genes get their new symbol's token.
    match = match_genes(genes, vocab, renames=renames)
    assert match.genes == tuple(genes)
    assert list(match.vocab_ids) == [0, 1, -1, -1, 4, -1, -1, -1, 7, 8]


def test_a_table_without_its_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "symbols.tsv"
    path.write_text("symbol\tname\nA\ta gene\n")
    with pytest.raises(InputError, match="prev_symbol, alias_symbol: column missing"):
        read_hgnc_table(path)


def test_likely_renames_need_the_new_symbol_in_the_vocabulary() -> None:
    vocab = {"YARS1": 0, "SEPTIN7": 1, "MARCHF2": 2}
    genes = ["YARS", "SEPT7", "MARCH2", "MARCHF2", "CARS"]
    assert likely_renames(genes, vocab) == {"YARS": "YARS1", "SEPT7": "SEPTIN7"}


def test_cli_writes_the_match_that_training_reads(tmp_path: Path) -> None:
    genes = ["YARS", "MARCH7", "H2AFZ", "TP53", "AL391650.1"]
    var = pd.DataFrame(index=genes)
    ad.AnnData(np.zeros((2, 5), np.float32), var=var).write_h5ad(tmp_path / "data.h5ad")
    vocab = tmp_path / "vocab.json"
    vocab.write_text(
        json.dumps({g: i for i, g in enumerate(["YARS1", "MARCHF7", "H2AZ1", "TP53", "<pad>"])})
    )
    output = tmp_path / "vocab_match.json"
    args = ["match-vocabulary", str(tmp_path / "data.h5ad"), str(vocab), str(output)]
    assert main([*args, "--hgnc-table", str(EXCERPT)]) == 0
    assert read_renames(output) == {"YARS": "YARS1", "MARCH7": "MARCHF7", "H2AFZ": "H2AZ1"}
    assert json.loads(output.read_text())["n_matched"] == 4
    assert main(args) == 0  # no table: nothing renamed, likely renames listed
    report = json.loads(output.read_text())
    assert read_renames(output) == {} and report["likely_renames"] == {
        "YARS": "YARS1",
        "MARCH7": "MARCHF7",
    }
    assert read_renames(None) == {}
