"""Measure every candidate cut in one calibration pass, then fit the chosen one.

The survey holds, per candidate start, the distance across the cut and (memory permitting) the
streamed sums from which the least-squares map and its residual follow without another pass.
Everything runs on the block engine, over the plan of the model as pruned so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..arch import ArchAdapter
from ..calib.collect import (
    CutStatistics,
    CutSums,
    DistanceProfile,
    Trace,
    collect,
    cut_sums,
    distances_then_closest_sums,
)
from ..calib.engine import Engine, Map, Plan, Stream, cut_plan
from ..calib.tokens import CalibrationSet
from ..errors import ConfigError
from ..log import get_logger
from .select import CutScores, candidate_starts
from .solve import (
    RIDGE_GRID,
    CosineSettings,
    FitResult,
    diagonal_lstsq_from_gram,
    lstsq_from_gram,
    residual_energy,
    ridge_toward,
)
from .solvers import FitInputs, solver_named

__all__ = [
    "CandidateSurvey",
    "SelectionScorer",
    "fit_cut",
    "hidden_map",
    "hidden_map_problem",
    "hidden_statistics_bytes",
    "least_squares_map",
    "survey_candidates",
]

log = get_logger(__name__)


def least_squares_map(adapter: ArchAdapter, stats: CutStatistics, alpha: float) -> torch.Tensor:
    """Dense LS map, or the diagonal one for families with a norm after the MLP."""
    if adapter.dense_fold:
        return lstsq_from_gram(stats.gram, stats.cross, alpha)
    return diagonal_lstsq_from_gram(stats.gram, stats.cross, alpha)


@dataclass
class CandidateSurvey:
    n: int
    starts: list[int]
    profile: DistanceProfile
    stats: dict[int, CutStatistics]
    maps: dict[int, torch.Tensor]  # least-squares map per candidate with statistics
    trace: Trace | None = None  # the calibration pass's stream after every step, until fitted
    surveyed_all: bool = True  # whether the survey read every calibration batch

    def release_trace(self) -> None:
        if self.trace is not None:
            self.trace.release()
            self.trace = None

    def scores(self, distance_tokens: str) -> CutScores:
        d = next(iter(self.stats.values())).gram.shape[0] if self.stats else 0
        identity = torch.ones(d, dtype=torch.float64)
        return CutScores(
            distance=self.profile.mean(distance_tokens),
            fit={s: residual_energy(a, self.maps[s]) / a.stream_energy for s, a in self.stats.items()},
            removal={s: residual_energy(a, identity) / a.stream_energy for s, a in self.stats.items()},
        )

    def table(self) -> dict[str, Any]:
        scores = self.scores("last")
        return {
            "candidates": self.starts,
            "tokens": self.profile.all_count,
            "distance_last": self.profile.mean("last"),
            "distance_all": self.profile.mean("all"),
            "fit_rel_residual": scores.fit,
            "removal_rel_residual": scores.removal,
        }


def survey_candidates(
    engine: Engine,
    plan: Plan,
    calibration: CalibrationSet,
    n: int,
    *,
    stats_budget_bytes: int,
    alpha: float = 0.0,
    distance_tokens: str = "last",
    shortlist_only: bool = False,
    allowed: Callable[[int], bool] | None = None,
    survey_batches: list[int] | None = None,
    keep_trace: bool = False,
    step: str = "",
) -> CandidateSurvey:
    """One pass when the sums of every candidate fit in ``stats_budget_bytes``; otherwise distances
    first, then sums for as many of the closest candidates as fit (only the closest with
    ``shortlist_only``, which is all the distance rule needs). ``allowed`` keeps only the starts a
    deployment target can represent. The survey reads ``calibration``'s batches ``survey_batches``
    (all by default); ``fit_cut`` reads all of them for the chosen cut. ``keep_trace`` keeps the one
    pass's stream after every step for that next pass (see ``Trace``) where it fits the
    activations' budget."""
    starts = [s for s in candidate_starts(len(plan), n) if allowed is None or allowed(s)]
    if not starts:
        raise ConfigError(f"no cut of {n} blocks of {len(plan)} is allowed", hint="choose another --layers")
    ids = list(range(len(calibration.batches))) if survey_batches is None else sorted(survey_batches)
    surveyed = calibration if len(ids) == len(calibration.batches) else calibration.subset(ids)
    d = engine.config.hidden_size
    affordable = max(1, stats_budget_bytes // (2 * d * d * 8))
    label = f"{step} Calibrating".strip()
    trace = None
    if shortlist_only:
        profile, stats = distances_then_closest_sums(
            engine, plan, surveyed, n=n, starts=starts, distance_tokens=distance_tokens, desc=label
        )
    elif affordable >= len(starts):
        if keep_trace and _trace_fits(engine, plan, surveyed):
            trace = Trace(engine, plan, calibration, ids)
        profile, stats = collect(
            engine, plan, surveyed, n=n, starts=starts, stats_for=starts, desc=label, trace=trace
        )
    else:
        profile, _ = collect(
            engine, plan, surveyed, n=n, starts=starts, stats_for=[], desc=f"{step} Distances".strip()
        )
        distances = profile.mean(distance_tokens)
        shortlist = sorted(starts, key=lambda s: (distances[s], s))[:affordable]
        _, stats = collect(
            engine,
            plan,
            surveyed,
            n=n,
            starts=shortlist,
            stats_for=shortlist,
            desc=f"{step} Statistics".strip(),
        )
    maps = {s: least_squares_map(engine.adapter, acc, alpha) for s, acc in stats.items()}
    return CandidateSurvey(n, starts, profile, stats, maps, trace, surveyed_all=surveyed is calibration)


def _trace_fits(engine: Engine, plan: Plan, surveyed: CalibrationSet) -> bool:
    store = engine.store
    return Trace.bytes_needed(engine, plan, surveyed.batches) <= store.budget_bytes - store.resident_bytes


def hidden_map_problem(
    engine: Engine, set_aside: CalibrationSet | None, stats_budget_bytes: int | None
) -> str | None:
    """Why this prune cannot fit a map of the MLP's hidden activations, or None."""
    config, adapter = engine.config, engine.adapter
    if not adapter.dense_fold:
        return f"{adapter.family} has a norm after the MLP: only a diagonal map of its output folds exactly"
    d, d_ff = config.hidden_size, getattr(config, "intermediate_size", None)
    if d_ff is None or d_ff == d:
        return "the MLP's hidden size equals the model's, so a map of it cannot be told from T"
    if set_aside is None:
        return "no set-aside text to choose the ridge strength on"
    needed = hidden_statistics_bytes(d, d_ff)
    if stats_budget_bytes is not None and needed > stats_budget_bytes:
        return (
            f"its statistics need {needed / 2**30:.2f} GiB, more than the "
            f"{stats_budget_bytes / 2**30:.2f} GiB the memory budget leaves for statistics "
            "(raise --memory-budget)"
        )
    return None


def hidden_statistics_bytes(d: int, d_ff: int) -> int:
    """Float64 sums of the calibration and set-aside text, and the solver's working copies."""
    return 8 * (4 * d_ff * d_ff + 4 * d_ff * d)


def hidden_map(
    engine: Engine,
    plan: Plan,
    cut: tuple[int, int],
    sums: CutSums,
    set_aside: CutSums,
    output_map: torch.Tensor,
    *,
    grid: tuple[float, ...] = RIDGE_GRID,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The map of the MLP's hidden activations for ``cut`` of ``plan`` from the calibration
    ``sums``, shrunk toward ``output_map`` (T, as the same map of the hidden activations:
    ``W_downᵀ·T``) by the strength of ``grid`` with the smallest error on ``set_aside``. Returns
    the map and what the record says about it."""
    assert sums.hidden is not None and set_aside.hidden is not None
    prior = engine.down_proj_weight(plan[cut[0] - 1]).T @ output_map.to(torch.float64)
    choice = ridge_toward(sums.hidden, set_aside.hidden, prior, grid)
    details = {
        "map": "hidden",
        "ridge_toward_T": choice.alpha,
        "set_aside_rel_residual": choice.set_aside_rel_residual,
        "set_aside_tokens": set_aside.hidden.tokens,
    }
    return choice.transform, details


def fit_cut(
    engine: Engine,
    plan: Plan,
    calibration: CalibrationSet,
    survey: CandidateSurvey,
    start: int,
    *,
    solver: str = "lstsq",
    alpha: float = 0.0,
    map_space: str = "output",
    set_aside: CalibrationSet | None = None,
    stats_budget_bytes: int | None = None,
    cosine: CosineSettings | None = None,
    validate: Callable[[torch.Tensor], float] | None = None,
    keep_ends: bool = False,
    step: str = "",
) -> FitResult:
    """The map for the cut ``[start, start + n)``: the least-squares map, given to ``solver``.

    The sums come from the survey where it read every calibration batch and holds them; else from
    one more pass over the calibration text for this cut (from the survey's trace where it kept
    one, see ``Trace``). ``map_space="hidden"`` fits the map of the MLP's hidden activations
    (their sums gathered in that pass, with the ``set_aside`` text's), shrunk toward T by the
    ridge strength that fits ``set_aside`` best; where that cannot be done (see
    ``hidden_map_problem``) the map of the MLP's output is fitted and the reason recorded.
    ``validate`` (see ``SelectionScorer.validator``) judges the cosine epochs by a loss that
    matters, so the LS map is kept unless an epoch does better there. ``keep_ends`` keeps the
    streams around the cut of the map's pass in ``FitResult.ends`` (the caller releases them)."""
    cut = (start, start + survey.n)
    problem = hidden_map_problem(engine, set_aside, stats_budget_bytes) if map_space == "hidden" else None
    hidden = map_space == "hidden" and problem is None
    if hidden or not survey.surveyed_all or start not in survey.stats:
        sets = [calibration] + ([set_aside] if hidden and set_aside is not None else [])
        sums = cut_sums(
            engine,
            plan,
            sets,
            cut,
            hidden=hidden,
            trace=survey.trace,
            keep_ends=keep_ends,
            desc=f"{step} {'Hidden statistics' if hidden else 'Statistics'}".strip(),
        )
        plain, output_map = sums[0].output, least_squares_map(engine.adapter, sums[0].output, alpha)
    else:
        sums, plain, output_map = None, survey.stats[start], survey.maps[start]
    survey.release_trace()
    stats, init, details = plain, output_map, {"map": "output"}
    if hidden:
        assert sums is not None
        init, details = hidden_map(engine, plan, cut, sums[0], sums[1], output_map)
        stats = sums[0].hidden
    elif problem is not None:
        log.warning("fitting the map of the MLP's output: %s", problem)
        details["map_note"] = problem
    given = FitInputs(
        engine, plan, calibration, cut, hidden, init, alpha, cosine or CosineSettings(), validate, step
    )
    result = solver_named(solver).fit(given)
    if sums is not None and keep_ends:
        result.ends = [one.ends for one in sums]
    identity = torch.ones(plain.gram.shape[0], dtype=torch.float64)
    result.details |= details | {
        "rel_residual": residual_energy(stats, result.transform) / stats.stream_energy,
        "rel_residual_plain_removal": residual_energy(plain, identity) / plain.stream_energy,
        "tokens": stats.tokens,
        "diagonal": not engine.adapter.dense_fold,
    }
    return result


class SelectionScorer:
    """Mean next-token loss of trial cuts on calibration text set aside for selection.

    The set-aside batches are embedded once; the steps every trial shares (the blocks before the
    earliest fold) run once per prefix and are reused by later trials."""

    def __init__(self, engine: Engine, selection: CalibrationSet):
        self.engine = engine
        self.selection = selection
        self._embedded = engine.embed("selection", selection.batches)
        self._prefixes: dict[Plan, Stream] = {(): self._embedded}

    def _prefix(self, steps: Plan) -> Stream:
        if steps not in self._prefixes:
            self._prefixes[steps] = self.engine.advance(
                "selection", self._embedded, {"prefix": steps}, desc="Selection prefix"
            )["prefix"]
        return self._prefixes[steps]

    def losses(self, plans: dict[str, Plan], shared: int) -> dict[str, float]:
        """Loss of each plan; ``shared`` leading steps are the same in all of them."""
        return {name: loss for name, (loss, _) in self.losses_and_divergences(plans, shared).items()}

    def losses_and_divergences(
        self, plans: dict[str, Plan], shared: int, reference: str | None = None
    ) -> dict[str, tuple[float, float | None]]:
        """Mean loss of each plan and, where ``reference`` names one of them, each other plan's
        mean KL(reference ‖ plan) of the next-token distributions (None for the reference)."""
        prefix = self._prefix(next(iter(plans.values()))[:shared])
        ends = self.engine.advance("selection", prefix, plans, desc="Selection")
        batches = self.selection.batches

        def targets(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            ids, mask = batches[b]
            return ids, mask[:, 1:].bool()

        compare = [(name, reference) for name in plans if reference is not None and name != reference]
        try:
            sums, comparisons = self.engine.head_pass(
                "selection", ends, targets=targets, compare=compare, kl=True, desc="Selection loss"
            )
        finally:
            self.engine.release(*ends.values())
        return {
            name: (
                total / max(count, 1),
                comparisons[(name, reference)].mean_kl if (name, reference) in comparisons else None,
            )
            for name, (total, count) in sums.items()
        }

    def trial_losses(
        self, plan: Plan, n: int, maps: dict[int, torch.Tensor], candidates: list[int]
    ) -> dict[int, float]:
        """Loss of ``plan`` cut at each candidate start with its map folded in."""
        plans = {str(s): cut_plan(plan, (s, s + n), Map(maps[s], f"trial {s}")) for s in candidates}
        losses = self.losses(plans, shared=min(candidates) - 1)
        return {s: losses[str(s)] for s in candidates}

    def validator(self, plan: Plan, cut: tuple[int, int]) -> Callable[[torch.Tensor], float]:
        """T -> loss of ``plan`` cut at ``cut`` with T folded in (the cosine solver's judge)."""

        def loss(transform: torch.Tensor) -> float:
            trial = cut_plan(plan, cut, Map(transform, "epoch"))
            return self.losses({"trial": trial}, shared=cut[0] - 1)["trial"]

        return loss

    def close(self) -> None:
        self.engine.release(*self._prefixes.values())
        self._prefixes.clear()
        self.engine.forget("selection")
