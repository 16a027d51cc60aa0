"""One speed protocol for llama.cpp and onnxruntime, modelled on llama-bench.

- Phases: prompt processing of ``P`` tokens from an empty cache (``ppP``, e.g. pp512) and
  generation of ``G`` tokens one at a time from an empty cache through the KV cache (``tgG``,
  e.g. tg128), as llama-bench's pp512 and tg128 tests.
- Both models are loaded once, before anything is timed. A repetition of a phase is a ``Phase``:
  an untimed ``reset`` (empty the cache), then ``steps`` timed steps (one for a prompt, one per
  generated token).
- Original and pruned take turns in A B B A order: a round of a prompt phase is original,
  pruned, pruned, original; generation goes in turns of an eighth of the tokens (16 of tg128),
  the lead swapping every turn. On a shared or virtualised CPU the speed drifts over seconds,
  and a model timed right after the other is slowed by the other's threads still spinning; this
  order puts both on each side alike.
- Warm-up: ``warmup`` untimed turns of every phase per model (a prompt, or the first eighth of
  the generated tokens): enough for first-call allocations, at a fraction of a round's time.
- The speed-up of a round is the original's seconds over the pruned model's; the reported
  speed-up is the median over rounds. A phase is timed again round after round until its median
  is precise: the estimated relative standard error of the median (``median_rel_se``) is at
  most ``rel_tol``, after at least ``min_rounds``; a precise phase is no longer
  timed, so the time goes to the noisy ones. No phase gets more than ``max_rounds``.
- Spread: median, min–max and quartiles of the per-round speed-ups and of each model's tokens/s.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from rmexport.errors import ConfigError
from rmexport.log import get_logger
from rmexport.records import JsonObject, from_jsonable
from rmexport.speed_settings import SpeedProtocol, SpeedRounds
from rmexport.sysinfo import load_average

from .flops import IdealSpeedup

__all__ = [
    "LoadAverage",
    "Phase",
    "PhaseSpeed",
    "RoleSpeed",
    "SpeedRounds",
    "SpeedProtocol",
    "SpeedRun",
    "Speedup",
    "Spread",
    "format_phases",
    "measure_speed",
    "median_rel_se",
    "phase_kind",
    "repetitions_per_round",
    "spread",
    "timed",
]

log = get_logger(__name__)

ROLES = ("original", "pruned")


def timed(run: Callable[[], Any]) -> float:
    """Seconds ``run()`` took."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Phase:
    """One repetition of a phase on one model: ``reset()`` (untimed), then ``step(k)`` for
    ``k < steps``, each returning the seconds it timed."""

    step: Callable[[int], float]
    steps: int = 1
    reset: Callable[[], None] = _nothing


def phase_kind(name: str) -> str:
    """``prompt`` for ``ppN``, ``generation`` for ``tgN``."""
    return {"pp": "prompt", "tg": "generation"}[name[:2]]


@dataclass(frozen=True)
class Spread:
    """Median, min, max and quartiles of a sample."""

    median: float
    min: float
    max: float
    q1: float
    q3: float


def spread(values: Sequence[float]) -> Spread:
    """Median, min, max and quartiles (inclusive method) of a non-empty sample."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return Spread(median=statistics.median(ordered), min=ordered[0], max=ordered[-1], q1=q1, q3=q3)


@dataclass(frozen=True)
class Speedup(Spread):
    """The spread of a phase's per-round speed-ups (pruned tokens/s over original tokens/s)."""

    rounds: list[float]
    rel_se: float  # of the median (``median_rel_se``)


@dataclass(frozen=True)
class RoleSpeed:
    """One model's speed in one phase."""

    tokens_per_s: Spread
    seconds: list[float]  # per round


@dataclass(frozen=True)
class PhaseSpeed:
    """One phase timed on both models; the ideal and the verdicts come with ``SpeedRun.with_ideal``."""

    kind: str  # phase_kind
    tokens: int
    original: RoleSpeed
    pruned: RoleSpeed
    speedup: Speedup
    rounds: int
    settled: bool  # the median speed-up is precise
    ideal: float | None = None
    flops: dict[str, dict[str, int]] | None = None  # "original", "pruned" -> flops.phase_flops
    measured_over_ideal: float | None = None
    slower_than_original: bool | None = None
    above_ideal: bool | None = None


@dataclass(frozen=True)
class LoadAverage:
    before: list[float] | None  # sysinfo.load_average
    after: list[float] | None


