"""Delete the blocks of a cut and renumber the rest; the fitted map is folded first (``rmexport.fold``).

The result is an ordinary model of the same architecture: no new modules, only fewer blocks.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..arch import ArchAdapter
from ..errors import ConfigError

__all__ = ["kept_layers", "remove_blocks"]


def kept_layers(n_layers: int, cut: tuple[int, int]) -> list[int]:
    start, end = cut
    if not (1 <= start < end <= n_layers):
        raise ConfigError(
            f"cut {cut} is not within blocks 1..{n_layers - 1}",
            hint="block 0 is never removed; end must be <= the number of blocks",
        )
    return [i for i in range(n_layers) if not start <= i < end]


def remove_blocks(model: Any, adapter: ArchAdapter, cut: tuple[int, int]) -> list[int]:
    """Delete blocks ``[start, end)`` in place, renumber the rest, fix the config.

    Returns the original indices of the kept blocks.
    """
    blocks = adapter.blocks(model)
    kept = kept_layers(len(blocks), cut)
    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    parent_path, _, attr = adapter.layers_path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new_blocks)
    for new_layer_idx, block in enumerate(new_blocks):
        attention = getattr(block, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_layer_idx
        if hasattr(block, "layer_idx"):
            block.layer_idx = new_layer_idx
    adapter.slice_config(model.config, kept)
    for sub in (getattr(model, "model", None),):
        if sub is not None and getattr(sub, "config", None) is not model.config:
            adapter.slice_config(sub.config, kept)
    return kept
