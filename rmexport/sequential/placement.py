"""Whole-model loading spread over several GPUs (and CPU) with accelerate's ``device_map``.

For the in-memory path on machines whose GPUs hold the model only together: ``device_map="auto"``
lets accelerate place consecutive blocks on consecutive devices (never splitting a block) and
move activations between them during the forward.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, ModelLoadError
from ..models import ModelSource, checkpoint_dir, load_config

__all__ = ["load_model_with_device_map", "model_devices"]


def load_model_with_device_map(
    source: ModelSource,
    *,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, Any] = "auto",
    max_memory: dict[int | str, str] | None = None,
) -> Any:
    """Load the causal LM with ``device_map`` ("auto", "balanced", "sequential" or an explicit map)."""
    from transformers import AutoModelForCausalLM

    from ..arch import adapter_for

    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ConfigError(
            f"unknown device map {device_map!r}", hint="use auto, balanced, balanced_low_0 or sequential"
        )
    adapter_for(load_config(source))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint_dir(source), dtype=dtype, device_map=device_map, max_memory=max_memory
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"could not load {source.location} with device_map={device_map!r}: {e}") from e
    model.eval()
    return model


def model_devices(model: Any) -> list[str]:
    """The devices the model's parameters ended up on, in first-use order."""
    seen: list[str] = []
    for param in model.parameters():
        name = str(param.device)
        if name not in seen:
            seen.append(name)
    return seen
