"""Pure maths: fit the linear map T from streamed statistics or raw activation pairs.

``lstsq`` solves the ridge normal equations ``(A + αI)·T = B`` (never an explicit inverse).
``cosine`` minimises ``1 − mean cos(M·T, target)`` with Adam, starting from the LS solution,
and stops when an epoch no longer improves the loss by a relative tolerance.
For families whose MLP output passes through a norm, T is diagonal (one scale per channel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..calib.collect import CutStatistics
from ..errors import CalibrationError

__all__ = [
    "CosineSettings",
    "FitResult",
    "cosine_fit",
    "diagonal_lstsq_from_gram",
    "lstsq_from_gram",
    "residual_energy",
]


@dataclass
class FitResult:
    transform: torch.Tensor  # d×d, or length-d diagonal
    solver: str
    details: dict = field(default_factory=dict)


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


@dataclass(frozen=True)
class CosineSettings:
    lr: float = 1e-4
    max_epochs: int = 10
    batch_tokens: int = 1024
    tolerance: float = 1e-4  # stop when an epoch improves the loss by less than this, relatively
    seed: int = 0


def _cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.nn.functional.cosine_similarity(pred, target, dim=-1).mean()


def cosine_fit(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    init: torch.Tensor,
    settings: CosineSettings = CosineSettings(),
) -> FitResult:
    """Adam on the cosine loss from ``init`` (d×d or a diagonal); returns T and the loss curve."""
    diagonal = init.dim() == 1
    transform = init.detach().to(torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([transform], lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)

    def apply(batch: torch.Tensor) -> torch.Tensor:
        return batch * transform if diagonal else batch @ transform

    def full_loss() -> float:
        with torch.no_grad():
            total = 0.0
            for start in range(0, inputs.shape[0], 8192):
                chunk = slice(start, start + 8192)
                sims = torch.nn.functional.cosine_similarity(apply(inputs[chunk]), targets[chunk], dim=-1)
                total += float(sims.sum())
            return 1.0 - total / inputs.shape[0]

    curve = [full_loss()]
    best, best_transform = curve[0], transform.detach().clone()
    stopped = "max_epochs"
    with torch.enable_grad():
        for _epoch in range(settings.max_epochs):
            order = torch.randperm(inputs.shape[0], generator=generator)
            for start in range(0, inputs.shape[0], settings.batch_tokens):
                index = order[start : start + settings.batch_tokens]
                optimizer.zero_grad()
                _cosine_loss(apply(inputs[index]), targets[index]).backward()
                optimizer.step()
            curve.append(full_loss())
            if curve[-1] < best:
                improvement = (best - curve[-1]) / max(best, 1e-12)
                best, best_transform = curve[-1], transform.detach().clone()
                if improvement < settings.tolerance:
                    stopped = "tolerance"
                    break
            else:
                stopped = "no_improvement"
                break
    return FitResult(
        best_transform.to(torch.float64),
        "cosine",
        {"loss_curve": curve, "epochs": len(curve) - 1, "stopped": stopped, "lr": settings.lr},
    )
