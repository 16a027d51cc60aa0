"""How much memory a prune may use, and what that decides: resident weights, spilled activations."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import ConfigError
from ..sysinfo import ram_bytes

__all__ = [
    "DEFAULT_RAM_FRACTION",
    "BlockShape",
    "MemoryBudget",
    "check_budget_fits",
    "minimum_budget_bytes",
    "parse_bytes",
]

# Without --memory-budget / RMEXPORT_MEMORY_BUDGET a prune may use this share of RAM.
DEFAULT_RAM_FRACTION = 0.5
# Resident weights may take at most this share of the budget; the rest is for statistics and activations.
WEIGHTS_SHARE = 0.5

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 2**10,
    "m": 1e6,
    "mb": 1e6,
    "mib": 2**20,
    "g": 1e9,
    "gb": 1e9,
    "gib": 2**30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"8GiB"``, ``"500MB"``, ``"0.5g"``, ``"1048576"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"cannot read memory size {text!r}", hint="write e.g. 8GiB, 500MB or 0.5GiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"memory size {text!r} must be positive")
    return value


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes a prune may hold, in three parts.

    - Weights: all of them when they fit ``WEIGHTS_SHARE`` of the budget (resident), else the
      largest module loaded at a time (one block, or the embedding or LM head of a large vocabulary).
    - Candidates' float64 statistics: at most half of what the weights leave.
    - Activations: the other half; beyond it they spill to disk.

    On top come Python, PyTorch and transformers themselves, and the LM head pass's logits: a
    few positions of one stream at a time in float64 (``Engine.head_pass``, 64 MiB a chunk; two
    streams where fold parity compares them).
    """

    total_bytes: int

    @classmethod
    def from_option(cls, text: str | None, device_bytes: int | None = None) -> MemoryBudget:
        """``text`` (or ``RMEXPORT_MEMORY_BUDGET``); else half of RAM, and at most ``device_bytes``
        where the prune computes on an accelerator whose memory holds what stays resident."""
        text = text or os.environ.get("RMEXPORT_MEMORY_BUDGET")
        if text:
            return cls(parse_bytes(text))
        default = int(DEFAULT_RAM_FRACTION * ram_bytes())
        return cls(default if device_bytes is None else min(default, device_bytes))

    def weights_resident(self, weights_bytes: int) -> bool:
        return weights_bytes <= WEIGHTS_SHARE * self.total_bytes

    def _after_weights(self, weights_bytes: int, largest_module_bytes: int) -> int:
        held = weights_bytes if self.weights_resident(weights_bytes) else largest_module_bytes
        return max(0, self.total_bytes - held)

    def stats_bytes(self, weights_bytes: int, largest_module_bytes: int) -> int:
        return self._after_weights(weights_bytes, largest_module_bytes) // 2

    def activation_bytes(self, weights_bytes: int, largest_module_bytes: int) -> int:
        return self._after_weights(weights_bytes, largest_module_bytes) // 2

    def describe(self, weights_bytes: int, largest_module_bytes: int) -> dict[str, object]:
        return {
            "budget_bytes": self.total_bytes,
            "weights_bytes": weights_bytes,
            "largest_module_bytes": largest_module_bytes,
            "weights_resident": self.weights_resident(weights_bytes),
            "stats_budget_bytes": self.stats_bytes(weights_bytes, largest_module_bytes),
            "activation_budget_bytes": self.activation_bytes(weights_bytes, largest_module_bytes),
        }


@dataclass(frozen=True)
class BlockShape:
    """What the smallest streamed prune holds at once, read from headers before any work."""

    hidden: int  # d
    largest_module_elements: int  # one decoder block, or the embedding / LM head if larger
    element_bytes: int  # of the compute dtype

    def largest_module_bytes(self) -> int:
        return self.largest_module_elements * self.element_bytes

    def candidate_stats_bytes(self) -> int:
        """The float64 sums of one candidate cut (MᵀM and Mᵀ·target, d×d each), which the survey
        keeps however small the budget."""
        return 2 * self.hidden * self.hidden * 8


def minimum_budget_bytes(shape: BlockShape) -> int:
    """The smallest budget a prune runs under: the largest module held while streaming, plus twice
    one candidate's statistics, since statistics get half of what the weights leave. Activations
    need no floor (beyond their share they spill to disk); one batch's forward comes on top, as
    Python and PyTorch do."""
    return shape.largest_module_bytes() + 2 * shape.candidate_stats_bytes()


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def check_budget_fits(total_bytes: int, shape: BlockShape, option: str = "--memory-budget") -> None:
    """ConfigError, naming the smallest budget that works, when ``total_bytes`` is below it."""
    minimum = minimum_budget_bytes(shape)
    if total_bytes >= minimum:
        return
    raise ConfigError(
        f"{option} of {total_bytes} bytes ({_human(total_bytes)}) is below the smallest that works, "
        f"{minimum} bytes ({_human(minimum)}): the largest module held at once "
        f"({_human(shape.largest_module_bytes())}) plus twice one candidate cut's float64 statistics "
        f"({_human(shape.candidate_stats_bytes())})",
        hint=f"use {option} {-(-minimum // 2**20)}MiB or more",
    )
