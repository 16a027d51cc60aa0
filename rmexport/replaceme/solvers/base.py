"""What every solver of a cut's map is given and must provide."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ...calib.engine import Engine, Plan
from ...calib.tokens import CalibrationSet
from ..solve import CosineSettings, FitResult

__all__ = ["FitInputs", "Solver"]


@dataclass(frozen=True)
class FitInputs:
    """One cut's fit: the least-squares map from the calibration sums, and how to get more."""

    engine: Engine
    plan: Plan
    calibration: CalibrationSet
    cut: tuple[int, int]
    hidden: bool  # the map reads the MLP's hidden activations (else its output)
    least_squares: torch.Tensor  # the ridge least-squares map, every solver's start
    alpha: float
    cosine: CosineSettings
    validate: Callable[[torch.Tensor], float] | None  # a loss on set-aside text; None without one
    step: str = ""


class Solver(Protocol):
    name: ClassVar[str]
    # Whether the fit is judged on the calibration text set aside (``FitInputs.validate``).
    judged_on_set_aside: ClassVar[bool]

    def fit(self, given: FitInputs) -> FitResult: ...

    def settings(self, cosine: CosineSettings) -> dict[str, Any]:
        """What ``prune.json``'s solver section records of this solver's own settings."""
        ...

    def log_fit(self, details: dict[str, Any]) -> None:
        """One log line on the fit beyond the fit error, if the solver has something to say."""
        ...
