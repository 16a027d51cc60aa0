"""Calibration statistics of candidate cuts, streamed block by block through the engine.

Per calibration batch, the residual stream ``L_j`` after each block and the MLP's contribution
``M_j`` are reduced, as soon as the block closing a cut has run, to:

* the angular distance between ``L_{s-1}`` and ``L_{s+n-1}`` for every candidate start ``s``,
  over the last real token of each sequence and over all real tokens;
* for every candidate whose statistics are requested, the float64 sums
  ``A = Σ MᵀM``, ``B = Σ Mᵀ·target`` with ``M = M_{s-1}`` and ``target = L_{s+n-1} − L_{s-1} + M``,
  plus ``Σ‖target‖²`` and ``Σ‖L_{s+n-1}‖²`` (for the residual of the fit and of plain removal).

A pass stops after the deepest block any candidate needs (no later blocks, no LM head). Only the
activations a candidate still needs are kept, in the engine's store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import CalibrationError
from ..measures import angular_distance
from .engine import Engine, Plan
from .tokens import CalibrationSet

__all__ = [
    "CutActivations",
    "CutStatistics",
    "DistanceProfile",
    "collect",
    "collect_activations",
    "distances_then_closest_sums",
]


@dataclass
class CutStatistics:
    """Streaming sums for one candidate cut ``[start, start + n)``; see the module docstring."""

    start: int
    n: int
    gram: torch.Tensor  # A, d×d float64
    cross: torch.Tensor  # B, d×d float64
    target_energy: float = 0.0  # Σ‖target‖²
    stream_energy: float = 0.0  # Σ‖L_{s+n-1}‖²
    tokens: int = 0

    @property
    def cut(self) -> tuple[int, int]:
        return (self.start, self.start + self.n)


@dataclass
class DistanceProfile:
    """Mean angular distance per candidate start, over last tokens and over all real tokens."""

    n: int
    starts: list[int]
    last_sum: dict[int, float] = field(default_factory=dict)
    last_count: int = 0
    all_sum: dict[int, float] = field(default_factory=dict)
    all_count: int = 0

    def mean(self, tokens: str) -> dict[int, float]:
        sums, count = (self.last_sum, self.last_count) if tokens == "last" else (self.all_sum, self.all_count)
        return {s: sums.get(s, 0.0) / max(count, 1) for s in self.starts}


def _accumulate(acc: CutStatistics, mlp_out: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> None:
    m = mlp_out.to(torch.float64)
    gram = m.T @ m
    acc.gram += gram.cpu()
    acc.cross += (m.T @ (after.to(torch.float64) - before.to(torch.float64))).cpu() + gram.cpu()
    target = after.to(torch.float64) - before.to(torch.float64) + m
    acc.target_energy += float((target * target).sum())
    acc.stream_energy += float(after.to(torch.float64).pow(2).sum())
    acc.tokens += int(m.shape[0])


@dataclass
class CutActivations:
    """Every real token's activations around one cut, float32, for solvers that need them raw.

    After folding T, the stream leaving block ``s-1`` is ``bypass + mlp·T``; the fit wants it
    to match ``after``, the stream the removed blocks produced."""

    mlp: torch.Tensor  # M_{s-1}
    bypass: torch.Tensor  # L_{s-1} − M_{s-1}
    after: torch.Tensor  # L_{s+n-1}

    @classmethod
    def from_batches(cls, mlp: list[torch.Tensor], before: list[torch.Tensor], after: list[torch.Tensor]):
        m = torch.cat(mlp)
        return cls(m, torch.cat(before) - m, torch.cat(after))

    @property
    def target(self) -> torch.Tensor:
        """What ``mlp·T`` alone must reproduce (the least-squares target)."""
        return self.after - self.bypass


# callback(start, batch, before=L_{s-1}, after=L_{s+n-1}, mlp=M_{s-1} or None, real-token mask)
CutCallback = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], None]


def _stream_cuts(
    engine: Engine,
    plan: Plan,
    calibration: CalibrationSet,
    *,
    n: int,
    starts: list[int],
    mlp_starts: list[int],
    on_cut: CutCallback,
    desc: str,
    keep: bool = False,
) -> None:
    """Run the calibration set through ``plan`` and call ``on_cut`` for every (start, batch) once
    the block closing the cut has run. With ``keep``, every ``("L", k, b)``/``("M", k, b)`` stays
    in the engine's store afterwards (the caller drops them)."""
    store = engine.store
    residual_positions = {s - 1 for s in starts} | {s + n - 1 for s in starts}
    mlp_positions = {s - 1 for s in mlp_starts}
    deepest = max(residual_positions | mlp_positions)
    last_use: dict[tuple[str, int], int] = {}
    for s in starts:
        for key in (("L", s - 1), ("L", s + n - 1)):
            last_use[key] = max(last_use.get(key, -1), s + n - 1)
    for s in mlp_starts:
        last_use[("M", s - 1)] = max(last_use.get(("M", s - 1), -1), s + n - 1)
    ending_at: dict[int, list[int]] = {}
    for s in starts:
        ending_at.setdefault(s + n - 1, []).append(s)
    masks = [mask.bool().to(engine.skeleton.device) for _ids, mask in calibration.batches]

    def on_block(position: int, b: int, hidden: torch.Tensor, mlp: torch.Tensor | None) -> None:
        if position in residual_positions:
            store.put(("L", position, b), hidden)
        if position in mlp_positions:
            store.put(("M", position, b), mlp)
        for s in ending_at.get(position, []):
            before_mlp = store.get(("M", s - 1, b)) if ("M", s - 1, b) in store else None
            on_cut(s, b, store.get(("L", s - 1, b)), hidden, before_mlp, masks[b])
        if not keep:
            for (kind, k), last in last_use.items():
                if last == position:
                    store.drop((kind, k, b))

    stream = engine.embed("calibration", calibration.batches)
    try:
        engine.walk(
            "calibration", stream, plan, until=deepest, mlp_at=mlp_positions, on_block=on_block, desc=desc
        )
    finally:
        engine.forget("calibration")


