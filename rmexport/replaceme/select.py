"""How many blocks to cut and where.

``distance``: the reference rule, the smallest mean angular distance between the residual stream
entering and leaving the cut. ``fit``: the smallest error left after the fitted map, relative to
the energy of the stream it must reproduce (computed from the same statistics, no extra pass).
``loss``: the best few cuts by fit are each folded and tried; the one whose pruned model has the
lowest next-token loss on calibration text set aside for selection wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..errors import ConfigError

__all__ = [
    "DISTANCE_TOKENS",
    "MAP_SPACES",
    "SELECTION_RULES",
    "DistanceTokens",
    "MapSpace",
    "SelectionRule",
    "CutScores",
    "candidate_starts",
    "cut_size",
    "split_cut",
    "choose_start",
]


class SelectionRule(StrEnum):
    DISTANCE = "distance"
    FIT = "fit"
    LOSS = "loss"


class MapSpace(StrEnum):
    """What the chosen cut's map acts on: the MLP's hidden activations (a d_ff×d map: the block's
    down_proj refitted by least squares) or its output (the d×d map T of ReplaceMe)."""

    HIDDEN = "hidden"
    OUTPUT = "output"


class DistanceTokens(StrEnum):
    """The tokens the angular distance across a cut is averaged over."""

    LAST = "last"  # the last token of each sequence (the reference)
    ALL = "all"  # every real token


SELECTION_RULES = tuple(rule.value for rule in SelectionRule)
MAP_SPACES = tuple(space.value for space in MapSpace)
DISTANCE_TOKENS = tuple(tokens.value for tokens in DistanceTokens)


def cut_size(n_layers: int, ratio: float | None = None, layers: int | None = None) -> int:
    """``n = floor(ratio·L + 0.5)``, or ``layers`` when given; at least 2 blocks must remain."""
    if layers is not None:
        n = layers
        what = f"--layers {layers}"
    elif ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise ConfigError(
                f"--ratio {ratio} is out of range", hint="use a value between 0 and 1, e.g. 0.25"
            )
        n = int(ratio * n_layers + 0.5)
        what = f"--ratio {ratio}"
    else:
        raise ConfigError("give --ratio or --layers")
    if n < 1:
        raise ConfigError(f"{what} removes no block of {n_layers}", hint="use a larger ratio")
    if n_layers - n < 2:
        raise ConfigError(
            f"{what} would leave {n_layers - n} of {n_layers} blocks; at least 2 must remain",
            hint="use a smaller ratio",
        )
    return n


def split_cut(n: int, blocks: int) -> list[int]:
    """Sizes of ``blocks`` cuts that add up to ``n``, larger ones first."""
    if blocks < 1 or blocks > n:
        raise ConfigError(f"--blocks {blocks} cannot split a cut of {n} layers", hint=f"use 1..{n}")
    base, extra = divmod(n, blocks)
    return [base + (1 if k < extra else 0) for k in range(blocks)]


def candidate_starts(n_layers: int, n: int) -> list[int]:
    """Block 0 is never removed: starts 1..L-n."""
    return list(range(1, n_layers - n + 1))


@dataclass
class CutScores:
    """Per candidate start: distances and, where computed, fit errors."""

    distance: dict[int, float]
    fit: dict[int, float] | None = None
    removal: dict[int, float] | None = None
    loss: dict[int, float] | None = None


def choose_start(scores: CutScores, rule: str) -> int:
    if rule == "distance":
        table = scores.distance
    elif rule == "fit":
        if not scores.fit:
            raise ConfigError("--select fit needs fit scores for every candidate")
        table = scores.fit
    elif rule == "loss":
        if not scores.loss:
            raise ConfigError("--select loss needs the selection loss of at least one candidate")
        table = scores.loss
    else:
        raise ConfigError(
            f"unknown selection rule {rule!r}", hint="use one of: " + ", ".join(SELECTION_RULES)
        )
    # Ties go to the earliest start, so the choice is deterministic.
    return min(table, key=lambda s: (table[s], s))
