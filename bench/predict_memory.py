"""Peak memory of scGPT inference over all VCC genes: our gene chunks vs upstream full length.

    .venv/bin/python bench/predict_memory.py --out /tmp/predict_memory.csv

Model at the real size (whole-human checkpoint: 60,697 tokens, 12 layers, 512 wide, 8 heads;
random weights: memory and time do not depend on their values), on CPU. Each measurement
runs in its own process and records the peak RSS (``ru_maxrss``), the RSS once the model
and inputs exist (so the difference is the inference's own working memory) and wall time.

* ``ours``: :class:`scgpt_vcc.predict.scgpt.ScGPTPredictor` over 18,080 genes (17,840 in
  the vocabulary, as for VCC), gene chunks of 1,536 that always hold the target.
* ``upstream``: scgpt 0.2.4's ``TransformerGenerator`` run the way its ``pred_perturb``
  runs with ``include_zero_gene="all"`` (the tutorial's inference): every gene in one
  sequence, out-of-vocabulary genes as ``<pad>`` tokens, an all-False padding mask.
  Its attention needs ``heads x L^2`` floats per cell and layer; on this 24 GB machine it
  is measured at shorter lengths and the peak extrapolated to 18,080 with a quadratic fit.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.references import upstream_scgpt  # noqa: E402

VCC_GENES = 18080
VCC_IN_VOCAB = 17840
VOCAB_GENES = 60694
SIZE = {"d_model": 512, "nhead": 8, "d_hid": 512, "nlayers": 12}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vocab_and_genes(n_genes: int) -> tuple[dict[str, int], list[str]]:
    vocab = {f"GENE{i}": i for i in range(VOCAB_GENES)}
    for token in ("<pad>", "<cls>", "<eoc>"):
        vocab[token] = len(vocab)
    n_in = round(n_genes * VCC_IN_VOCAB / VCC_GENES)
    genes = [f"GENE{i}" for i in range(n_in)] + [f"OOV{i}" for i in range(n_genes - n_in)]
    return vocab, genes


def worker(method: str, n_genes: int, batch: int, chunk: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vocab, genes = _vocab_and_genes(n_genes)
    rng = np.random.default_rng(0)
    control = np.log1p(rng.poisson(1.0, size=(batch, n_genes))).astype(np.float32)
    if method == "ours":
        from scgpt_vcc.model import TransformerGenerator
        from scgpt_vcc.predict.scgpt import ScGPTPredictor

        model = TransformerGenerator(len(vocab), **SIZE, pad_token_id=vocab["<pad>"]).eval()
        predictor = ScGPTPredictor(model, vocab, genes, chunk_size=chunk)
        base = _rss_mb()
        start = time.perf_counter()
        out = predictor(control, [genes[0]])
    else:
        with upstream_scgpt(generation="model.generation_model") as up:
            model = up.generation.TransformerGenerator(
                len(vocab), SIZE["d_model"], SIZE["nhead"], SIZE["d_hid"], SIZE["nlayers"],
                nlayers_cls=3, n_cls=1, vocab=vocab, dropout=0.0, pad_token="<pad>",
                pad_value=0, pert_pad_id=0,
            ).eval()  # fmt: skip
            ids = torch.tensor([vocab.get(g, vocab["<pad>"]) for g in genes]).repeat(batch, 1)
            values = torch.from_numpy(control)
            flags = torch.zeros(batch, n_genes, dtype=torch.long)
            flags[:, 0] = 1
            mask = torch.zeros(batch, n_genes, dtype=torch.bool)
            base = _rss_mb()
            start = time.perf_counter()
            with torch.no_grad():
                out = model(ids, values, flags, mask, CLS=False, CCE=False, MVC=False, ECS=False)
            out = out["mlm_output"].numpy()
    seconds = time.perf_counter() - start
    assert out.shape == (batch, n_genes) and np.isfinite(out).all()
    peak = _rss_mb()
    return {
        "method": method, "n_genes": n_genes, "batch": batch, "chunk": chunk,
        "base_rss_mb": round(base), "peak_rss_mb": round(peak),
        "inference_mb": round(peak - base), "seconds": round(seconds, 1),
    }  # fmt: skip


def run(method: str, n_genes: int, batch: int, chunk: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", method, str(n_genes), str(batch), str(chunk)]
    done = subprocess.run(
        [*command, "--threads", str(threads)], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/predict_memory.csv"))
    parser.add_argument("--upstream-genes", type=int, nargs="+", default=[2000, 4000, 6000, 8000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--chunk", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, n_genes, batch, chunk = args.worker
        print(json.dumps(worker(method, int(n_genes), int(batch), int(chunk), args.threads)))
        return
    rows = [run("ours", VCC_GENES, b, args.chunk, args.threads) for b in args.batches]
    rows += [run("upstream", n, 1, n, args.threads) for n in args.upstream_genes]
    table = pd.DataFrame(rows)
    upstream = table[table["method"] == "upstream"]
    fit = np.polyfit(upstream["n_genes"], upstream["peak_rss_mb"], 2)
    extrapolated = {
        "method": "upstream (quadratic fit)", "n_genes": VCC_GENES, "batch": 1,
        "chunk": VCC_GENES, "peak_rss_mb": round(float(np.polyval(fit, VCC_GENES))),
    }  # fmt: skip
    table = pd.concat([table, pd.DataFrame([extrapolated])], ignore_index=True)
    table.to_csv(args.out, index=False)
    ours = table[(table["method"] == "ours") & (table["batch"] == 1)]["peak_rss_mb"].iloc[0]
    print(table.to_string(index=False))
    print(f"peak RSS ratio at {VCC_GENES} genes, 1 cell: {extrapolated['peak_rss_mb'] / ours:.1f}x")


if __name__ == "__main__":
    main()