def _empty_stats(starts: list[int], n: int, d: int) -> dict[int, CutStatistics]:
    return {
        s: CutStatistics(s, n, torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64))
        for s in starts
    }


def collect(
    engine: Engine,
    plan: Plan,
    calibration: CalibrationSet,
    *,
    n: int,
    starts: list[int],
    stats_for: list[int],
    desc: str = "Calibrating",
) -> tuple[DistanceProfile, dict[int, CutStatistics]]:
    """One pass: the distance profile of every ``start`` and the sums of every ``stats_for`` start
    (starts index the steps of ``plan``)."""
    profile = DistanceProfile(n=n, starts=list(starts))
    stats = _empty_stats(list(stats_for), n, engine.config.hidden_size)

    def on_cut(s, _b, before, after, mlp, real):
        _add_distances(profile, s, before, after, real)
        if s in stats:
            _accumulate(stats[s], mlp[real], before[real], after[real])

    _stream_cuts(
        engine,
        plan,
        calibration,
        n=n,
        starts=list(starts),
        mlp_starts=list(stats_for),
        on_cut=on_cut,
        desc=desc,
    )
    _count_tokens(profile, calibration)
    _check_finite(stats)
    return profile, stats


def distances_then_closest_sums(
    engine: Engine,
    plan: Plan,
    calibration: CalibrationSet,
    *,
    n: int,
    starts: list[int],
    distance_tokens: str,
    desc: str = "Calibrating",
) -> tuple[DistanceProfile, dict[int, CutStatistics]]:
    """One pass for the distance rule: distances of every candidate while the activations the sums
    need are kept (spilled to disk beyond the budget); then the sums of the closest cut only."""
    profile = DistanceProfile(n=n, starts=list(starts))

    def on_cut(s, _b, before, after, _mlp, real):
        _add_distances(profile, s, before, after, real)

    store = engine.store
    try:
        _stream_cuts(
            engine,
            plan,
            calibration,
            n=n,
            starts=list(starts),
            mlp_starts=list(starts),
            on_cut=on_cut,
            desc=desc,
            keep=True,
        )
        _count_tokens(profile, calibration)
        distances = profile.mean(distance_tokens)
        chosen = min(distances, key=lambda s: (distances[s], s))
        stats = _empty_stats([chosen], n, engine.config.hidden_size)
        for b, (_ids, mask) in enumerate(calibration.batches):
            real = mask.bool().to(engine.skeleton.device)
            _accumulate(
                stats[chosen],
                store.get(("M", chosen - 1, b))[real],
                store.get(("L", chosen - 1, b))[real],
                store.get(("L", chosen + n - 1, b))[real],
            )
    finally:
        for b in range(len(calibration.batches)):
            for s in starts:
                for key in (("L", s - 1, b), ("L", s + n - 1, b), ("M", s - 1, b)):
                    store.drop(key)
    _check_finite(stats)
    return profile, stats


def collect_activations(
    engine: Engine, plan: Plan, calibration: CalibrationSet, cut: tuple[int, int], desc: str = "Collecting"
) -> CutActivations:
    """Every real token's activations around ``cut``, for solvers that need them raw."""
    start, end = cut
    mlp: dict[int, torch.Tensor] = {}
    before: dict[int, torch.Tensor] = {}
    after: dict[int, torch.Tensor] = {}

    def on_cut(_s, b, stream_before, stream_after, mlp_out, real):
        mlp[b] = mlp_out[real].float().cpu()
        before[b] = stream_before[real].float().cpu()
        after[b] = stream_after[real].float().cpu()

    _stream_cuts(
        engine, plan, calibration, n=end - start, starts=[start], mlp_starts=[start], on_cut=on_cut, desc=desc
    )
    order = sorted(mlp)
    return CutActivations.from_batches(
        [mlp[b] for b in order], [before[b] for b in order], [after[b] for b in order]
    )


def _add_distances(
    profile: DistanceProfile, s: int, before: torch.Tensor, after: torch.Tensor, real: torch.Tensor
) -> None:
    last = real.sum(dim=1) - 1
    rows = torch.arange(real.shape[0], device=real.device)
    profile.last_sum[s] = profile.last_sum.get(s, 0.0) + float(
        angular_distance(before[rows, last], after[rows, last]).sum()
    )
    profile.all_sum[s] = profile.all_sum.get(s, 0.0) + float(
        angular_distance(before[real], after[real]).sum()
    )


def _count_tokens(profile: DistanceProfile, calibration: CalibrationSet) -> None:
    for ids, mask in calibration.batches:
        profile.last_count += int(ids.shape[0])
        profile.all_count += int(mask.bool().sum())


def _check_finite(stats: dict[int, CutStatistics]) -> None:
    for acc in stats.values():
        if not (torch.isfinite(acc.gram).all() and torch.isfinite(acc.cross).all()):
            raise CalibrationError(
                f"non-finite statistics for cut {acc.cut}",
                hint="check the weights, or use --compute-dtype float32",
            )
