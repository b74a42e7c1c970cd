"""Tests of the scGPT model module: checkpoint format, loading, errors and upstream parity.

The parity tests use scgpt 0.2.4 (``pip install --no-deps scgpt==0.2.4``) as an oracle.
Its package ``__init__`` cannot run on current torch (torchtext), so its model module is
imported under a bare ``scgpt`` package object; if it is not installed the tests fail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scgpt_vcc.errors import InputError
from scgpt_vcc.model import (
    TransformerGenerator,
    load_finetuned,
    load_pretrained,
    match_genes,
    save_checkpoint,
    write_random_checkpoint,
)
from scgpt_vcc.model.checkpoint import read_state_dict, scgpt_human_args
from tests.references import upstream_scgpt

GENES = [f"GENE{i:04d}" for i in range(400)]
SPECIALS = ["<pad>", "<cls>", "<eoc>"]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "scGPT_human"
    write_random_checkpoint(out, GENES, embsize=32, nlayers=2, nheads=4, d_hid=48, seed=3)
    return out


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("args.json", "vocab.json", "best_model.pt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _inputs(
    model: TransformerGenerator, batch: int = 3, length: int = 40, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(
        [torch.randperm(model.ntoken - 3, generator=g)[:length] for _ in range(batch)]
    )
    values = torch.rand(batch, length, generator=g) * 4
    values[values < 1.5] = 0.0  # sparse-looking log1p input
    flags = torch.zeros(batch, length, dtype=torch.long)
    flags[torch.arange(batch), torch.randint(0, length, (batch,), generator=g)] = 1
    return ids, values, flags


# --------------------------------------------------------------------------- format


def test_random_checkpoint_matches_whole_human_format(ckpt_dir: Path) -> None:
    args = json.loads((ckpt_dir / "args.json").read_text())
    assert list(args) == list(scgpt_human_args())
    assert len(args) == 47  # the released file's keys
    assert {"embsize", "nheads", "d_hid", "nlayers", "n_layers_cls", "pad_value"} <= set(args)
    assert (args["embsize"], args["nheads"], args["d_hid"], args["nlayers"]) == (32, 4, 48, 2)
    assert (args["n_layers_cls"], args["n_bins"], args["pad_token"]) == (3, 51, "<pad>")

    vocab = json.loads((ckpt_dir / "vocab.json").read_text())
    n = len(vocab)
    assert sorted(vocab.values()) == list(range(n))
    assert [vocab[s] for s in SPECIALS] == [n - 3, n - 2, n - 1]
    data_genes = [g for g in vocab if g in set(GENES)]
    assert len(data_genes) == round(0.95 * len(GENES))
    extras = [g for g in vocab if g not in set(GENES) and g not in SPECIALS]
    assert len(extras) == 200 and all(g.startswith("LOC") for g in extras)
    # data genes are shuffled, not in input order, and interleaved with the extras
    assert data_genes != sorted(data_genes, key=GENES.index)
    assert max(vocab[g] for g in extras) > min(vocab[g] for g in data_genes)

    state = torch.load(ckpt_dir / "best_model.pt", weights_only=True)
    keys = list(state)
    assert not any("in_proj" in k for k in keys)
    for i in range(2):
        assert state[f"transformer_encoder.layers.{i}.self_attn.Wqkv.weight"].shape == (96, 32)
        assert state[f"transformer_encoder.layers.{i}.self_attn.Wqkv.bias"].shape == (96,)
        assert state[f"transformer_encoder.layers.{i}.linear1.weight"].shape == (48, 32)
    assert state["encoder.embedding.weight"].shape == (n, 32)
    assert state["flag_encoder.weight"].shape == (2, 32)
    assert state["decoder.fc.4.weight"].shape == (1, 32)
    assert {"mvc_decoder.gene2query.weight", "mvc_decoder.W.weight"} <= set(keys)
    assert not any(k.startswith(("pert_encoder", "cls_decoder", "decoder.coeff")) for k in keys)
    assert not any(k.startswith("transformer_encoder.layers.2.") for k in keys)


def test_random_checkpoint_is_deterministic(tmp_path: Path) -> None:
    write_random_checkpoint(tmp_path / "a", GENES[:50], seed=7, extra_vocab_genes=5)
    write_random_checkpoint(tmp_path / "b", GENES[:50], seed=7, extra_vocab_genes=5)
    write_random_checkpoint(tmp_path / "c", GENES[:50], seed=8, extra_vocab_genes=5)
    for name in ("vocab.json", "args.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    a, b, c = (read_state_dict(tmp_path / x / "best_model.pt") for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.embedding.weight"], c["encoder.embedding.weight"])
    assert not list(tmp_path.glob("*/.*tmp*"))  # atomic writes leave no temporaries


# --------------------------------------------------------------------------- loading


def test_load_pretrained_loads_prefixes_and_logs(
    ckpt_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="scgpt_vcc.model.loading"):
        model = load_pretrained(ckpt_dir)
    state = read_state_dict(ckpt_dir / "best_model.pt")
    ours = model.state_dict()
    w = "transformer_encoder.layers.1.self_attn"
    assert torch.equal(ours[f"{w}.in_proj_weight"], state[f"{w}.Wqkv.weight"])
    assert torch.equal(ours[f"{w}.in_proj_bias"], state[f"{w}.Wqkv.bias"])
    assert torch.equal(ours["encoder.embedding.weight"], state["encoder.embedding.weight"])
    assert torch.equal(ours["value_encoder.norm.bias"], state["value_encoder.norm.bias"])
    assert model.pad_token_id == len(json.loads((ckpt_dir / "vocab.json").read_text())) - 3

    text = caplog.text
    assert f"loaded {w}.in_proj_weight 96x32" in text
    assert "loaded encoder.embedding.weight" in text
    skipped = "skipped (not under encoder/value_encoder/transformer_encoder)"
    assert f"{skipped} decoder.fc.0.weight 32x32" in text
    assert "flag_encoder.weight 2x32" in text and "mvc_decoder.W.weight 32x32" in text
    assert "re-initialised (not in checkpoint selection) pert_encoder.weight 3x32" in text
    assert "decoder.coeff_decoder.fc.0.weight 32x32" in text
    assert "loaded 33 tensors" in text and "skipped 10 checkpoint tensors" in text


def test_load_pretrained_with_other_prefixes(ckpt_dir: Path) -> None:
    model = load_pretrained(ckpt_dir, load_prefixes=("encoder",))
    state = read_state_dict(ckpt_dir / "best_model.pt")
    assert torch.equal(
        model.state_dict()["encoder.enc_norm.weight"], state["encoder.enc_norm.weight"]
    )
    # "encoder" must not select value_encoder.* (prefix is matched per module path)
    assert not torch.equal(
        model.state_dict()["value_encoder.norm.weight"], state["value_encoder.norm.weight"]
    )


def test_load_pretrained_rejects_vocab_size_mismatch(ckpt_dir: Path, tmp_path: Path) -> None:
    bad = _copy_ckpt(ckpt_dir, tmp_path / "bad")
    vocab = json.loads((bad / "vocab.json").read_text())
    names = sorted(vocab, key=vocab.get)[1:]  # drop one gene, keep ids contiguous
    (bad / "vocab.json").write_text(json.dumps({g: i for i, g in enumerate(names)}))
    with pytest.raises(InputError) as err:
        load_pretrained(bad)
    msg = str(err.value)
    assert "best_model.pt" in msg and "encoder.embedding.weight" in msg
    assert f"{len(vocab)}x32" in msg and f"{len(vocab) - 1}x32" in msg
    assert "Fix:" in msg and "vocab.json" in err.value.fix


def test_load_pretrained_rejects_layer_count_mismatch(ckpt_dir: Path, tmp_path: Path) -> None:
    bad = _copy_ckpt(ckpt_dir, tmp_path / "bad")
    args = json.loads((bad / "args.json").read_text())
    (bad / "args.json").write_text(json.dumps({**args, "nlayers": 3}))
    with pytest.raises(InputError, match=r"layers\.2\..*is missing"):
        load_pretrained(bad)
    (bad / "args.json").write_text(json.dumps({**args, "nlayers": 1}))
    with pytest.raises(InputError, match=r"layers\.1\..*no counterpart"):
        load_pretrained(bad)


@pytest.mark.parametrize("missing", ["args.json", "vocab.json", "best_model.pt"])
def test_load_pretrained_rejects_incomplete_folder(
    ckpt_dir: Path, tmp_path: Path, missing: str
) -> None:
    bad = _copy_ckpt(ckpt_dir, tmp_path / "bad")
    (bad / missing).unlink()
    with pytest.raises(InputError, match="is missing") as err:
        load_pretrained(bad)
    assert err.value.path.endswith(missing)
    with pytest.raises(InputError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("field", ["embsize", "nlayers", "pad_token"])
def test_load_pretrained_rejects_args_without_field(
    ckpt_dir: Path, tmp_path: Path, field: str
) -> None:
    bad = _copy_ckpt(ckpt_dir, tmp_path / "bad")
    args = json.loads((bad / "args.json").read_text())
    del args[field]
    (bad / "args.json").write_text(json.dumps(args))
    with pytest.raises(InputError) as err:
        load_pretrained(bad)
    assert err.value.field == field and err.value.path.endswith("args.json")


@pytest.mark.parametrize("content", ["list", "garbage", "module"])
def test_load_pretrained_rejects_non_state_dict(
    ckpt_dir: Path, tmp_path: Path, content: str
) -> None:
    bad = _copy_ckpt(ckpt_dir, tmp_path / "bad")
    path = bad / "best_model.pt"
    if content == "list":
        torch.save([torch.zeros(2)], path)
    elif content == "garbage":
        path.write_bytes(b"not a torch file")
    else:
        torch.save(torch.nn.Linear(2, 2), path)  # whole pickled module, not a state dict
    with pytest.raises(InputError) as err:
        load_pretrained(bad)
    assert err.value.path.endswith("best_model.pt")


def test_save_checkpoint_round_trip(ckpt_dir: Path, tmp_path: Path) -> None:
    model = load_pretrained(ckpt_dir).eval()
    vocab = json.loads((ckpt_dir / "vocab.json").read_text())
    args = json.loads((ckpt_dir / "args.json").read_text())
    save_checkpoint(model, tmp_path / "ft", vocab, args)
    assert json.loads((tmp_path / "ft" / "vocab.json").read_text()) == vocab
    assert tuple(json.loads((tmp_path / "ft" / "args.json").read_text())) == tuple(args)
    again = load_finetuned(tmp_path / "ft").eval()
    ids, values, flags = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model(ids, values, flags), again(ids, values, flags))
    with pytest.raises(ValueError, match="disagree"):
        save_checkpoint(model, tmp_path / "x", vocab, {**args, "nlayers": 5})


def test_pretrained_and_finetuned_folders_cannot_be_swapped(ckpt_dir: Path, tmp_path: Path) -> None:
    """Loading a trained folder as pretrained would re-initialise its decoder; loading the
    pretrained checkpoint as finetuned would leave the perturbation encoder random."""
    model = load_pretrained(ckpt_dir)
    vocab = json.loads((ckpt_dir / "vocab.json").read_text())
    save_checkpoint(model, tmp_path / "ft", vocab, json.loads((ckpt_dir / "args.json").read_text()))
    with pytest.raises(InputError, match="finetuned perturbation model") as err:
        load_pretrained(tmp_path / "ft")
    assert err.value.field == "pert_encoder.weight" and "load_finetuned" in err.value.fix
    with pytest.raises(InputError, match="no counterpart"):
        load_finetuned(ckpt_dir)  # pretraining-only heads, no perturbation encoder
    finetuned = load_finetuned(tmp_path / "ft")
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), finetuned.state_dict().values(), strict=True)
    )


# --------------------------------------------------------------------------- model


def test_forward_padding_and_sdpa(ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_pretrained(ckpt_dir).eval()
    ids, values, flags = _inputs(model, batch=2, length=30)
    calls: list[object] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        out = model(ids, values, flags)
        assert out.shape == (2, 30) and out.dtype == torch.float32
        no_pad = torch.zeros_like(ids, dtype=torch.bool)
        assert torch.equal(model(ids, values, flags, no_pad), out)
        assert calls == [None] * 4  # 2 layers x 2 calls, never a mask without padding

        # appending padded positions must not change the real positions' predictions
        pad = torch.full((2, 7), model.pad_token_id)
        padded = model(
            torch.cat([ids, pad], 1),
            torch.cat([values, torch.rand(2, 7) * 5], 1),
            torch.cat([flags, torch.zeros(2, 7, dtype=torch.long)], 1),
            torch.cat([no_pad, torch.ones(2, 7, dtype=torch.bool)], 1),
        )
    assert calls[-1] is not None
    torch.testing.assert_close(padded[:, :30], out, atol=1e-5, rtol=1e-5)
    # the perturbation flag changes the prediction
    with torch.no_grad():
        assert not torch.allclose(model(ids, values, torch.zeros_like(flags)), out)


def test_autocast_bfloat16(ckpt_dir: Path) -> None:
    model = load_pretrained(ckpt_dir).eval()
    ids, values, flags = _inputs(model)
    with torch.no_grad():
        ref = model(ids, values, flags)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids, values, flags)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_training_step_reduces_loss(ckpt_dir: Path) -> None:
    torch.manual_seed(0)
    model = load_pretrained(ckpt_dir, dropout=0.1).train()
    ids, values, flags = _inputs(model)
    target = values + 0.5 * flags
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.mse_loss(model(ids, values, flags), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.pert_encoder.weight.grad[0].abs().sum() == 0  # pad flag stays frozen


def test_match_genes_reports_unmatched(caplog: pytest.LogCaptureFixture) -> None:
    vocab = {"A": 0, "B": 1, "C": 2, "<pad>": 3, "<cls>": 4, "<eoc>": 5}
    with caplog.at_level(logging.INFO, logger="scgpt_vcc.model.vocab"):
        m = match_genes(["C", "X", "A", "<pad>", "b"], vocab)
    assert m.vocab_ids.tolist() == [2, -1, 0, -1, -1]
    assert m.input_positions.tolist() == [0, 2] and m.input_ids.tolist() == [2, 0]
    assert (m.n_matched, m.n_genes, m.percent_matched) == (2, 5, 40.0)
    assert m.unmatched == ["X", "<pad>", "b"]
    assert "2 of 5 genes (40.0%)" in caplog.text and "X, <pad>, b" in caplog.text


# --------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def upstream() -> Iterator[types.SimpleNamespace]:
    """scgpt 0.2.4's model modules, imported without running ``scgpt/__init__.py``."""
    with contextlib.ExitStack() as stack:
        try:
            modules = stack.enter_context(
                upstream_scgpt(generation="model.generation_model", pretrain="model.model")
            )
        except ImportError as err:
            pytest.fail(f"the parity tests need the reference as a test oracle: {err}")
        yield modules


