"""Fold the fitted map into the block before the cut, then delete and renumber blocks.

After the fold, block ``i = start - 1`` adds ``M_i · T`` instead of ``M_i`` to the residual
stream. With ``y = x·W_downᵀ`` that is ``W_down ← Tᵀ·W_down``. For families with a norm after
the MLP (Gemma), T is diagonal and scales the norm's effective weight instead. The result is an
ordinary model of the same architecture: no new modules, only fewer blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..arch import ArchAdapter
from ..errors import ConfigError

__all__ = [
    "fold_into_down_proj",
    "fold_into_post_mlp_norm",
    "fold_map",
    "kept_layers",
    "remove_blocks",
]


def fold_into_down_proj(down_proj: nn.Linear, transform: torch.Tensor) -> None:
    """``W_down ← Tᵀ·W_down`` (and ``b ← b·T``), computed in float64, stored in place."""
    weight = down_proj.weight
    t64 = transform.to(device=weight.device, dtype=torch.float64)
    folded = t64.T @ weight.data.to(torch.float64)
    weight.data.copy_(folded.to(weight.dtype))
    if down_proj.bias is not None:
        bias = down_proj.bias
        bias.data.copy_((bias.data.to(torch.float64) @ t64).to(bias.dtype))


def fold_into_post_mlp_norm(norm: nn.Module, scale: torch.Tensor, weight_offset: float) -> None:
    """Scale a norm's effective weight ``(offset + w)`` per channel by ``scale``."""
    weight = norm.weight
    s64 = scale.to(device=weight.device, dtype=torch.float64)
    effective = (weight.data.to(torch.float64) + weight_offset) * s64
    weight.data.copy_((effective - weight_offset).to(weight.dtype))


def fold_map(adapter: ArchAdapter, block: nn.Module, transform: torch.Tensor) -> None:
    """Fold a fitted map (d×d, or a length-d diagonal for post-MLP-norm families) into ``block``."""
    if adapter.dense_fold:
        if transform.dim() != 2:
            transform = torch.diag(transform)
        fold_into_down_proj(adapter.down_proj_module(block), transform)
        return
    if transform.dim() == 2:
        off_diagonal = transform - torch.diag(torch.diagonal(transform))
        if off_diagonal.abs().max() > 0:
            raise ConfigError(f"{adapter.family} has a norm after the MLP; only a diagonal map folds exactly")
        transform = torch.diagonal(transform)
    fold_into_post_mlp_norm(adapter.post_mlp_norm_module(block), transform, adapter.norm_weight_offset)


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
