"""Errors that tell the user which file and field are wrong and how to fix them."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A user-supplied input is missing or malformed.

    The message always names the file, the offending field and the fix, so that a
    Snakemake log shows the user what to do without reading a traceback.
    """

    def __init__(self, path: str | Path, field: str, problem: str, fix: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {field}: {problem}. Fix: {fix}")