def _upstream_generator(
    upstream: types.SimpleNamespace, ours: TransformerGenerator, vocab: dict[str, int]
) -> torch.nn.Module:
    return upstream.generation.TransformerGenerator(
        ours.ntoken,
        ours.d_model,
        ours.nhead,
        ours.d_hid,
        ours.nlayers,
        nlayers_cls=ours.nlayers_cls,
        n_cls=ours.n_cls,
        vocab=vocab,
        dropout=0.0,
        pad_token="<pad>",
        pad_value=0,
        pert_pad_id=ours.pert_pad_id,
    )


def _upstream_pred(model: torch.nn.Module, ids, values, flags, pad_mask=None) -> torch.Tensor:
    if pad_mask is None:
        pad_mask = torch.zeros_like(ids, dtype=torch.bool)
    return model(ids, values, flags, pad_mask)["mlm_output"]


def test_state_dict_interchange_with_upstream(
    upstream: types.SimpleNamespace, ckpt_dir: Path, tmp_path: Path
) -> None:
    vocab = json.loads((ckpt_dir / "vocab.json").read_text())
    ours = load_pretrained(ckpt_dir)
    theirs = _upstream_generator(upstream, ours, vocab)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # our saved best_model.pt loads into upstream strictly ...
    save_checkpoint(ours, tmp_path / "ft", vocab, json.loads((ckpt_dir / "args.json").read_text()))
    theirs.load_state_dict(torch.load(tmp_path / "ft" / "best_model.pt"), strict=True)
    # ... and upstream's state dict loads into ours strictly
    fresh = _upstream_generator(upstream, ours, vocab)
    ours.load_state_dict(fresh.state_dict(), strict=True)
    assert torch.equal(
        ours.decoder.coeff_decoder.fc[0].weight, fresh.decoder.coeff_decoder.fc[0].weight
    )


