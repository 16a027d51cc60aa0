"""``--solver cosine``: Adam on the cosine distance between residual streams, from the LS map."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

from ...calib.collect import collect_activations
from ...log import get_logger
from ..solve import CosineSettings, FitResult, cosine_fit
from .base import FitInputs

__all__ = ["CosineSolver"]

log = get_logger(__name__)


class CosineSolver:
    name: ClassVar[str] = "cosine"
    judged_on_set_aside: ClassVar[bool] = True  # every epoch is scored on the set-aside text

    def fit(self, given: FitInputs) -> FitResult:
        activations = collect_activations(
            given.engine,
            given.plan,
            given.calibration,
            given.cut,
            hidden=given.hidden,
            desc=f"{given.step} Collecting".strip(),
        )
        return cosine_fit(activations, given.least_squares, given.cosine, given.validate)

    def settings(self, cosine: CosineSettings) -> dict[str, Any]:
        return {"cosine": asdict(cosine)}

    def log_fit(self, details: dict[str, Any]) -> None:
        curve, best = details["loss_curve"], details["best_epoch"]
        validation = details.get("validation_curve")
        log.info(
            "cosine: %d epochs (stopped: %s), cosine loss %.5f -> %.5f; kept epoch %d%s%s",
            details["epochs"],
            details["stopped"],
            curve[0],
            curve[best],
            best,
            " (the lstsq map)" if best == 0 else "",
            f", selection loss {validation[0]:.4f} -> {validation[best]:.4f}" if validation else "",
        )
