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
from dataclasses import dataclass
from typing import Any

from rmexport.errors import ConfigError
from rmexport.log import get_logger
from rmexport.speed_settings import SpeedProtocol, SpeedRounds
from rmexport.sysinfo import load_average

from .flops import IdealSpeedup

__all__ = [
    "Phase",
    "SpeedRounds",
    "SpeedProtocol",
    "attach_ideal",
    "format_phases",
    "median_rel_se",
    "phase_kind",
    "repetitions_per_round",
    "run_protocol",
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


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and quartiles (inclusive method) of a non-empty sample."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q1,
        "q3": q3,
    }


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


def run_protocol(
    original: Mapping[str, Phase], pruned: Mapping[str, Phase], protocol: SpeedProtocol
) -> dict[str, Any]:
    """Warm up, then time rounds of every phase on both models, interleaved, until each phase's
    median speed-up is precise (or ``max_rounds``).

    Returns the protocol, the rounds run, whether every median is precise, the order of the timed
    repetitions, and per phase each model's tokens/s and the per-round speed-ups with spread.
    """
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
    order: list[list[Any]] = []
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
    result: dict[str, Any] = {
        "protocol": protocol.as_dict()
        | {"threads": protocol.resolved_threads(), "context": protocol.context},
        "rounds": rounds,
        "settled": all(precise.values()),
        "order": order,
        "load_average": {"before": load_before, "after": load_average()},
        "phases": {},
    }
    for name, tokens in phases.items():
        entry: dict[str, Any] = {"kind": phase_kind(name), "tokens": tokens}
        for role in ROLES:
            samples = seconds[name][role]
            done = tokens * repetitions_per_round(original[name].steps)
            entry[role] = {"tokens_per_s": spread([done / s for s in samples]), "seconds": samples}
        entry["speedup"] = spread(ratios[name]) | {
            "rounds": ratios[name],
            "rel_se": median_rel_se(ratios[name]),
        }
        entry["rounds"] = len(ratios[name])
        entry["settled"] = precise[name]
        result["phases"][name] = entry
    return result


def attach_ideal(result: dict[str, Any], ideals: Mapping[str, IdealSpeedup]) -> dict[str, Any]:
    """Add each phase's ideal speed-up (with its FLOP counts) and the verdicts: measured/ideal,
    ``slower_than_original`` (median speed-up < 1) and ``above_ideal``."""
    for phase, entry in result["phases"].items():
        ideal = ideals[phase].ideal
        median = entry["speedup"]["median"]
        entry["ideal"] = ideal
        entry["flops"] = ideals[phase].flops
        entry["measured_over_ideal"] = median / ideal
        entry["slower_than_original"] = median < 1.0
        entry["above_ideal"] = median > ideal
    result["slower_than_original"] = [p for p, e in result["phases"].items() if e["slower_than_original"]]
    return result


def format_phases(result: Mapping[str, Any]) -> list[str]:
    """Plain-text table: per phase each model's median tokens/s [min–max], speed-up, ideal."""

    def rng(stats: Mapping[str, float], fmt: str) -> str:
        return f"{fmt.format(stats['median'])} [{fmt.format(stats['min'])}–{fmt.format(stats['max'])}]"

    header = (
        f"{'phase':<7} {'original tok/s':>22} {'pruned tok/s':>22} {'speed-up':>20} "
        f"{'ideal':>6} {'of ideal':>8}"
    )
    lines = [header, "-" * len(header)]
    for phase, entry in result["phases"].items():
        flag = "  SLOWER THAN ORIGINAL" if entry.get("slower_than_original") else ""
        ideal = entry.get("ideal")
        lines.append(
            f"{phase:<7} {rng(entry['original']['tokens_per_s'], '{:.1f}'):>22} "
            f"{rng(entry['pruned']['tokens_per_s'], '{:.1f}'):>22} "
            f"{rng(entry['speedup'], 'x{:.2f}'):>20} "
            + (
                f"{f'x{ideal:.2f}':>6} {entry['measured_over_ideal']:>8.0%}"
                if ideal
                else f"{'-':>6} {'-':>8}"
            )
            + flag
        )
    protocol = result["protocol"]
    rounds = ", ".join(f"{phase} {entry['rounds']}" for phase, entry in result["phases"].items())
    precise = "every median precise" if result["settled"] else "max rounds reached, not every median precise"
    lines.append(
        f"rounds: {rounds} ({precise}: standard error <= {protocol['rel_tol']:.1%}), "
        f"{protocol['threads']} threads"
    )
    return lines