def test_random_checkpoint_keys_match_pretraining_model(
    upstream: types.SimpleNamespace, ckpt_dir: Path
) -> None:
    """Loading into scgpt's TransformerModel (MVC on) misses only cls_decoder and has only
    flag_encoder extra, which is what users report for the real scGPT_human file."""
    vocab = json.loads((ckpt_dir / "vocab.json").read_text())
    model = upstream.pretrain.TransformerModel(
        len(vocab), 32, 4, 48, 2, vocab=vocab, do_mvc=True, use_fast_transformer=False
    )
    state = {
        k.replace("Wqkv.", "in_proj_"): v
        for k, v in read_state_dict(ckpt_dir / "best_model.pt").items()
    }
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["flag_encoder.weight"]
    assert result.missing_keys and all(k.startswith("cls_decoder.") for k in result.missing_keys)


def test_forward_parity_with_upstream(upstream: types.SimpleNamespace, ckpt_dir: Path) -> None:
    vocab = json.loads((ckpt_dir / "vocab.json").read_text())
    ours = load_pretrained(ckpt_dir)
    # all of ours, including the freshly initialised pert embedding and decoder
    theirs = _upstream_generator(upstream, ours, vocab)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.eval()
    theirs.eval()
    ids, values, flags = _inputs(ours, batch=4, length=50)
    with torch.no_grad():
        a = ours(ids, values, flags)
        b = _upstream_pred(theirs, ids, values, flags)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert a.abs().max() > 0.1  # not a trivially-zero comparison

    # with padding: compare the real positions (upstream may zero padded outputs)
    pad = torch.zeros_like(ids, dtype=torch.bool)
    pad[1, 40:] = True
    pad[3, 25:] = True
    ids_p = ids.masked_fill(pad, ours.pad_token_id)
    with torch.no_grad():
        a = ours(ids_p, values, flags, pad)
        b = _upstream_pred(theirs, ids_p, values, flags, pad)
    torch.testing.assert_close(a[~pad], b[~pad], atol=1e-5, rtol=0)


