"""Command-line flags from an options dataclass: one field, one flag (``--field-name``), its help,
choices and metavar from the field's metadata (``option``), its type and default from the field.
A new option is one field; nothing here imports torch, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
Text = str | Callable[[], str]


def option(default: Any, help: Text, *, choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,
           metavar: str | None = None, repeat: bool = False) -> Any:
    """A dataclass field with its command-line help (``help`` and ``choices`` may be callables,
    evaluated when the parser is built, e.g. to list a registry). ``repeat``: a tuple field whose
    flag takes one value and may be given several times (``--domain a=x --domain b=y``)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar,
                                                        "repeat": repeat})


def _base_type(hint: Any) -> Any:
    """int for ``int | None``, tuple for ``tuple[str, ...]``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def add_options(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = ()) -> None:
    """Add a flag for every field of the dataclass ``cls`` made with :func:`option`, except ``skip``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        meta = f.metadata
        help_text = meta["help"]() if callable(meta["help"]) else meta["help"]
        kind = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": f.default}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
            help_text += " (default: on)" if f.default else ""
        else:
            if f.default not in (None, ()):
                shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
                help_text += f" (default: {shown})"
            kw["type"] = str if kind is tuple else kind
            if kind is tuple and meta.get("repeat"):
                kw["action"], kw["default"] = "append", list(f.default)  # argparse appends to a copy
            elif kind is tuple:
                kw["nargs"] = "*"
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        if choices is not None:
            kw["choices"] = tuple(choices)
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        parser.add_argument("--" + f.name.replace("_", "-"), help=help_text.replace("%", "%%"), **kw)


def options_from(cls: type[T], args: argparse.Namespace) -> T:
    """An instance of ``cls`` from the parsed flags (fields without a flag keep their defaults)."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
