"""The CLI's subcommand registry, and options generated from the package's own signatures.

A step's defaults live in one place, the function or settings dataclass that does the
work; :func:`add_options` turns every parameter with a default into ``--an-option`` with
that default and a parser for its annotated type, and :func:`call` hands the parsed values
back by name. The CLI restates no default.

Subcommands register with :func:`command`; the function that declares one imports what
it runs, so that a job imports only its own step (``pair-controls`` needs no torch).
"""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Declare = Callable[[argparse.ArgumentParser], None]
# Every subcommand: name -> (one-line help, the function that declares its options).
COMMANDS: dict[str, tuple[str, Declare]] = {}

# Words that mean "no value" (config ``null``) for an optional option.
NONE_WORDS = ("none", "null", "all")


def command(name: str, help_line: str) -> Callable[[Declare], Declare]:
    """Register the decorated function as the declaration of subcommand ``name``."""

    def register(declare: Declare) -> Declare:
        COMMANDS[name] = (help_line, declare)
        return declare

    return register


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(text: str) -> Any:
        return None if text.lower() in NONE_WORDS else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")  # argparse's error text
    return parse_optional


def _comma_separated(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _parser_for(hint: Any) -> tuple[Callable[[str], Any], dict[str, Any]]:
    """The argparse ``type`` (and extra keywords) of a parameter annotated ``hint``."""
    if _is_union(hint):
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        if Path in members:  # str | Path
            parse: Callable[[str], Any] = Path
        else:
            (only,) = members
            parse, extra = _parser_for(only)
            if extra:
                raise TypeError(f"no command-line form for {hint}")
        return (_optional(parse) if type(None) in typing.get_args(hint) else parse), {}
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return str, {"choices": typing.get_args(hint)}
    if origin is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        return _comma_separated, {}
    if origin in (list, Sequence):
        return str, {"nargs": "+", "action": "extend"}
    if hint is bool:
        return parse_bool, {"metavar": "{true,false}"}
    if hint in (int, float, str, Path):
        return hint, {}
    raise TypeError(f"no command-line form for {hint}")


def _defaults(target: Callable[..., Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (annotation, default)}`` of the parameters of ``target`` with a default."""
    hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    return {
        name: (hints[name], p.default)
        for name, p in inspect.signature(target).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def add_options(
    parser: argparse.ArgumentParser,
    target: Callable[..., Any],
    *,
    exclude: Iterable[str] = (),
    helps: Mapping[str, str] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """One ``--option`` per parameter of ``target`` with a default, but ``exclude``."""
    helps, choices, skip = helps or {}, choices or {}, set(exclude)
    for name, (hint, default) in _defaults(target).items():
        if name in skip:
            continue
        parse, extra = _parser_for(hint)
        allowed = choices.get(name, extra.pop("choices", None))
        if isinstance(default, tuple) and parse is _comma_separated:
            shown = ",".join(default)
        else:
            shown = default
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=parse,
            default=list(default) if extra.get("action") == "extend" else default,
            choices=allowed,
            help=f"{helps.get(name, '')} (default: {shown})".lstrip(),
            **extra,
        )


def call(target: Callable[..., Any], args: argparse.Namespace, **given: Any) -> Any:
    """``target`` called with ``given`` plus every parameter the namespace holds by name."""
    values = vars(args)
    names = inspect.signature(target).parameters
    return target(**{n: values[n] for n in names if n in values and n not in given}, **given)
