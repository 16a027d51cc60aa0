"""Calibration statistics of candidate cuts, streamed block by block through the engine.

Per calibration batch, the residual stream ``L_j`` after each block and the MLP's contribution
``M_j`` are reduced, as soon as the block closing a cut has run, to:

* the angular distance between ``L_{s-1}`` and ``L_{s+n-1}`` for every candidate start ``s``,
  over the last real token of each sequence and over all real tokens;
* for every candidate whose statistics are requested, the float64 sums
  ``A = Σ FᵀF``, ``B = Σ Fᵀ·target`` with ``target = L_{s+n-1} − L_{s-1} + M_{s-1}`` and features
  ``F = M_{s-1}`` (the MLP's output, for a d×d map) or ``F = H_{s-1}`` (the MLP's hidden
  activations, the input of ``down_proj``, for a d_ff×d map), plus ``Σ‖target‖²`` and
  ``Σ‖L_{s+n-1}‖²`` (for the residual of the fit and of plain removal).

A pass stops after the deepest block any candidate needs (no later blocks, no LM head). Only the
activations a candidate still needs are kept, in the engine's store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import CalibrationError
from ..measures import angular_distance
from .engine import Batches, Captured, Engine, Plan, Stream
from .tokens import CalibrationSet

__all__ = [
    "CutActivations",
    "CutBatch",
    "CutStatistics",
    "DistanceProfile",
    "Trace",
    "accumulate",
    "collect",
    "collect_activations",
    "CutEnds",
    "CutSums",
    "cut_sums",
    "distances_then_closest_sums",
    "empty_statistics",
]


@dataclass
class CutStatistics:
    """Streaming sums for one candidate cut ``[start, start + n)``; see the module docstring."""

    start: int
    n: int
    gram: torch.Tensor  # A, f×f float64 (f = d, or d_ff for the hidden activations)
    cross: torch.Tensor  # B, f×d float64
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


def _product_dtype(activations: torch.dtype) -> torch.dtype:
    """The dtype of one batch's products before they are added to the float64 sums.

    Activations from 16-bit forwards carry 8 (bfloat16) or 11 (float16) significant bits, so the
    product of two is exact in float32 and a batch's float32 sum errs by about 1e-6 relative: a
    thousand times below the activations' own rounding, at half the time of float64 products on
    a CPU (a d_ff² sum per batch is the prune's largest product on models like Qwen2.5-1.5B).
    Float32 activations keep float64 products, so a float32 prune gives the same bytes as before."""
    return torch.float32 if activations in (torch.bfloat16, torch.float16) else torch.float64


def accumulate(
    acc: CutStatistics,
    mlp_out: torch.Tensor,
    before: torch.Tensor,
    after: torch.Tensor,
    features: torch.Tensor | None = None,
) -> None:
    """Add one batch's real tokens; ``features`` default to the MLP's output."""
    after64 = after.to(torch.float64)
    target = after64 - before.to(torch.float64) + mlp_out.to(torch.float64)
    f = mlp_out if features is None else features
    work = _product_dtype(f.dtype)
    f = f.to(work)
    acc.gram += (f.T @ f).to(torch.float64).cpu()
    acc.cross += (f.T @ target.to(work)).to(torch.float64).cpu()
    acc.target_energy += float((target * target).sum())
    acc.stream_energy += float(after64.pow(2).sum())
    acc.tokens += int(f.shape[0])


@dataclass
class CutActivations:
    """Every real token's activations around one cut, float32, for solvers that need them raw.

    After folding the map, the stream leaving block ``s-1`` is ``bypass + features·map``; the fit
    wants it to match ``after``, the stream the removed blocks produced. ``features`` are the
    MLP's output (a d×d map) or its hidden activations (a d_ff×d map)."""

    mlp: torch.Tensor  # M_{s-1}
    bypass: torch.Tensor  # L_{s-1} − M_{s-1}
    after: torch.Tensor  # L_{s+n-1}
    hidden: torch.Tensor | None = None  # H_{s-1}, when collected

    @classmethod
    def from_batches(
        cls,
        mlp: list[torch.Tensor],
        before: list[torch.Tensor],
        after: list[torch.Tensor],
        hidden: list[torch.Tensor] | None = None,
    ):
        m = torch.cat(mlp)
        return cls(m, torch.cat(before) - m, torch.cat(after), torch.cat(hidden) if hidden else None)

    @property
    def features(self) -> torch.Tensor:
        return self.mlp if self.hidden is None else self.hidden

    @property
    def target(self) -> torch.Tensor:
        """What ``features·map`` alone must reproduce (the least-squares target)."""
        return self.after - self.bypass


@dataclass
class Trace:
    """The residual stream after every step of one calibration pass, kept in the engine's store.

    The pass reads batches ``batch_ids`` of ``calibration`` (all of them, or the share a survey of
    cuts reads). A later pass over one cut of the same plan runs only the step before the cut on
    them, from the stream kept here, instead of every step from the embeddings: on a model the
    size of Qwen2.5-1.5B that pass to the end of the cut was a third of the prune."""

    engine: Engine
    plan: Plan
    calibration: CalibrationSet
    batch_ids: list[int]
    tag: str = "trace"
    positions: range = range(0)

    @property
    def batches(self) -> Batches:
        return [self.calibration.batches[i] for i in self.batch_ids]

    @staticmethod
    def bytes_needed(engine: Engine, plan: Plan, batches: Batches) -> int:
        """What a pass over every step of ``plan`` keeps, and the one stream it runs."""
        slots = sum(ids.numel() for ids, _mask in batches)
        element = torch.empty((), dtype=engine.skeleton.compute_dtype).element_size()
        return (len(plan) + 1) * slots * engine.config.hidden_size * element

    def key(self, position: int, b: int) -> tuple[str, str, int, int]:
        """The stream after step ``position`` of the pass's batch ``b``."""
        return (self.tag, "L", position, b)

    def holds(self, plan: Plan, calibration: CalibrationSet, cut: tuple[int, int]) -> list[int]:
        """The batches of ``calibration`` whose stream around ``cut`` of ``plan`` is kept here."""
        if plan != self.plan or calibration is not self.calibration or cut[1] - 1 not in self.positions:
            return []
        return list(self.batch_ids)

    def resume(self, position: int) -> Stream:
        """The pass's batches as they enter step ``position``; the caller's walk consumes it."""
        if position == 0:
            return self.engine.embed(self.tag, self.batches)
        states = {b: self.engine.store.get(self.key(position - 1, b)) for b in range(len(self.batch_ids))}
        return self.engine.stream(self.tag, states, self.plan[:position])

    def release(self) -> None:
        for position in self.positions:
            for b in range(len(self.batch_ids)):
                self.engine.store.drop(self.key(position, b))
        self.positions = range(0)
        self.engine.forget(self.tag)


@dataclass
class CutBatch:
    """One batch's activations around cut ``[start, start + n)``, once its last block has run."""

    start: int
    batch: int
    before: torch.Tensor  # L_{s-1}
    after: torch.Tensor  # L_{s+n-1}
    mlp: torch.Tensor | None  # M_{s-1}, where requested
    hidden: torch.Tensor | None  # H_{s-1}, where requested
    real: torch.Tensor  # mask of the real (non-pad) tokens
    entering: torch.Tensor | None = None  # L_{s-2}, the input of block s-1, where requested (s >= 2)


def _stream_cuts(
    engine: Engine,
    plan: Plan,
    batches: Batches,
    *,
    n: int,
    starts: list[int],
    mlp_starts: list[int],
    on_cut: Callable[[CutBatch], None],
    desc: str,
    hidden_starts: list[int] = (),
    entering_starts: list[int] = (),
    keep: bool = False,
    trace: Trace | None = None,
) -> None:
    """Run ``batches`` through ``plan`` and call ``on_cut`` for every (start, batch) once the
    block closing the cut has run. With ``keep``, every ``L_k`` and ``M_k`` stays in the engine's
    store afterwards, as ``("calibration", "L" or "M", k, b)`` (the caller drops them); ``trace``
    keeps the stream after every step, and the batches' recorded arguments, until released.
    ``entering_starts`` also give each cut's ``L_{s-2}`` (see ``CutBatch.entering``)."""
    store = engine.store
    tag = "calibration" if trace is None else trace.tag
    entering_positions = {s - 2 for s in entering_starts if s >= 2}
    residual_positions = {s - 1 for s in starts} | {s + n - 1 for s in starts} | entering_positions
    deepest = max(residual_positions | {s - 1 for s in mlp_starts})
    if trace is not None:
        trace.positions = range(deepest + 1)
        residual_positions |= set(trace.positions)
    mlp_positions = {s - 1 for s in mlp_starts}
    hidden_positions = {s - 1 for s in hidden_starts}
    last_use: dict[tuple[str, int], int] = {}
    for s in starts:
        for key in (("L", s - 1), ("L", s + n - 1)):
            last_use[key] = max(last_use.get(key, -1), s + n - 1)
    for s in mlp_starts:
        last_use[("M", s - 1)] = max(last_use.get(("M", s - 1), -1), s + n - 1)
    for s in hidden_starts:
        last_use[("H", s - 1)] = max(last_use.get(("H", s - 1), -1), s + n - 1)
    for s in entering_starts:
        if s >= 2:
            last_use[("L", s - 2)] = max(last_use.get(("L", s - 2), -1), s + n - 1)
    ending_at: dict[int, list[int]] = {}
    for s in starts:
        ending_at.setdefault(s + n - 1, []).append(s)
    masks = [mask.bool().to(engine.skeleton.device) for _ids, mask in batches]

    def stored(key: tuple[str, int, int]) -> torch.Tensor | None:
        return store.get(key) if key in store else None

    def on_block(position: int, b: int, hidden: torch.Tensor, captured: Captured) -> None:
        mlp, h = captured.mlp, captured.hidden
        if position in residual_positions:
            store.put((tag, "L", position, b), hidden)
        if position in mlp_positions:
            store.put((tag, "M", position, b), mlp)
        if position in hidden_positions:
            store.put((tag, "H", position, b), h)
        for s in ending_at.get(position, []):
            before = store.get((tag, "L", s - 1, b))
            on_cut(
                CutBatch(
                    s,
                    b,
                    before,
                    hidden,
                    stored((tag, "M", s - 1, b)),
                    stored((tag, "H", s - 1, b)),
                    masks[b],
                    stored((tag, "L", s - 2, b)),
                )
            )
        if not keep:
            for (kind, k), last in last_use.items():
                if last == position and not (trace is not None and kind == "L"):
                    store.drop((tag, kind, k, b))

    stream = engine.embed(tag, batches)
    try:
        engine.walk(
            tag,
            stream,
            plan,
            until=deepest,
            mlp_at=mlp_positions,
            hidden_at=hidden_positions,
            on_block=on_block,
            desc=desc,
        )
    except BaseException:
        if trace is not None:
            trace.release()
        raise
    finally:
        if trace is None:
            engine.forget(tag)


def _stream_one_cut(
    engine: Engine,
    plan: Plan,
    batches: Batches,
    cut: tuple[int, int],
    hidden: bool,
    on_cut: Callable[[CutBatch], None],
    desc: str,
    entering: bool = False,
) -> None:
    """``_stream_cuts`` for the one cut ``[start, end)``: its MLP output (and hidden activations,
    and the input of the block before it)."""
    start, end = cut
    _stream_cuts(
        engine,
        plan,
        batches,
        n=end - start,
        starts=[start],
        mlp_starts=[start],
        hidden_starts=[start] if hidden else [],
        entering_starts=[start] if entering else [],
        on_cut=on_cut,
        desc=desc,
    )


def empty_statistics(
    starts: list[int], n: int, d: int, features: int | None = None
) -> dict[int, CutStatistics]:
    f = features or d
    return {
        s: CutStatistics(s, n, torch.zeros(f, f, dtype=torch.float64), torch.zeros(f, d, dtype=torch.float64))
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
    trace: Trace | None = None,
) -> tuple[DistanceProfile, dict[int, CutStatistics]]:
    """One pass: the distance profile of every ``start`` and the sums of every ``stats_for`` start
    (starts index the steps of ``plan``); ``trace`` keeps the stream after every step."""
    profile = DistanceProfile(n=n, starts=list(starts))
    stats = empty_statistics(list(stats_for), n, engine.config.hidden_size)

    def on_cut(c: CutBatch) -> None:
        _add_distances(profile, c.start, c.before, c.after, c.real)
        if c.start in stats:
            accumulate(stats[c.start], c.mlp[c.real], c.before[c.real], c.after[c.real])

    _stream_cuts(
        engine,
        plan,
        calibration.batches,
        n=n,
        starts=list(starts),
        mlp_starts=list(stats_for),
        on_cut=on_cut,
        desc=desc,
        trace=trace,
    )
    _count_tokens(profile, calibration)
    _check_finite(stats)
    return profile, stats


@dataclass
class CutSums:
    """One set's sums for one cut: of the MLP's output (the d×d map), and of its hidden
    activations (the d_ff×d map) where they were asked for; and the streams around the cut where
    they were kept."""

    output: CutStatistics
    hidden: CutStatistics | None = None
    ends: CutEnds | None = None


@dataclass
class CutEnds:
    """One set's streams around a cut, kept in the engine's store (by batch of the set) for a walk
    of the blocks after it without a second pass to the cut: the stream ``entering`` step
    ``start - 1`` (which runs again with the cut's map folded in; None where that step is the first
    and its input is the embeddings) and the stream ``after`` step ``end - 1`` (the original plan's
    stream at the cut's end). Released by ``release``."""

    cut: tuple[int, int]
    entering: dict[int, tuple] = field(default_factory=dict)
    after: dict[int, tuple] = field(default_factory=dict)

    def keep(
        self, engine: Engine, set_id: int, b: int, entering: torch.Tensor | None, after: torch.Tensor
    ) -> None:
        if entering is not None:
            self.entering[b] = ("cut-ends", self.cut, set_id, "entering", b)
            engine.store.put(self.entering[b], entering)
        self.after[b] = ("cut-ends", self.cut, set_id, "after", b)
        engine.store.put(self.after[b], after)

    def release(self, engine: Engine) -> None:
        for key in (*self.entering.values(), *self.after.values()):
            engine.store.drop(key)
        self.entering.clear()
        self.after.clear()


def cut_sums(
    engine: Engine,
    plan: Plan,
    sets: list[CalibrationSet],
    cut: tuple[int, int],
    *,
    hidden: bool,
    trace: Trace | None = None,
    keep_ends: bool = False,
    desc: str = "Statistics",
) -> list[CutSums]:
    """The sums of one cut for each set: the batches whose stream ``trace`` holds run only the
    step before the cut from it; all other batches of all sets run together in one pass from the
    embeddings that stops at the cut's last step. ``keep_ends`` keeps each set's ``CutEnds``."""
    start, end = cut
    d = engine.config.hidden_size
    sums = [
        CutSums(
            empty_statistics([start], end - start, d)[start],
            empty_statistics([start], end - start, d, engine.config.intermediate_size)[start]
            if hidden
            else None,
            CutEnds(cut) if keep_ends else None,
        )
        for _ in sets
    ]

    def add(k: int, mlp: torch.Tensor, before: torch.Tensor, after: torch.Tensor, h: torch.Tensor | None):
        accumulate(sums[k].output, mlp, before, after)
        if hidden:
            accumulate(sums[k].hidden, mlp, before, after, features=h)

    held: set[tuple[int, int]] = set()
    for k, one in enumerate(sets):
        kept = trace.holds(plan, one, cut) if trace is not None else []
        if kept:
            _sums_from_trace(engine, trace, cut, lambda *a, k=k: add(k, *a), desc)
            held |= {(k, b) for b in kept}
            if keep_ends:
                for i, b in enumerate(trace.batch_ids):
                    entering = engine.store.get(trace.key(start - 2, i)) if start >= 2 else None
                    sums[k].ends.keep(engine, k, b, entering, engine.store.get(trace.key(end - 1, i)))
    walked = [(k, b) for k, one in enumerate(sets) for b in range(len(one.batches)) if (k, b) not in held]
    if walked:

        def on_cut(c: CutBatch) -> None:
            r = c.real
            k, b = walked[c.batch]
            add(k, c.mlp[r], c.before[r], c.after[r], c.hidden[r] if hidden else None)
            if keep_ends:
                sums[k].ends.keep(engine, k, b, c.entering, c.after)

        _stream_one_cut(
            engine,
            plan,
            [sets[k].batches[b] for k, b in walked],
            cut,
            hidden,
            on_cut,
            desc,
            entering=keep_ends,
        )
    for one in sums:
        _check_finite({0: one.output} | ({1: one.hidden} if one.hidden is not None else {}))
    return sums


def _sums_from_trace(
    engine: Engine,
    trace: Trace,
    cut: tuple[int, int],
    add: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], None],
    desc: str,
) -> None:
    """``add(M, L_{s-1}, L_{s+n-1}, H)`` for each of ``trace``'s batches, running only step ``s - 1``."""
    start, end = cut
    masks = [mask.bool().to(engine.skeleton.device) for _ids, mask in trace.batches]

    def on_block(_position: int, b: int, before: torch.Tensor, captured: Captured) -> None:
        r = masks[b]
        after = engine.store.get(trace.key(end - 1, b))
        assert captured.mlp is not None and captured.hidden is not None
        add(captured.mlp[r], before[r], after[r], captured.hidden[r])

    engine.walk(
        trace.tag,
        trace.resume(start - 1),
        trace.plan,
        until=start - 1,
        mlp_at={start - 1},
        hidden_at={start - 1},
        on_block=on_block,
        desc=desc,
    )


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

    def on_cut(c: CutBatch) -> None:
        _add_distances(profile, c.start, c.before, c.after, c.real)

    store = engine.store
    try:
        _stream_cuts(
            engine,
            plan,
            calibration.batches,
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
        stats = empty_statistics([chosen], n, engine.config.hidden_size)
        for b, (_ids, mask) in enumerate(calibration.batches):
            real = mask.bool().to(engine.skeleton.device)
            accumulate(
                stats[chosen],
                store.get(("calibration", "M", chosen - 1, b))[real],
                store.get(("calibration", "L", chosen - 1, b))[real],
                store.get(("calibration", "L", chosen + n - 1, b))[real],
            )
    finally:
        for b in range(len(calibration.batches)):
            for s in starts:
                for key in (("L", s - 1, b), ("L", s + n - 1, b), ("M", s - 1, b)):
                    store.drop(("calibration", *key))
    _check_finite(stats)
    return profile, stats


def collect_activations(
    engine: Engine,
    plan: Plan,
    calibration: CalibrationSet,
    cut: tuple[int, int],
    *,
    hidden: bool = False,
    desc: str = "Collecting",
) -> CutActivations:
    """Every real token's activations around ``cut``, for solvers that need them raw (with
    ``hidden``, the MLP's hidden activations too)."""
    parts: dict[str, dict[int, torch.Tensor]] = {"mlp": {}, "before": {}, "after": {}, "hidden": {}}

    def on_cut(c: CutBatch) -> None:
        for name, value in (("mlp", c.mlp), ("before", c.before), ("after", c.after), ("hidden", c.hidden)):
            if value is not None:
                parts[name][c.batch] = value[c.real].float().cpu()

    _stream_one_cut(engine, plan, calibration.batches, cut, hidden, on_cut, desc)
    ordered = {name: [part[b] for b in sorted(part)] for name, part in parts.items()}
    return CutActivations.from_batches(
        ordered["mlp"], ordered["before"], ordered["after"], ordered["hidden"] or None
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
