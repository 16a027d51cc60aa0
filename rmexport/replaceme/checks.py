"""What the pruned model is checked against, rebuilt from the folds without copying the model.

Each fold remembers the block's original parameters and its map. From the pruned model that gives:
* ``explicit_maps``: original weights back, the map applied as an extra step after the MLP — the
  reference for fold parity (the fold must not change what the model computes);
* ``plain_removal``: original weights back, no map — the baseline the fit has to beat.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import ArchAdapter
from .apply import fold_map

__all__ = ["Fold", "apply_fold", "explicit_maps", "plain_removal"]


@dataclass
class Fold:
    block: nn.Module
    transform: torch.Tensor
    original: dict[str, torch.Tensor]  # parameter name in block -> original value


def _folded_parameters(adapter: ArchAdapter, block: nn.Module) -> dict[str, nn.Parameter]:
    module_path = adapter.down_proj if adapter.dense_fold else adapter.post_mlp_norm
    module = block.get_submodule(module_path)
    return {f"{module_path}.{name}": p for name, p in module.named_parameters(recurse=False)}


def apply_fold(adapter: ArchAdapter, block: nn.Module, transform: torch.Tensor) -> Fold:
    """Fold ``transform`` into ``block`` and return what is needed to undo or re-check it."""
    original = {name: p.detach().clone() for name, p in _folded_parameters(adapter, block).items()}
    fold_map(adapter, block, transform)
    return Fold(block, transform, original)


@contextlib.contextmanager
def _original_weights(adapter: ArchAdapter, folds: list[Fold]) -> Iterator[None]:
    saved = []
    # Newest first, so a block folded twice ends with its weights from before the first fold.
    for fold in reversed(folds):
        params = _folded_parameters(adapter, fold.block)
        for name, value in fold.original.items():
            saved.append((params[name], params[name].detach().clone()))
            params[name].data.copy_(value)
    try:
        yield
    finally:
        for param, value in reversed(saved):
            param.data.copy_(value)


@contextlib.contextmanager
def plain_removal(adapter: ArchAdapter, folds: list[Fold]) -> Iterator[None]:
    with _original_weights(adapter, folds):
        yield


@contextlib.contextmanager
def explicit_maps(adapter: ArchAdapter, folds: list[Fold]) -> Iterator[None]:
    handles = []

    def hook_for(transform: torch.Tensor):
        def hook(_module, _inputs, output):
            t = transform.to(torch.float64)
            mapped = output.to(torch.float64) * t if t.dim() == 1 else output.to(torch.float64) @ t
            return mapped.to(output.dtype)

        return hook

    with _original_weights(adapter, folds):
        try:
            for fold in folds:
                module = adapter.mlp_output_module(fold.block)
                handles.append(module.register_forward_hook(hook_for(fold.transform)))
            yield
        finally:
            for handle in handles:
                handle.remove()
