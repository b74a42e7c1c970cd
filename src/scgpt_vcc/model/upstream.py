"""The reference implementation, scgpt 0.2.4, imported without its package ``__init__``.

``scgpt/__init__.py`` imports torchtext, which no longer loads with a current torch; the
model, loss and utility modules do not need it. The parity tests and the benchmarks use
this to run upstream's code next to ours (``pip install --no-deps scgpt==0.2.4``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import types
from collections.abc import Iterator

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
