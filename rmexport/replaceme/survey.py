"""Measure every candidate cut in one calibration pass, then fit the chosen one.

The survey holds, per candidate start, the distance across the cut and (memory permitting) the
streamed sums from which the least-squares map and its residual follow without another pass.
Both steps run on a ``CalibrationSource``: a model held whole (``WholeModel``) or streamed block
by block (``sequential.calibrate.StreamedModel``); they see the same numbers either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..arch import ArchAdapter
from ..calib.collect import CutActivations, CutStatistics, DistanceProfile, collect, collect_activations
from ..calib.tokens import CalibrationSet
from .select import CutScores, candidate_starts
from .solve import (
    CosineSettings,
    FitResult,
    cosine_fit,
    diagonal_lstsq_from_gram,
    lstsq_from_gram,
    residual_energy,
)

__all__ = [
    "CalibrationSource",
    "CandidateSurvey",
    "WholeModel",
    "fit_cut",
    "least_squares_map",
    "selection_loss",
    "selection_validator",
    "survey_candidates",
]

# Statistics of every candidate cut are kept in one pass while they fit in this much memory.
STATS_MEMORY_FRACTION = 0.25


def _stats_budget_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * STATS_MEMORY_FRACTION)


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
            "distance_last": self.profile.mean("last"),
            "distance_all": self.profile.mean("all"),
            "fit_rel_residual": scores.fit,
            "removal_rel_residual": scores.removal,
        }


class CalibrationSource(Protocol):
    """A model that calibration text runs through, whole or block by block.

    A source may also offer ``closest_by_distance(calibration, *, n, starts, distance_tokens,
    desc)``: the distances of every start and the sums of the closest, in one pass."""

    @property
    def adapter(self) -> ArchAdapter: ...

    @property
    def n_blocks(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    def collect(
        self, calibration: CalibrationSet, *, n: int, starts: list[int], stats_for: list[int], desc: str
    ) -> tuple[DistanceProfile, dict[int, CutStatistics]]: ...

    def collect_activations(
        self, calibration: CalibrationSet, cut: tuple[int, int], desc: str
    ) -> CutActivations: ...


@dataclass
class WholeModel:
    """A model held in memory; each pass stops after the deepest block it needs."""

    model: Any
    adapter: ArchAdapter

    @property
    def n_blocks(self) -> int:
        return len(self.adapter.blocks(self.model))

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def collect(self, calibration, *, n, starts, stats_for, desc):
        return collect(
            self.model, self.adapter, calibration, n=n, starts=starts, stats_for=stats_for, desc=desc
        )

    def collect_activations(self, calibration, cut, desc):
        return collect_activations(self.model, self.adapter, calibration, cut, desc=desc)


def survey_candidates(
    source: CalibrationSource,
    calibration: CalibrationSet,
    n: int,
    *,
    alpha: float = 0.0,
    distance_tokens: str = "last",
    shortlist_only: bool = False,
    step: str = "",
) -> CandidateSurvey:
    """One pass when the sums of every candidate fit in memory; otherwise distances first, then
    sums for as many of the closest candidates as fit (only the closest with ``shortlist_only``,
    which is all the distance rule needs)."""
    starts = candidate_starts(source.n_blocks, n)
    d = source.hidden_size
    affordable = max(1, _stats_budget_bytes() // (2 * d * d * 8))
    closest_by_distance = getattr(source, "closest_by_distance", None)
    if shortlist_only and closest_by_distance is not None:
        profile, stats = closest_by_distance(
            calibration,
            n=n,
            starts=starts,
            distance_tokens=distance_tokens,
            desc=f"{step} Calibrating".strip(),
        )
    elif affordable >= len(starts):
        profile, stats = source.collect(
            calibration, n=n, starts=starts, stats_for=starts, desc=f"{step} Calibrating".strip()
        )
    else:
        profile, _ = source.collect(
            calibration, n=n, starts=starts, stats_for=[], desc=f"{step} Distances".strip()
        )
        distances = profile.mean(distance_tokens)
        shortlist = sorted(starts, key=lambda s: (distances[s], s))[: 1 if shortlist_only else affordable]
        _, stats = source.collect(
            calibration, n=n, starts=shortlist, stats_for=shortlist, desc=f"{step} Statistics".strip()
        )
    maps = {s: least_squares_map(source.adapter, acc, alpha) for s, acc in stats.items()}
    return CandidateSurvey(n, starts, profile, stats, maps)


def fit_cut(
    source: CalibrationSource,
    calibration: CalibrationSet,
    survey: CandidateSurvey,
    start: int,
    *,
    solver: str = "lstsq",
    alpha: float = 0.0,
    cosine: CosineSettings | None = None,
    validate: Callable[[torch.Tensor], float] | None = None,
    step: str = "",
) -> FitResult:
    """The map for the cut ``[start, start + n)``: least squares, or cosine started from it.

    ``validate`` (see ``selection_validator``) judges the cosine epochs by a loss that matters,
    so the LS map is kept unless an epoch does better there."""
    cut = (start, start + survey.n)
    if start not in survey.stats:
        _, extra = source.collect(
            calibration, n=survey.n, starts=[start], stats_for=[start], desc=f"{step} Statistics".strip()
        )
        survey.stats[start] = extra[start]
        survey.maps[start] = least_squares_map(source.adapter, extra[start], alpha)
    stats = survey.stats[start]
    if solver == "cosine":
        activations = source.collect_activations(calibration, cut, desc=f"{step} Collecting".strip())
        result = cosine_fit(activations, survey.maps[start], cosine or CosineSettings(), validate)
        del activations
    else:
        result = FitResult(survey.maps[start], "lstsq", {"alpha": alpha})
    identity = torch.ones(stats.gram.shape[0], dtype=torch.float64)
    result.details |= {
        "rel_residual": residual_energy(stats, result.transform) / stats.stream_energy,
        "rel_residual_plain_removal": residual_energy(stats, identity) / stats.stream_energy,
        "tokens": stats.tokens,
        "diagonal": not source.adapter.dense_fold,
    }
    return result


def selection_validator(
    model: Any, adapter: ArchAdapter, survey: CandidateSurvey, start: int, selection: CalibrationSet
) -> Callable[[torch.Tensor], float]:
    """T → loss on the set-aside text of the model pruned at ``start`` with T folded in."""

    def loss(transform: torch.Tensor) -> float:
        return selection_loss(model, adapter, survey, [start], selection, {start: transform})[start]

    return loss


def selection_loss(
    model: Any,
    adapter: ArchAdapter,
    survey: CandidateSurvey,
    candidates: list[int],
    selection: CalibrationSet,
    maps: dict[int, torch.Tensor] | None = None,
) -> dict[int, float]:
    """Mean next-token loss of the model pruned at each candidate (with its map folded in: the LS
    map unless ``maps`` gives another), on calibration text set aside for selection. The model is
    restored after each trial."""
    from .apply import remove_blocks
    from .checks import apply_fold

    losses: dict[int, float] = {}
    for start in candidates:
        blocks_before = adapter.blocks(model)
        fold = apply_fold(adapter, blocks_before[start - 1], (maps or survey.maps)[start])
        config_before = model.config.to_dict()
        try:
            remove_blocks(model, adapter, (start, start + survey.n))
            losses[start] = _mean_loss(model, selection)
        finally:
            _restore_blocks(model, adapter, blocks_before, config_before)
            _undo_fold(adapter, fold)
    return losses


def _undo_fold(adapter: ArchAdapter, fold: Any) -> None:
    from .checks import _folded_parameters

    params = _folded_parameters(adapter, fold.block)
    for name, value in fold.original.items():
        params[name].data.copy_(value)


def _restore_blocks(model: Any, adapter: ArchAdapter, blocks: torch.nn.ModuleList, config: dict) -> None:
    parent_path, _, attr = adapter.layers_path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, blocks)
    for layer_idx, block in enumerate(blocks):
        attention = getattr(block, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = layer_idx
    for key in ("num_hidden_layers", *adapter.per_layer_keys, "max_window_layers"):
        if key in config:
            setattr(model.config, key, config[key])


def _mean_loss(model: Any, selection: CalibrationSet) -> float:
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for ids, mask in selection.batches:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            picked = log_probs.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            real = mask[:, 1:].bool().to(device)
            total += float(-picked[real].sum())
            count += int(real.sum())
    return total / max(count, 1)
