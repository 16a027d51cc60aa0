"""Activations kept between blocks: in memory up to a budget, beyond it in memory-mapped files."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["ActivationStore"]


class ActivationStore:
    """Tensors by key, in memory up to ``budget_bytes``, beyond that in memory-mapped files."""

    def __init__(self, device: torch.device, budget_bytes: int, offload_dir: str | None = None):
        self.device = device
        self.budget_bytes = budget_bytes
        self._offload_root = offload_dir
        self._dir: Path | None = None
        self._tensors: dict[Any, torch.Tensor] = {}
        self._files: dict[Any, Path] = {}
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.offloaded_bytes = 0
        self._written = 0

    def put(self, key: Any, tensor: torch.Tensor) -> None:
        self.drop(key)
        size = tensor.numel() * tensor.element_size()
        if self.resident_bytes + size <= self.budget_bytes:
            self._tensors[key] = tensor
            self.resident_bytes += size
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="rmexport-activations-", dir=self._offload_root))
        self._written += 1
        path = self._dir / f"{self._written}.bin"
        tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(path)
        mapped = torch.from_file(str(path), shared=False, size=tensor.numel(), dtype=tensor.dtype)
        self._tensors[key] = mapped.view(tensor.shape)
        self._files[key] = path
        self.offloaded_bytes += size

    def get(self, key: Any) -> torch.Tensor:
        tensor = self._tensors[key]
        return tensor.to(self.device) if key in self._files else tensor

    def __contains__(self, key: Any) -> bool:
        return key in self._tensors

    def drop(self, key: Any) -> None:
        tensor = self._tensors.pop(key, None)
        if tensor is None:
            return
        path = self._files.pop(key, None)
        if path is None:
            self.resident_bytes -= tensor.numel() * tensor.element_size()
        else:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._tensors.clear()
        self._files.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
