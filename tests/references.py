"""The references the tests and benchmarks hold our code against (not shipped).

* :func:`upstream_scgpt`: scgpt 0.2.4, imported without its package ``__init__``, which
  imports torchtext, which no longer loads with a current torch; the model, loss and
  utility modules do not need it (``pip install --no-deps scgpt==0.2.4``).
* :func:`plain_cell_eval`: cell-eval's ``vcc`` profile run as its users run it, both
  files in memory.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import pandas as pd

from scgpt_vcc.evaluate.vcc import cell_eval_evaluator, per_perturbation_table

UPSTREAM_VERSION = "0.2.4"
INSTALL = f"pip install --no-deps scgpt=={UPSTREAM_VERSION}"


@contextlib.contextmanager
def upstream_scgpt(**modules: str) -> Iterator[types.SimpleNamespace]:
    """Yield upstream modules by the names given, e.g. ``generation="model.generation_model"``.

    ``scgpt`` is put in ``sys.modules`` as a bare package (with the ``logger`` its
    ``__init__`` would define) and taken out again on exit, so the import leaves no trace.
    Raises ImportError naming the install command when scgpt 0.2.4 is not installed.
    """
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"scgpt {UPSTREAM_VERSION} is the reference: {INSTALL}")
    version = importlib.metadata.version("scgpt")
    if version != UPSTREAM_VERSION:
        raise ImportError(f"scgpt {version} is installed; the reference is {INSTALL}")
    saved = {k: v for k, v in sys.modules.items() if k == "scgpt" or k.startswith("scgpt.")}
    package = types.ModuleType("scgpt")
    package.__path__ = list(spec.submodule_search_locations)
    package.logger = logging.getLogger("scGPT")  # type: ignore[attr-defined]
    sys.modules["scgpt"] = package
    stub_ipython = importlib.util.find_spec("IPython") is None
    if stub_ipython:
        # scgpt.utils imports IPython.get_ipython only to detect notebooks.
        sys.modules["IPython"] = types.ModuleType("IPython")
        sys.modules["IPython"].get_ipython = lambda: None  # type: ignore[attr-defined]
    try:
        yield types.SimpleNamespace(
            **{name: importlib.import_module(f"scgpt.{path}") for name, path in modules.items()}
        )
    finally:
        for key in [k for k in sys.modules if k == "scgpt" or k.startswith("scgpt.")]:
            del sys.modules[key]
        sys.modules.update(saved)
        if stub_ipython:
            del sys.modules["IPython"]


def plain_cell_eval(
    real_path: str | Path,
    pred_path: str | Path,
    control: str,
    column: str = "target_gene",
    threads: int = 1,
) -> pd.DataFrame:
    """cell-eval exactly as its users run it (both files in memory); the reference."""
    with tempfile.TemporaryDirectory() as tmp:
        evaluator = cell_eval_evaluator(
            ad.read_h5ad(real_path),
            ad.read_h5ad(pred_path),
            control,
            column,
            outdir=tmp,
            num_threads=threads,
        )
        results, _ = evaluator.compute(profile="vcc", write_csv=False, break_on_error=True)
    return per_perturbation_table(results)
