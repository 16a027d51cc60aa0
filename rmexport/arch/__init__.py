"""Registry: Hugging Face architecture name -> the adapter of its family."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedArchitectureError
from .base import ArchAdapter
from .gemma import GEMMA2, GEMMA3
from .llama import LLAMA, MISTRAL
from .qwen import QWEN2, QWEN3

__all__ = ["ADAPTERS", "ArchAdapter", "adapter_for", "gguf_adapter", "supported_architectures"]

ADAPTERS: dict[str, ArchAdapter] = {a.family: a for a in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3)}
_BY_ARCHITECTURE = {name: a for a in ADAPTERS.values() for name in a.hf_architectures}
_BY_MODEL_TYPE = {a.model_type: a for a in ADAPTERS.values()}


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def adapter_for(config: Any) -> ArchAdapter:
    """The adapter for a transformers config (by ``architectures[0]``, else ``model_type``)."""
    architectures = list(getattr(config, "architectures", None) or [])
    for name in architectures:
        if name in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[name]
    model_type = getattr(config, "model_type", None)
    if not architectures and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    found = architectures[0] if architectures else model_type
    raise UnsupportedArchitectureError(
        f"unsupported architecture {found!r}",
        hint="supported: " + ", ".join(supported_architectures()),
    )


def gguf_adapter(gguf_arch: str) -> ArchAdapter | None:
    """The adapter of a GGUF architecture name (the first one: Llama and Mistral share ``llama``)."""
    return next((a for a in ADAPTERS.values() if a.gguf_arch == gguf_arch), None)
