"""The machine a number was measured on: CPU model and flags, cores, threads, load, memory, versions.

A tokens/s figure without its CPU, its SIMD flags, the thread count and the library versions
cannot be compared with anything, so every benchmark stores ``machine_info`` beside its numbers.
The load average before and after a measurement says whether the machine was quiet.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import asdict, dataclass

from .records import JsonObject, from_jsonable

__all__ = [
    "SIMD_FLAGS",
    "MachineInfo",
    "cpu_flags",
    "describe_machine",
    "load_average",
    "machine_info",
    "package_versions",
    "ram_bytes",
    "usable_cores",
]

# The /proc/cpuinfo flags that decide which kernels llama.cpp and onnxruntime pick (x86, then Arm).
SIMD_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
)


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _field(lines: list[str], *names: str) -> str | None:
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in names:
            return value.strip()
    return None


def cpu_flags(lines: list[str] | None = None) -> list[str]:
    """The SIMD flags of ``SIMD_FLAGS`` that the first CPU reports, in that order."""
    lines = _cpuinfo() if lines is None else lines
    present = set((_field(lines, "flags", "Features") or "").split())
    return [flag for flag in SIMD_FLAGS if flag in present]


def _physical_cores(lines: list[str]) -> int | None:
    cores, package = set(), "0"
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            package = value.strip()
        elif key.strip() == "core id":
            cores.add((package, value.strip()))
    return len(cores) or None


def usable_cores() -> int:
    """Logical CPUs this process may run on (its affinity mask), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def ram_bytes() -> int:
    """Physical memory of this machine, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory_gib() -> float | None:
    try:
        return round(ram_bytes() / 2**30, 1)
    except (OSError, ValueError):
        return None


def package_versions(*names: str) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass(frozen=True)
class MachineInfo:
    """CPU model and SIMD flags, cores, the threads a benchmark used, memory, OS and versions."""

    cpu: str
    cpu_flags: list[str]
    logical_cores: int | None
    physical_cores: int | None
    usable_cores: int
    threads: int | None
    memory_gib: float | None
    platform: str
    python: str
    versions: dict[str, str | None]  # package -> version, None where not installed

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> MachineInfo:
        return from_jsonable(cls, data)


def describe_machine(*packages: str, threads: int | None = None) -> MachineInfo:
    """This machine, with the versions of ``packages`` and the ``threads`` a benchmark used."""
    lines = _cpuinfo()
    return MachineInfo(
        cpu=_field(lines, "model name", "Model name", "Hardware")
        or platform.processor()
        or platform.machine(),
        cpu_flags=cpu_flags(lines),
        logical_cores=os.cpu_count(),
        physical_cores=_physical_cores(lines),
        usable_cores=usable_cores(),
        threads=threads,
        memory_gib=_memory_gib(),
        platform=platform.platform(),
        python=platform.python_version(),
        versions=package_versions(*packages),
    )


def machine_info(*packages: str, threads: int | None = None) -> JsonObject:
    """``describe_machine`` as JSON, for bench/prune_variants.py (until it takes the record itself)."""
    return describe_machine(*packages, threads=threads).to_json()
