"""Option groups that several commands share: a prune's options and the speed protocol's."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..options import add_arguments, from_args
from ..prune import PruneOptions
from ..speed_settings import SpeedProtocol, SpeedRounds

__all__ = ["add_prune_options", "add_speed_options", "protocol_from_args", "prune_options", "speed_rounds"]

_MEMORY_AND_GUARD = (
    "Memory: one calibration pass collects the distance of every candidate cut and the float64 "
    "statistics (2·d² numbers per candidate) that the fit needs. When those do not fit in a quarter "
    "of the memory budget, a first pass measures distances only and a second pass collects statistics "
    "for the best candidates that fit, stopping at the deepest block they need. Quality guard: the "
    "fitted maps are kept only if the "
    "pruned model's loss on 64 set-aside calibration documents is no worse than plain removal of the "
    "same blocks; otherwise plain removal is saved and prune.json says so (guard.kept)."
)


def add_prune_options(parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    """The options of ``PruneOptions``, as it declares them; ``defaults`` are another command's."""
    add_arguments(parser, PruneOptions, defaults)
    parser.epilog = _MEMORY_AND_GUARD


def prune_options(args: argparse.Namespace, **overrides: Any) -> PruneOptions:
    """The ``PruneOptions`` the prune options of ``args`` describe."""
    given = {"gguf_compatible": not getattr(args, "skip_gguf", True)} | overrides
    return from_args(PruneOptions, args, **given)


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    """The protocol's options, shared by ``rmexport bench gguf`` and ``rmexport bench onnx``."""
    group = parser.add_argument_group("speed (llama-bench style: original and pruned alternate)")
    add_arguments(group, SpeedProtocol)
    add_arguments(group, SpeedRounds)


def speed_rounds(args: argparse.Namespace) -> SpeedRounds:
    return from_args(SpeedRounds, args)


def protocol_from_args(args: argparse.Namespace) -> SpeedProtocol:
    """The ``SpeedProtocol`` the options describe (ConfigError for impossible values)."""
    return from_args(SpeedProtocol, args, rounds=speed_rounds(args))
