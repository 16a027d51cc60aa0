"""One speed protocol for llama.cpp and onnxruntime, modelled on llama-bench.

- Phases: prompt processing of ``P`` tokens from an empty cache (``ppP``, e.g. pp512) and
  generation of ``G`` tokens one at a time from an empty cache through the KV cache (``tgG``,
  e.g. tg128), as llama-bench's pp512 and tg128 tests.
- Both models are loaded once, before anything is timed; only the timed calls alternate. Each
  phase function runs one repetition and returns the seconds of its timed part, so resetting the
  cache is never timed.
- Warm-up: ``warmup`` untimed repetitions of every phase of both models.
- Rounds: each round times every phase of the original, then of the pruned model (A B A B …),
  so that drift of a shared machine lands on both sides alike. The speed-up of a round is the
  ratio of the two adjacent repetitions; the reported speed-up is the median of those ratios.
- Rounds repeat until the median speed-up of every phase is stable (each of the last ``window``
  rounds moved it by less than ``rel_tol``), with at least ``min_rounds`` and at most
  ``max_rounds``. The result says how many rounds ran and whether the median settled.
- Spread: median, min–max and quartiles of the per-round speed-ups and of each model's tokens/s.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rmexport.errors import ConfigError
from rmexport.log import get_logger
from rmexport.sysinfo import load_average, usable_cores

__all__ = [
    "SpeedProtocol",
    "TimedCall",
    "attach_ideal",
    "format_phases",
    "median_settled",
    "phase_kind",
    "run_protocol",
    "spread",
]

log = get_logger(__name__)

TimedCall = Callable[[], float]  # runs one repetition of a phase, returns its timed seconds
ROLES = ("original", "pruned")


@dataclass(frozen=True)
class SpeedProtocol:
    prompt_tokens: tuple[int, ...] = (512,)
    gen_tokens: int = 128
    warmup: int = 1
    min_rounds: int = 5
    max_rounds: int = 7
    rel_tol: float = 0.02
    window: int = 2
    threads: int = 0  # 0: every usable core

    def __post_init__(self) -> None:
        if not self.prompt_tokens or any(n < 1 for n in self.prompt_tokens) or self.gen_tokens < 1:
            raise ConfigError(
                f"prompt tokens {list(self.prompt_tokens)} and generated tokens {self.gen_tokens} "
                "must all be >= 1"
            )
        if self.warmup < 0 or not 1 <= self.min_rounds <= self.max_rounds:
            raise ConfigError(
                f"need warmup >= 0 and 1 <= min rounds <= max rounds, got warmup={self.warmup} "
                f"min={self.min_rounds} max={self.max_rounds}"
            )
        if not 0 < self.rel_tol < 1 or self.window < 1 or self.threads < 0:
            raise ConfigError(
                f"need 0 < rel tol < 1, window >= 1 and threads >= 0, got rel_tol={self.rel_tol} "
                f"window={self.window} threads={self.threads}"
            )

    @property
    def phases(self) -> dict[str, int]:
        """Phase name -> tokens, prompt phases first: ``{"pp512": 512, "tg128": 128}``."""
        return {f"pp{n}": n for n in sorted(set(self.prompt_tokens))} | {
            f"tg{self.gen_tokens}": self.gen_tokens
        }

    @property
    def context(self) -> int:
        """The context every model gets (llama-bench: longest prompt + generated tokens)."""
        return max(self.prompt_tokens) + self.gen_tokens

    def resolved_threads(self) -> int:
        return self.threads or usable_cores()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"prompt_tokens": sorted(set(self.prompt_tokens))}


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


def median_settled(values: Sequence[float], *, rel_tol: float, window: int) -> bool:
    """True when each of the last ``window`` values moved the running median by less than ``rel_tol``."""
    if len(values) < window + 1:
        return False
    medians = [statistics.median(values[:k]) for k in range(len(values) - window, len(values) + 1)]
    return all(abs(b - a) < rel_tol * abs(a) for a, b in zip(medians, medians[1:], strict=False))


def _check_calls(original: Mapping[str, TimedCall], pruned: Mapping[str, TimedCall], phases) -> None:
    for role, calls in zip(ROLES, (original, pruned), strict=True):
        if set(calls) != set(phases):
            raise ConfigError(f"{role} has phases {sorted(calls)}, the protocol needs {sorted(phases)}")


def run_protocol(
    original: Mapping[str, TimedCall], pruned: Mapping[str, TimedCall], protocol: SpeedProtocol
) -> dict[str, Any]:
    """Warm up, then time rounds of (phase: original, pruned) until every median speed-up settles.

    ``original[phase]`` and ``pruned[phase]`` run one repetition of ``phase`` and return its
    timed seconds. Returns the protocol, the rounds run, whether the medians settled, the order of
    the timed calls, and per phase each model's tokens/s and the per-round speed-ups with spread.
    """
    phases = protocol.phases
    _check_calls(original, pruned, phases)
    models = dict(zip(ROLES, (original, pruned), strict=True))
    load_before = load_average()
    for _ in range(protocol.warmup):
        for phase in phases:
            for calls in models.values():
                calls[phase]()
    seconds: dict[str, dict[str, list[float]]] = {p: {r: [] for r in ROLES} for p in phases}
    ratios: dict[str, list[float]] = {p: [] for p in phases}
    order: list[list[Any]] = []
    settled = False
    rounds = 0
    started = time.perf_counter()
    while rounds < protocol.max_rounds:
        rounds += 1
        for phase in phases:
            for role, calls in models.items():
                elapsed = float(calls[phase]())
                assert elapsed > 0, f"{role} {phase}: a timed call took {elapsed} s"
                seconds[phase][role].append(elapsed)
                order.append([rounds, phase, role])
            # Speed-up = pruned tokens/s over original tokens/s = original seconds over pruned seconds.
            ratios[phase].append(seconds[phase]["original"][-1] / seconds[phase]["pruned"][-1])
        settled = all(
            median_settled(r, rel_tol=protocol.rel_tol, window=protocol.window) for r in ratios.values()
        )
        if rounds >= protocol.min_rounds and settled:
            break
    log.info(
        "speed: %d rounds (%s) in %.1f s",
        rounds,
        "settled" if settled else "max rounds, not settled",
        time.perf_counter() - started,
    )
    result: dict[str, Any] = {
        "protocol": protocol.as_dict()
        | {"threads": protocol.resolved_threads(), "context": protocol.context},
        "rounds": rounds,
        "settled": settled,
        "order": order,
        "load_average": {"before": load_before, "after": load_average()},
        "phases": {},
    }
    for phase, tokens in phases.items():
        entry: dict[str, Any] = {"kind": phase_kind(phase), "tokens": tokens}
        for role in ROLES:
            samples = seconds[phase][role]
            entry[role] = {"tokens_per_s": spread([tokens / s for s in samples]), "seconds": samples}
        entry["speedup"] = spread(ratios[phase]) | {"rounds": ratios[phase]}
        result["phases"][phase] = entry
    return result


def attach_ideal(result: dict[str, Any], ideals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Add each phase's ideal speed-up (``ideals[phase]["ideal"]``, with its FLOP counts) and the
    verdicts: measured/ideal, ``slower_than_original`` (median speed-up < 1) and ``above_ideal``."""
    for phase, entry in result["phases"].items():
        ideal = ideals[phase]["ideal"]
        median = entry["speedup"]["median"]
        entry["ideal"] = ideal
        entry["flops"] = ideals[phase].get("flops")
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
    settled = "median settled" if result["settled"] else "max rounds, median not settled"
    lines.append(
        f"{result['rounds']} rounds ({settled} within {protocol['rel_tol']:.0%}), "
        f"{protocol['threads']} threads"
    )
    return lines
