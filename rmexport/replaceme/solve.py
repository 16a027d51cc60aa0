"""Pure maths: fit the linear map T from streamed statistics or raw activation pairs.

``lstsq`` solves the ridge normal equations ``(A + αI)·T = B`` (never an explicit inverse).
``ridge_toward`` fits a map of the MLP's hidden activations shrunk toward a prior map, with the
strength chosen by the error on text set aside. ``cosine`` minimises the cosine distance between
the residual stream the fitted map produces and the one the removed blocks produced, with Adam,
starting from the LS solution. For families whose MLP output passes through a norm, T is
diagonal (one scale per channel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calib.collect import CutActivations, CutEnds, CutStatistics
from ..errors import CalibrationError

__all__ = [
    "CosineSettings",
    "FitResult",
    "cosine_fit",
    "diagonal_lstsq_from_gram",
    "RIDGE_GRID",
    "RidgeChoice",
    "lstsq_from_gram",
    "residual_energy",
    "ridge_toward",
]


@dataclass
class FitResult:
    transform: torch.Tensor  # d×d, or length-d diagonal
    solver: str
    details: dict = field(default_factory=dict)
    # the calibration and set-aside streams around the cut, where the fit's pass kept them for a repair
    ends: list[CutEnds] | None = None


def lstsq_from_gram(gram: torch.Tensor, cross: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """``T = solve(A + αI, B)`` in float64."""
    system = gram.to(torch.float64) + alpha * torch.eye(gram.shape[0], dtype=torch.float64)
    solution, info = torch.linalg.solve_ex(system, cross.to(torch.float64))
    if int(info) != 0 or not torch.isfinite(solution).all():
        raise CalibrationError(
            "the least-squares system is singular",
            hint="add a ridge term (--alpha 1e-3) or use more calibration data",
        )
    return solution


def diagonal_lstsq_from_gram(gram: torch.Tensor, cross: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Per-channel scale ``t_k = B_kk / (A_kk + α)``: the best diagonal map."""
    denominator = torch.diagonal(gram).to(torch.float64) + alpha
    scale = torch.diagonal(cross).to(torch.float64) / denominator.clamp_min(1e-30)
    return torch.where(denominator > 0, scale, torch.ones_like(scale))


def residual_energy(stats: CutStatistics, transform: torch.Tensor) -> float:
    """``Σ‖M·T − target‖² = Σ‖target‖² − 2·tr(TᵀB) + tr(TᵀAT)`` from the sums alone."""
    t = transform.to(torch.float64)
    if t.dim() == 1:
        t = torch.diag(t)
    value = stats.target_energy - 2.0 * float((t * stats.cross).sum()) + float((t * (stats.gram @ t)).sum())
    return max(value, 0.0)


# Ridge strengths tried, relative to the mean diagonal of the Gram matrix (its mean feature
# energy per token times the tokens); ``inf`` is the prior map itself.
RIDGE_GRID = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, float("inf"))


@dataclass
class RidgeChoice:
    transform: torch.Tensor
    alpha: float  # relative, as in RIDGE_GRID
    set_aside_rel_residual: dict[str, float | None]  # per strength; None where the system was singular


def ridge_toward(
    stats: CutStatistics,
    set_aside: CutStatistics,
    prior: torch.Tensor,
    grid: tuple[float, ...] = RIDGE_GRID,
) -> RidgeChoice:
    """``W = solve(A + αI, B + α·prior)`` (so α → ∞ gives ``prior``) for each strength of ``grid``,
    keeping the one with the smallest residual on the ``set_aside`` sums. With more features than
    the calibration tokens pin down, the set-aside text picks a strong pull toward ``prior``."""
    scale = float(torch.diagonal(stats.gram).mean())
    identity = torch.eye(stats.gram.shape[0], dtype=torch.float64)
    errors: dict[str, float | None] = {}
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in grid:
        if alpha == float("inf"):
            candidate = prior.to(torch.float64)
        else:
            a = alpha * scale
            # A + αI is symmetric positive (semi)definite: Cholesky takes half of LU's time, the most
            # of the prune's time on models like Qwen2.5-1.5B (d_ff 8960). A failed factorization
            # (A singular at α = 0) leaves that strength out.
            factor, info = torch.linalg.cholesky_ex(stats.gram + a * identity)
            candidate = torch.cholesky_solve(stats.cross + a * prior, factor)
            if int(info) != 0 or not torch.isfinite(candidate).all():
                errors[str(alpha)] = None
                continue
        error = residual_energy(set_aside, candidate) / max(set_aside.stream_energy, 1e-300)
        errors[str(alpha)] = error
        if best is None or error < best[0]:
            best = (error, alpha, candidate)
    assert best is not None  # the prior is always a candidate
    return RidgeChoice(best[2], best[1], errors)


