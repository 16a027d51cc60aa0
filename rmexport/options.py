"""Options declared once: a dataclass field carries its flag, help, bounds and choices.

``option(...)`` makes the field; from the fields, ``add_arguments`` builds the argparse options,
``from_args`` reads them back into the dataclass, ``check_bounds`` checks each value on its own
(one-line ``ConfigError``), and ``markdown_table`` writes the README's table. Checks against files,
models or the machine stay in ``rmexport.inputs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from .errors import ConfigError

__all__ = [
    "REQUIRED",
    "Option",
    "add_arguments",
    "check_bounds",
    "check_count",
    "check_number",
    "declared",
    "from_args",
    "markdown_table",
    "option",
]


@dataclass(frozen=True)
class Option:
    """What the command line and the README say of one field."""

    flag: str
    help: str
    group: str | None = None  # the --help section; None: the command's own options
    metavar: str | None = None
    choices: Collection[str] | None = None  # a live collection (a registry) is read when used
    # count: an int >= minimum; number: a finite float; switch: --flag / --no-flag (None: neither given)
    kind: Literal["count", "number", "switch"] | None = None
    minimum: float | None = None
    optional: bool = False  # None is a valid value (the option is not given)
    only_with: str | None = None  # checked only when this other field is set
    parse: Callable[[str], Any] | None = None  # argparse's type
    negate: bool = False  # the flag stores False (--no-quality-guard)
    positional: bool = False  # an argument without a flag; ``flag`` is how messages name it
    shown_default: str | None = None  # how help and README show the default; None: the value
    doc: str | None = None  # the README's meaning when it says more than the help (markdown)


REQUIRED: Any = dataclasses.MISSING  # the default of an option that must be given


def option(default: Any, flag: str, help: str, **details: Any) -> Any:
    """A dataclass field with a default (or ``REQUIRED``), declared as the command-line option ``flag``."""
    return field(default=default, metadata={"option": Option(flag, help, **details)})


def declared(cls: type) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of ``cls`` that are options, in declaration order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


# --- checks of one value --------------------------------------------------------------------------
def check_count(value: int | None, option: str, minimum: int = 1, *, optional: bool = False) -> None:
    """A count of something to do: an int of at least ``minimum`` (None only when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{option} must be at least {minimum} (got {value})",
            hint="no value of an option means 'everything'; give the number you want",
        )


def check_number(
    value: float | None, option: str, *, minimum: float | None = None, optional: bool = False
) -> None:
    if value is None and optional:
        return
    if value is None or not math.isfinite(value):
        raise ConfigError(f"{option} must be a finite number (got {value})")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{option} must be at least {minimum:g} (got {value:g})")


def check_bounds(config: Any) -> None:
    """Every declared option of ``config`` within its own bounds and choices (ConfigError naming
    the flag otherwise)."""
    for f, opt in declared(type(config)):
        value = getattr(config, f.name)
        if opt.only_with is not None and not getattr(config, opt.only_with):
            continue
        if opt.kind == "count":
            check_count(
                value, opt.flag, 1 if opt.minimum is None else int(opt.minimum), optional=opt.optional
            )
        elif opt.kind == "number":
            check_number(value, opt.flag, minimum=opt.minimum, optional=opt.optional)
        if opt.choices is not None and value not in _names(opt.choices):
            raise ConfigError(
                f"unknown {opt.flag} {value!r}", hint="use one of " + ", ".join(_names(opt.choices))
            )


def _names(choices: Collection[str]) -> list[str]:
    """The choices as plain strings (an enum's values, a registry's keys)."""
    return [str(c) for c in choices]


# --- argparse ---------------------------------------------------------------------------------
def _shown(opt: Option, default: Any) -> str | None:
    if opt.shown_default is not None:
        return opt.shown_default
    if default is None or default is REQUIRED or isinstance(default, bool):
        return None
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return f"{default:g}" if isinstance(default, float) else str(default)


class _ArgumentKwargs(TypedDict, total=False):
    """What ``add_arguments`` hands ``argparse.ArgumentParser.add_argument`` for a valued option."""

    help: str
    default: Any
    type: Callable[[str], Any]
    choices: list[str]
    metavar: str
    nargs: str
    dest: str
    required: bool


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, defaults: Mapping[str, Any] | None = None
) -> None:
    """The options of ``cls``; ``defaults`` replaces declared defaults (e.g. another command's)."""
    groups: dict[str | None, Any] = {None: parser}
    for f, opt in declared(cls):
        default = (defaults or {}).get(f.name, f.default)
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(opt.group)
        shown = _shown(opt, default)
        help_text = (opt.help + (f" (default {shown})" if shown is not None else "")).replace("%", "%%")
        if opt.kind == "switch":
            action = argparse.BooleanOptionalAction
            groups[opt.group].add_argument(
                opt.flag, dest=f.name, action=action, default=default, help=help_text
            )
            continue
        if opt.negate or f.default is False:
            action = "store_false" if opt.negate else "store_true"
            groups[opt.group].add_argument(opt.flag, dest=f.name, action=action, help=help_text)
            continue
        kwargs = _ArgumentKwargs(help=help_text)
        if default is not REQUIRED:
            kwargs["default"] = default
        if opt.parse is not None:
            kwargs["type"] = opt.parse
        elif opt.kind == "count":
            kwargs["type"] = int
        elif opt.kind == "number":
            kwargs["type"] = float
        if opt.choices is not None:
            kwargs["choices"] = _names(opt.choices)
        if opt.metavar is not None:
            kwargs["metavar"] = opt.metavar
        if opt.positional:
            kwargs.setdefault("metavar", opt.flag)
            if default is not REQUIRED:
                kwargs["nargs"] = "?"
            groups[opt.group].add_argument(f.name, **kwargs)
            continue
        kwargs["dest"] = f.name
        if default is REQUIRED:
            kwargs["required"] = True
        groups[opt.group].add_argument(opt.flag, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """``cls`` from the parsed options of ``add_arguments``; ``given`` fields are set as they are."""
    values = {f.name: getattr(args, f.name) for f, _ in declared(cls) if f.name not in given}
    return cls(**values, **given)


# --- README -----------------------------------------------------------------------------------
def _markdown_default(opt: Option, default: Any) -> str:
    if opt.negate:
        return "off"
    shown = _shown(opt, default)
    if shown is None:
        return "–"
    return shown if isinstance(default, int | float) or opt.shown_default else f"`{shown}`"


def markdown_table(cls: type, elsewhere: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The README's table of the options of ``cls``. ``elsewhere`` maps a command to the defaults
    it changes (``{"run": {"eval_tokens": 4096}}``), shown after the declared default."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f, opt in declared(cls):
        name = f"`{opt.flag}{' ' + opt.metavar if opt.metavar else ''}`"
        default = _markdown_default(opt, f.default)
        for command, changed in (elsewhere or {}).items():
            if f.name in changed and changed[f.name] != f.default:
                default += f" ({_markdown_default(opt, changed[f.name])} in `{command}`)"
        rows.append(f"| {name} | {default} | {opt.doc or opt.help} |")
    return "\n".join(rows) + "\n"