def test_training_step_parity_with_upstream(
    upstream: types.SimpleNamespace, ckpt_dir: Path
) -> None:
    vocab = json.loads((ckpt_dir / "vocab.json").read_text())
    ours = load_pretrained(ckpt_dir, dropout=0.0)
    theirs = _upstream_generator(upstream, ours, vocab)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.train()
    theirs.train()
    ids, values, flags = _inputs(ours, batch=4, length=50, seed=1)
    target = values * 0.8 + 0.3 * flags
    opt_a = torch.optim.Adam(ours.parameters(), lr=1e-3)
    opt_b = torch.optim.Adam(theirs.parameters(), lr=1e-3)

    loss_a = F.mse_loss(ours(ids, values, flags), target)
    loss_b = F.mse_loss(_upstream_pred(theirs, ids, values, flags), target)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=0)
    loss_a.backward()
    loss_b.backward()
    params_b = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        q = params_b[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    opt_a.step()
    opt_b.step()

    d = ours.d_model
    for name, p in ours.named_parameters():
        q = params_b[name]
        if name.endswith("self_attn.in_proj_bias"):
            # The key bias has a mathematically zero gradient (softmax is shift-invariant),
            # so both sides hold rounding noise that Adam normalises to +-lr: skip it.
            p, q = torch.cat([p[:d], p[2 * d :]]), torch.cat([q[:d], q[2 * d :]])
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, values, flags), _upstream_pred(theirs, ids, values, flags), atol=1e-5, rtol=0
        )