@dataclass(frozen=True)
class SpeedRun:
    """The protocol run on both models (``measure_speed``); ``to_json()`` is a bench's ``speed``."""

    protocol: JsonObject  # SpeedProtocol.as_dict(), with the threads and context it ran with
    rounds: int
    settled: bool  # every phase's median is precise
    order: list[list[int | str]]  # [round, phase] of every timed round, in the order they ran
    load_average: LoadAverage
    phases: dict[str, PhaseSpeed]
    settings: JsonObject | None = None  # the runtime's own settings, as the bench gives them
    slower_than_original: list[str] | None = None  # phases, once the ideals are in

    def with_ideal(self, ideals: Mapping[str, IdealSpeedup]) -> SpeedRun:
        """Each phase's ideal speed-up (with its FLOP counts) and the verdicts: measured/ideal,
        ``slower_than_original`` (median speed-up < 1) and ``above_ideal``."""
        phases = {}
        for name, phase in self.phases.items():
            ideal, median = ideals[name].ideal, phase.speedup.median
            phases[name] = replace(
                phase,
                ideal=ideal,
                flops=ideals[name].flops,
                measured_over_ideal=median / ideal,
                slower_than_original=median < 1.0,
                above_ideal=median > ideal,
            )
        slower = [name for name, phase in phases.items() if phase.slower_than_original]
        return replace(self, phases=phases, slower_than_original=slower)

    def to_json(self) -> JsonObject:
        """Without the parts not yet given (settings, ideals), as they were added to the JSON."""
        return _without_none(asdict(self), _LATER)

    @classmethod
    def from_json(cls, data: JsonObject) -> SpeedRun:
        return from_jsonable(cls, data)


# Keys a SpeedRun (or its phases) gets after timing: absent from its JSON until given.
_LATER = frozenset(f.name for cls in (SpeedRun, PhaseSpeed) for f in fields(cls) if f.default is None)


def _without_none(data: JsonObject, later: frozenset[str]) -> JsonObject:
    data = {k: v for k, v in data.items() if not (k in later and v is None)}
    data["phases"] = {
        name: {k: v for k, v in phase.items() if not (k in later and v is None)}
        for name, phase in data["phases"].items()
    }
    return data


_RANGE_TO_SIGMA = {3: 1.693, 4: 2.059}  # d₂: expected range of n normal values, in σ


def median_rel_se(values: Sequence[float]) -> float:
    """Estimated standard error of the median of ``values``, relative to the median.

    Normal theory (SE = 1.2533·σ/√n). From five values on, σ is estimated robustly as
    1.4826·MAD, so one stalled round does not inflate it; with three or four, the MAD is
    unreliable (one of its deviations is zero), so σ comes from the range (range/d₂, d₂ = 1.693
    for three values and 2.059 for four), which a stalled round inflates: the phase then simply
    runs on to five rounds. Infinite for fewer than three values."""
    if len(values) < 3:
        return math.inf
    median = statistics.median(values)
    if len(values) < 5:
        sigma = (max(values) - min(values)) / _RANGE_TO_SIGMA[len(values)]
    else:
        sigma = 1.4826 * statistics.median(abs(v - median) for v in values)
    return 1.2533 * sigma / math.sqrt(len(values)) / abs(median)


def _check_phases(original: Mapping[str, Phase], pruned: Mapping[str, Phase], phases) -> None:
    for role, given in zip(ROLES, (original, pruned), strict=True):
        if set(given) != set(phases):
            raise ConfigError(f"{role} has phases {sorted(given)}, the protocol needs {sorted(phases)}")
    for name in phases:
        if original[name].steps != pruned[name].steps:
            raise ConfigError(
                f"{name}: {original[name].steps} steps for the original, {pruned[name].steps} pruned"
            )


# Idle time before each prompt turn, so that the other model's threads have stopped spinning and the
# prompt runs as it would alone. Generation turns follow each other directly (each is 1/8 of a phase).
PROMPT_PAUSE_S = 0.05
TURNS_PER_REPETITION = 8  # a generation repetition is timed in this many turns per model