@dataclass(frozen=True)
class CosineSettings:
    lr: float = 3e-4
    max_epochs: int = 30
    batch_tokens: int = 1024
    tolerance: float = 1e-4  # converged when an epoch improves the cosine loss by less than this, relatively
    patience: int = 3  # with a validation loss: stop after this many epochs without a new best
    seed: int = 0


def _cosine_loss(
    activations: CutActivations, transform: torch.Tensor, rows: Any = slice(None)
) -> torch.Tensor:
    features = activations.features[rows]
    mapped = features * transform if transform.dim() == 1 else features @ transform
    stream = activations.bypass[rows] + mapped
    return 1.0 - torch.nn.functional.cosine_similarity(stream, activations.after[rows], dim=-1).mean()


def _full_cosine_loss(activations: CutActivations, transform: torch.Tensor) -> float:
    total, tokens = 0.0, activations.mlp.shape[0]
    with torch.no_grad():
        for start in range(0, tokens, 8192):
            rows = slice(start, start + 8192)
            total += float(_cosine_loss(activations, transform, rows)) * activations.after[rows].shape[0]
    return total / tokens


def cosine_fit(
    activations: CutActivations,
    init: torch.Tensor,
    settings: CosineSettings = CosineSettings(),
    validate: Callable[[torch.Tensor], float] | None = None,
) -> FitResult:
    """Adam on ``1 − mean cos(bypass + F·T, after)`` from ``init`` (d×d, d_ff×d on the hidden
    activations, or a diagonal).

    The loss compares whole residual streams (the paper's objective), not only the part T
    produces. A lower cosine loss does not always mean a better model, so with ``validate``
    (T → a loss that matters, measured on text set aside) the best epoch by that loss is kept,
    ``init`` included, and the fit stops after ``patience`` epochs without a new best. Without
    it, the epoch with the lowest cosine loss is kept. Either way the fit also stops once an
    epoch improves the cosine loss by less than ``tolerance``; ``max_epochs`` is only a cap."""
    transform = init.detach().to(torch.float32).contiguous().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([transform], lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    tokens = activations.after.shape[0]

    curve = [_full_cosine_loss(activations, transform)]
    validation = [validate(transform.detach().double())] if validate else []
    judged = validation if validate else curve  # the curve that picks the epoch to keep
    best_epoch, best_transform = 0, transform.detach().clone()
    stopped = "max_epochs"
    for epoch in range(1, settings.max_epochs + 1):
        order = torch.randperm(tokens, generator=generator)
        with torch.enable_grad():
            for start in range(0, tokens, settings.batch_tokens):
                optimizer.zero_grad()
                _cosine_loss(activations, transform, order[start : start + settings.batch_tokens]).backward()
                optimizer.step()
        curve.append(_full_cosine_loss(activations, transform))
        if validate:
            validation.append(validate(transform.detach().double()))
        if judged[-1] < judged[best_epoch]:
            best_epoch, best_transform = epoch, transform.detach().clone()
        if validate and epoch - best_epoch >= settings.patience:
            stopped = "validation"
            break
        if (curve[-2] - curve[-1]) < settings.tolerance * curve[-2]:
            stopped = "tolerance"
            break
    details = {
        "loss_curve": curve,
        "epochs": len(curve) - 1,
        "best_epoch": best_epoch,
        "stopped": stopped,
        "lr": settings.lr,
    }
    if validate:
        details["validation_curve"] = validation
    return FitResult(best_transform.to(torch.float64), "cosine", details)
