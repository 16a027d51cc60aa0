"""Fold a fitted map into the block before a cut: the weight arithmetic the prune's save and the
block engine (which streams a model with its maps applied) both use.

A map has one of three shapes:
* d×d, a map ``T`` of the MLP's output: block ``i = start - 1`` adds ``M_i · T`` instead of
  ``M_i`` to the residual stream. With ``y = x·W_downᵀ`` that is ``W_down ← Tᵀ·W_down``;
* d_ff×d, a map ``W`` of the MLP's hidden activations ``H_i`` (the input of ``down_proj``): the
  block adds ``H_i · W``, so ``W_down ← Wᵀ``. The d×d map is the special case ``W = W_downᵀ·T``;
* a length-d diagonal, for families with a norm after the MLP (Gemma), which a dense map does not
  commute with: it scales the norm's effective weight.

Those are maps at the MLP site. The repair of the blocks after a cut also refits the attention's
output projection (the attention site): a map ``W`` of its input replaces it, ``W_o ← Wᵀ``.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import ArchAdapter
from .errors import ConfigError

__all__ = [
    "ATTENTION_SITE",
    "MLP_SITE",
    "SITES",
    "fold_into_down_proj",
    "fold_into_post_mlp_norm",
    "fold_map",
    "is_hidden_map",
    "site_module",
]

MLP_SITE = "mlp"
ATTENTION_SITE = "attention"
SITES = (MLP_SITE, ATTENTION_SITE)


def is_hidden_map(transform: torch.Tensor, down_proj_shape: tuple[int, ...]) -> bool:
    """Whether ``transform`` maps the MLP's hidden activations (d_ff×d against ``W_down``'s
    [d, d_ff]); a d×d map acts on the MLP's output. Never ambiguous: hidden maps are only fitted
    where d_ff ≠ d."""
    d, d_ff = down_proj_shape
    return d != d_ff and tuple(transform.shape) == (d_ff, d)


def fold_into_down_proj(down_proj: nn.Linear, transform: torch.Tensor) -> None:
    """``W_down ← Tᵀ·W_down`` (and ``b ← b·T``) for a d×d map, or ``W_down ← Wᵀ`` for a map of the
    hidden activations (which also replaces the bias: ``W`` was fitted to the whole output)."""
    weight = down_proj.weight
    t64 = transform.to(device=weight.device, dtype=torch.float64)
    if is_hidden_map(t64, tuple(weight.shape)):
        weight.data.copy_(t64.T.to(weight.dtype))
        if down_proj.bias is not None:
            down_proj.bias.data.zero_()
        return
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


def site_module(adapter: ArchAdapter, block: nn.Module, site: str) -> nn.Module:
    """The module whose weight a map at ``site`` rewrites."""
    if site == ATTENTION_SITE:
        return adapter.attention_output_module(block)
    return adapter.down_proj_module(block) if adapter.dense_fold else adapter.post_mlp_norm_module(block)


def fold_map(adapter: ArchAdapter, block: nn.Module, transform: torch.Tensor, site: str = MLP_SITE) -> None:
    """Fold a fitted map (any of the module docstring's shapes) into ``block``."""
    if site == ATTENTION_SITE:
        fold_into_attention_output(adapter.attention_output_module(block), transform)
        return
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


def fold_into_attention_output(o_proj: nn.Linear, transform: torch.Tensor) -> None:
    """``W_o ← Wᵀ`` for a map ``W`` of the projection's input (which also replaces the bias)."""
    weight = o_proj.weight
    if tuple(transform.shape) != tuple(weight.shape[::-1]):
        raise ConfigError(
            f"a map of shape {tuple(transform.shape)} does not replace o_proj {tuple(weight.shape)}"
        )
    weight.data.copy_(transform.to(device=weight.device, dtype=torch.float64).T.to(weight.dtype))
    if o_proj.bias is not None:
        o_proj.bias.data.zero_()