def _turn_steps(steps: int) -> int:
    return -(-steps // TURNS_PER_REPETITION)


def repetitions_per_round(steps: int) -> int:
    """Repetitions of a phase per round: two when a repetition has an odd number of turns (a
    prompt is one turn), so that each model leads as often as the other."""
    turns = -(-steps // _turn_steps(steps))
    return 2 if turns % 2 else 1


def _warm_up(pair: Mapping[str, Phase]) -> None:
    """One untimed turn of a phase per model."""
    for role in ROLES:
        pair[role].reset()
        for k in range(_turn_steps(pair[role].steps)):
            pair[role].step(k)


def _round(pair: Mapping[str, Phase]) -> dict[str, float]:
    """One round of a phase on both models, in turns, in A B B A order.

    A turn is one prompt, or a run of consecutive generation steps (an eighth of the tokens).
    The two models take turns, and the one that leads swaps at every turn. A model timed right
    after the other is slowed by it (onnxruntime's and llama.cpp's threads keep spinning for a
    while after a run); in this order both pay that alike, and whatever drift the machine has
    over seconds lands on both. Every round starts with the original and ends with it. A prompt
    turn starts after a short idle pause (``PROMPT_PAUSE_S``)."""
    first, second = ROLES
    steps = pair[first].steps
    turn = _turn_steps(steps)
    seconds = dict.fromkeys(ROLES, 0.0)
    turns = 0
    for _ in range(repetitions_per_round(steps)):
        for role in ROLES:
            pair[role].reset()
        for lo in range(0, steps, turn):
            order = (first, second) if turns % 2 == 0 else (second, first)
            turns += 1
            for role in order:
                if steps == 1:
                    time.sleep(PROMPT_PAUSE_S)
                for k in range(lo, min(steps, lo + turn)):
                    elapsed = float(pair[role].step(k))
                    assert elapsed > 0, f"{role}: a timed step took {elapsed} s"
                    seconds[role] += elapsed
    return seconds


def measure_speed(
    original: Mapping[str, Phase], pruned: Mapping[str, Phase], protocol: SpeedProtocol
) -> SpeedRun:
    """Warm up, then time rounds of every phase on both models, interleaved, until each phase's
    median speed-up is precise (or ``max_rounds``)."""
    phases = protocol.phases
    _check_phases(original, pruned, phases)
    pairs = {name: {"original": original[name], "pruned": pruned[name]} for name in phases}
    load_before = load_average()
    for _ in range(protocol.rounds.warmup):
        for name in phases:
            _warm_up(pairs[name])
    seconds: dict[str, dict[str, list[float]]] = {p: {r: [] for r in ROLES} for p in phases}
    ratios: dict[str, list[float]] = {p: [] for p in phases}
    precise = dict.fromkeys(phases, False)
    order: list[list[int | str]] = []
    rounds = 0
    started = time.perf_counter()
    while rounds < protocol.rounds.max_rounds and not all(precise.values()):
        rounds += 1
        for name in phases:
            if precise[name]:
                continue
            timed = _round(pairs[name])
            for role in ROLES:
                seconds[name][role].append(timed[role])
            order.append([rounds, name])
            # Speed-up = pruned tokens/s over original tokens/s = original seconds over pruned seconds.
            ratios[name].append(timed["original"] / timed["pruned"])
            precise[name] = (
                len(ratios[name]) >= protocol.rounds.min_rounds
                and median_rel_se(ratios[name]) <= protocol.rounds.rel_tol
            )
    log.info(
        "speed: %d rounds (%s) in %.1f s",
        rounds,
        "every median precise" if all(precise.values()) else "max rounds, not every median precise",
        time.perf_counter() - started,
    )

    def role_speed(name: str, role: str) -> RoleSpeed:
        samples = seconds[name][role]
        done = phases[name] * repetitions_per_round(original[name].steps)
        return RoleSpeed(tokens_per_s=spread([done / s for s in samples]), seconds=samples)

    return SpeedRun(
        protocol=protocol.as_dict() | {"threads": protocol.resolved_threads(), "context": protocol.context},
        rounds=rounds,
        settled=all(precise.values()),
        order=order,
        load_average=LoadAverage(before=load_before, after=load_average()),
        phases={
            name: PhaseSpeed(
                kind=phase_kind(name),
                tokens=tokens,
                original=role_speed(name, "original"),
                pruned=role_speed(name, "pruned"),
                speedup=Speedup(
                    **asdict(spread(ratios[name])), rounds=ratios[name], rel_se=median_rel_se(ratios[name])
                ),
                rounds=len(ratios[name]),
                settled=precise[name],
            )
            for name, tokens in phases.items()
        },
    )


def format_phases(run: SpeedRun) -> list[str]:
    """Plain-text table: per phase each model's median tokens/s [min–max], speed-up, ideal."""

    def rng(stats: Spread, fmt: str) -> str:
        return f"{fmt.format(stats.median)} [{fmt.format(stats.min)}–{fmt.format(stats.max)}]"

    header = (
        f"{'phase':<7} {'original tok/s':>22} {'pruned tok/s':>22} {'speed-up':>20} "
        f"{'ideal':>6} {'of ideal':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, phase in run.phases.items():
        flag = "  SLOWER THAN ORIGINAL" if phase.slower_than_original else ""
        lines.append(
            f"{name:<7} {rng(phase.original.tokens_per_s, '{:.1f}'):>22} "
            f"{rng(phase.pruned.tokens_per_s, '{:.1f}'):>22} "
            f"{rng(phase.speedup, 'x{:.2f}'):>20} "
            + (
                f"{f'x{phase.ideal:.2f}':>6} {phase.measured_over_ideal:>8.0%}"
                if phase.ideal
                else f"{'-':>6} {'-':>8}"
            )
            + flag
        )
    rounds = ", ".join(f"{name} {phase.rounds}" for name, phase in run.phases.items())
    precise = "every median precise" if run.settled else "max rounds reached, not every median precise"
    lines.append(
        f"rounds: {rounds} ({precise}: standard error <= {run.protocol['rel_tol']:.1%}), "
        f"{run.protocol['threads']} threads"
    )
    return lines
