"""``--solver lstsq``: the ridge least-squares map itself (float64 normal equations)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..solve import CosineSettings, FitResult
from .base import FitInputs

__all__ = ["LeastSquares"]


class LeastSquares:
    name: ClassVar[str] = "lstsq"
    judged_on_set_aside: ClassVar[bool] = False

    def fit(self, given: FitInputs) -> FitResult:
        return FitResult(given.least_squares, self.name, {"alpha": given.alpha})

    def settings(self, cosine: CosineSettings) -> dict[str, Any]:
        return {}

    def log_fit(self, details: dict[str, Any]) -> None:
        return None
