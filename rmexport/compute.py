"""Where a prune computes and in which dtype, chosen from what the hardware does natively.

``--device auto`` is CUDA when torch sees a GPU, else the CPU. ``--compute-dtype auto`` runs the
blocks' forwards in bfloat16 where the device multiplies bfloat16 natively (a CUDA GPU that
supports it; an x86 CPU with AMX or AVX512-BF16, read from its flags) and in float32 elsewhere:
on a CPU without those instructions bfloat16 is emulated and slower than float32. Statistics and
solves stay in float64 whatever is chosen. The choice and its reason go into ``prune.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError
from .sysinfo import cpu_flags

__all__ = [
    "AUTO",
    "COMPUTE_DTYPES",
    "GPU_MEMORY_SHARE",
    "Compute",
    "gpu_indices",
    "gpu_memory_bytes",
    "native_bfloat16",
    "resolve_compute",
    "resolve_device",
]

AUTO = "auto"
COMPUTE_DTYPES = (AUTO, "float32", "bfloat16", "float16")
GPU_MEMORY_SHARE = 0.9
# CPU flags that mean bfloat16 matmuls run in hardware, fastest first.
_BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Compute:
    """The device and dtype of the blocks' forwards, and why that dtype."""

    device: str
    dtype: torch.dtype
    reason: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def memory_bytes(self) -> int | None:
        """What the prune may hold on the device, where that is not the CPU's RAM: 90 % of the
        memory of every GPU it uses (the rest is CUDA's own context and the allocator's slack)."""
        gpus = gpu_indices(self.device)
        return sum(gpu_memory_bytes(i) for i in gpus) if gpus else None

    def describe(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype_name, "dtype_reason": self.reason}


def gpu_indices(device: str) -> list[int]:
    """The CUDA devices a prune on ``device`` uses: every visible one for ``cuda``, one for ``cuda:N``,
    none for another device."""
    parsed = torch.device(device)
    if parsed.type != "cuda":
        return []
    if parsed.index is not None:
        return [parsed.index]
    return list(range(torch.cuda.device_count()))


def gpu_memory_bytes(index: int) -> int:
    """90 % of GPU ``index``'s memory."""
    return int(GPU_MEMORY_SHARE * torch.cuda.get_device_properties(index).total_memory)


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; anything else as given."""
    if requested != AUTO:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bfloat16(device: str) -> str | None:
    """What gives ``device`` native bfloat16 matmuls (a CPU flag, or the GPU), or None."""
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return f"CUDA ({torch.cuda.get_device_name(torch.device(device))})"
        return None
    if kind == "cpu":
        flags = set(cpu_flags())
        return next((flag for flag in _BFLOAT16_CPU_FLAGS if flag in flags), None)
    return None


def _allowed(device: str) -> tuple[torch.dtype, ...]:
    if torch.device(device).type == "cuda":
        return (torch.bfloat16, torch.float16, torch.float32)
    return (torch.float32, torch.bfloat16)


def resolve_compute(device: str = AUTO, dtype: str = AUTO) -> Compute:
    """The device and forward dtype for ``--device`` and ``--compute-dtype``."""
    device = resolve_device(device)
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"unknown --compute-dtype {dtype!r}", hint="use " + ", ".join(COMPUTE_DTYPES))
    if dtype == AUTO:
        native = native_bfloat16(device)
        if native is not None:
            return Compute(device, torch.bfloat16, f"auto: native bfloat16 matmuls ({native})")
        return Compute(device, torch.float32, "auto: no native bfloat16 matmuls on this device")
    chosen = getattr(torch, dtype)
    allowed = _allowed(device)
    if chosen not in allowed:
        raise ConfigError(
            f"compute dtype {dtype} is not supported on {device}",
            hint="use " + " or ".join(str(d).removeprefix("torch.") for d in allowed),
        )
    return Compute(device, chosen, "requested")
