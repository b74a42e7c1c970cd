"""Command line interface: one subcommand per workflow step.

Every Snakemake rule calls one of these subcommands, so each step also runs on its own:
``scgpt-vcc <command> --help`` lists its options. The subcommands are declared by stage
(:mod:`~scgpt_vcc.cli.data`, :mod:`~scgpt_vcc.cli.models`,
:mod:`~scgpt_vcc.cli.evaluation`); their options and defaults come from the signatures of
the functions and settings they call (:mod:`~scgpt_vcc.cli.options`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence

from scgpt_vcc.cli import data, evaluation, models  # noqa: F401  (they register commands)
from scgpt_vcc.cli.options import COMMANDS
from scgpt_vcc.errors import InputError


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` is declared in full (and imports
    its step), the others are listed with their help line."""
    parser = argparse.ArgumentParser(prog="scgpt-vcc", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((word for word in argv if not word.startswith("-")), None)
    for name, (help_line, declare) in COMMANDS.items():
        subparser = sub.add_parser(name, help=help_line, description=help_line)
        if name == chosen:
            declare(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.handler(args)
    except InputError as err:
        logging.getLogger("scgpt_vcc").error("%s", err)
        return 2
    except OSError as err:
        if err.errno != errno.ENOSPC and "No space left on device" not in str(err):
            raise
        logging.getLogger("scgpt_vcc").error(
            "disk full while writing %s (%s). Fix: free space or move results/ (and TMPDIR) to "
            "a larger disk, then rerun; the partial file was removed and earlier outputs are "
            "unchanged",
            err.filename or "an output",
            err.strerror or str(err).splitlines()[0],
        )
        return 3
    return 0
