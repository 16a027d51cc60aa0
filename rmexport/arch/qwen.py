"""Qwen2 and Qwen3: Llama-shaped blocks; Qwen3 adds q/k norms. Both carry sliding-window lists.

llama.cpp's ``qwen2`` and ``qwen3`` loaders call no ``load_swa_pattern`` (checked in the llama.cpp of
llama-cpp-python 0.3.36): every layer attends fully, so ``llama_cpp_swa_period`` is 0, no GGUF
pattern is written or read, and a model that really uses its sliding window is refused
(``llama_cpp_problem``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import ArchAdapter

__all__ = ["QWEN2", "QWEN3", "QwenAdapter"]


@dataclass(frozen=True)
class QwenAdapter(ArchAdapter):
    per_layer_keys: tuple[str, ...] = ("layer_types",)

    def _slice_extra(self, config: Any, kept: list[int]) -> None:
        # Blocks below max_window_layers use full attention; keep that set of blocks the same.
        limit = getattr(config, "max_window_layers", None)
        if isinstance(limit, int):
            config.max_window_layers = sum(1 for i in kept if i < limit)

    def llama_cpp_problem(self, config: Any) -> str | None:
        if getattr(config, "use_sliding_window", False):
            if "sliding_attention" in list(getattr(config, "layer_types", None) or []):
                return f"llama.cpp's {self.family} has no sliding-window attention, but this model uses it"
        return None


QWEN2 = QwenAdapter(
    family="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    model_type="qwen2",
    gguf_arch="qwen2",
)

QWEN3 = QwenAdapter(
    family="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    model_type="qwen3",
    gguf_arch="qwen3",
    has_qk_norm=True,
)
