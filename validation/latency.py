"""Timing helpers shared by the benchmarks: warm-up runs, then N timed runs, median and p90.

Every timing result is reported together with the machine it was measured on
(``hardware_info``), because a latency number without its CPU, thread count and runtime
versions cannot be compared with anything.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rmexport.errors import ConfigError

__all__ = ["Timing", "time_runs", "time_interleaved", "hardware_info", "package_versions"]


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of each timed run (warm-up runs excluded)."""

    samples_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def p90_s(self) -> float:
        ordered = sorted(self.samples_s)
        # Nearest-rank p90: the smallest sample with at least 90 % of the samples at or below it.
        rank = max(1, -(-9 * len(ordered) // 10))
        return ordered[rank - 1]

    def as_dict(self, prefix: str = "latency") -> dict[str, Any]:
        return {
            f"{prefix}_ms_p50": self.median_s * 1e3,
            f"{prefix}_ms_p90": self.p90_s * 1e3,
            f"{prefix}_ms_min": min(self.samples_s) * 1e3,
            "runs": len(self.samples_s),
        }


def time_runs(fn: Callable[[], Any], *, runs: int = 5, warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed (perf_counter)."""
    if runs < 1 or warmup < 0:
        raise ConfigError(f"need runs >= 1 and warmup >= 0, got runs={runs} warmup={warmup}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return Timing(tuple(samples))


def time_interleaved(
    fns: dict[str, Callable[[], Any]], *, runs: int = 5, warmup: int = 1, self_timed: bool = False
) -> dict[str, Timing]:
    """Time several functions round-robin (a, b, a, b, ...) so that they share the machine's state.

    On a shared or throttling CPU the load drifts over minutes; timing one model after the other
    would charge that drift to the comparison. With ``self_timed`` each function returns the
    seconds to record itself (e.g. the decode steps only, without the prefill before them).
    """
    if runs < 1 or warmup < 0:
        raise ConfigError(f"need runs >= 1 and warmup >= 0, got runs={runs} warmup={warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            value = fn()
            samples[name].append(float(value) if self_timed else time.perf_counter() - start)
    return {name: Timing(tuple(values)) for name, values in samples.items()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def package_versions(*names: str) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware_info(*packages: str) -> dict[str, Any]:
    """CPU, cores, memory, OS and the versions of ``packages`` (installed distribution names)."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": _cpu_model(),
        "cpu_count": len(cores) if cores is not None else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(*packages),
    }
