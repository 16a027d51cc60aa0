"""Device and forward-dtype selection, on faked hardware: what torch and the CPU flags report."""

from __future__ import annotations

import pytest
import torch

from rmexport import compute
from rmexport.compute import native_bfloat16, resolve_compute, resolve_device
from rmexport.errors import ConfigError


def _fake_cpu(monkeypatch: pytest.MonkeyPatch, flags: list[str]) -> None:
    monkeypatch.setattr(compute, "cpu_flags", lambda: flags)


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, *, present: bool, bf16: bool = True, count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if present else 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")


@pytest.mark.parametrize(
    ("flags", "dtype", "why"),
    [
        (["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"], torch.bfloat16, "amx_bf16"),
        (["avx2", "avx512f", "avx512_bf16"], torch.bfloat16, "avx512_bf16"),
        (["avx2", "avx512f", "avx512_vnni"], torch.float32, "no native bfloat16"),
        ([], torch.float32, "no native bfloat16"),
    ],
)
def test_auto_dtype_follows_the_cpu_flags(monkeypatch, flags, dtype, why):
    _fake_cuda(monkeypatch, present=False)
    _fake_cpu(monkeypatch, flags)
    chosen = resolve_compute("auto", "auto")
    assert chosen.device == "cpu"
    assert chosen.dtype == dtype
    assert why in chosen.reason
    assert chosen.describe()["dtype"] == str(dtype).removeprefix("torch.")


def test_auto_device_is_cuda_when_torch_sees_it(monkeypatch):
    _fake_cuda(monkeypatch, present=True)
    _fake_cpu(monkeypatch, [])
    assert resolve_device("auto") == "cuda"
    chosen = resolve_compute("auto", "auto")
    assert (chosen.device, chosen.dtype) == ("cuda", torch.bfloat16)
    assert "Fake GPU" in chosen.reason


def test_on_a_gpu_the_default_budget_is_at_most_its_memory(monkeypatch):
    from types import SimpleNamespace

    from rmexport.calib.budget import MemoryBudget

    _fake_cuda(monkeypatch, present=True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(total_memory=2**30))
    monkeypatch.delenv("RMEXPORT_MEMORY_BUDGET", raising=False)
    gpu = resolve_compute("auto", "auto")
    assert gpu.memory_bytes() == int(0.9 * 2**30)
    assert MemoryBudget.from_option(None, gpu.memory_bytes()).total_bytes == int(0.9 * 2**30)
    assert MemoryBudget.from_option("8GiB", gpu.memory_bytes()).total_bytes == 8 * 2**30  # asked for
    assert resolve_compute("cpu", "auto").memory_bytes() is None


def test_a_gpu_without_bfloat16_computes_in_float32(monkeypatch):
    _fake_cuda(monkeypatch, present=True, bf16=False)
    assert native_bfloat16("cuda") is None
    assert resolve_compute("cuda", "auto").dtype == torch.float32


def test_explicit_choices_are_kept_whatever_the_hardware(monkeypatch):
    _fake_cuda(monkeypatch, present=True)
    _fake_cpu(monkeypatch, ["amx_bf16"])
    assert resolve_compute("cpu", "float32").dtype == torch.float32
    assert resolve_compute("cpu", "float32").reason == "requested"
    assert resolve_device("cuda:1") == "cuda:1"


def test_float16_on_a_cpu_is_refused():
    with pytest.raises(ConfigError, match="float16 is not supported on cpu"):
        resolve_compute("cpu", "float16")


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ConfigError, match="unknown --compute-dtype"):
        resolve_compute("cpu", "float8")


def test_on_several_gpus_the_budget_is_their_memory_together(monkeypatch):
    from types import SimpleNamespace

    from rmexport.compute import gpu_indices

    _fake_cuda(monkeypatch, present=True, count=3)
    sizes = {i: (i + 1) * 2**30 for i in range(3)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=sizes[i]))
    assert gpu_indices("cuda") == [0, 1, 2] and gpu_indices("cuda:2") == [2] and gpu_indices("cpu") == []
    assert resolve_compute("cuda", "auto").memory_bytes() == sum(int(0.9 * b) for b in sizes.values())
    assert resolve_compute("cuda:1", "auto").memory_bytes() == int(0.9 * sizes[1])
