"""Stream a pruned checkpoint from the original one, tensor by tensor, without loading the model.

Every tensor is copied in the source's dtype except: tensors of removed blocks are dropped,
later blocks get their new indices, and the fitted maps are folded into the block before each
cut (``W_down ← Tᵀ·W_down`` in float64, or the diagonal into Gemma's post-MLP norm) and into the
repaired blocks (their ``down_proj`` and attention output projection), with the same arithmetic
as the in-memory fold on a float32 model, then cast to the checkpoint's dtype.
The config is sliced by the adapter, the tokenizer and generation files are copied, the shard
index is rewritten. Everything is written into a temporary folder that replaces ``target``
only when complete.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ArchAdapter, adapter_for
from ..atomic import staged_dir, staged_file
from ..calib.weights import checkpoint_dtype, open_weights, write_shards
from ..errors import ExportError
from ..fold import (
    ATTENTION_SITE,
    MLP_SITE,
    fold_into_attention_output,
    fold_into_down_proj,
    fold_into_post_mlp_norm,
)
from ..log import get_logger
from ..models import PROVENANCE_FILE, write_provenance

__all__ = ["MAPS_FILE", "fold_tensor", "load_maps", "save_maps", "save_pruned_checkpoint"]

# The fitted maps of a prune, by original block index: what a GGUF-to-GGUF export folds in.
MAPS_FILE = "maps.safetensors"
_SITE_PREFIX = {MLP_SITE: "block", ATTENTION_SITE: "attention"}

log = get_logger(__name__)

_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|gguf)$|.*\.safetensors\.index\.json$")


def _renamer(adapter: ArchAdapter, kept: list[int]):
    """Tensor name -> name in the pruned checkpoint, or None for tensors of removed blocks."""
    pattern = re.compile(rf"^{re.escape(adapter.layers_path)}\.(\d+)\.(.+)$")
    new_index = {layer_idx: i for i, layer_idx in enumerate(kept)}

    def rename(name: str) -> tuple[str | None, int | None, str | None]:
        match = pattern.match(name)
        if match is None:
            return name, None, None
        layer_idx, rest = int(match.group(1)), match.group(2)
        if layer_idx not in new_index:
            return None, layer_idx, rest
        return f"{adapter.layers_path}.{new_index[layer_idx]}.{rest}", layer_idx, rest

    return rename


def fold_tensor(
    adapter: ArchAdapter,
    param_name: str,
    tensor: torch.Tensor,
    transforms: list[torch.Tensor],
    site: str = MLP_SITE,
) -> torch.Tensor:
    """A block's ``param_name`` tensor with ``transforms`` (maps at ``site``) folded in, in the
    tensor's dtype.

    The arithmetic is that of ``rmexport.fold`` on a float32 model: each fold in float64,
    stored as float32, and the result cast back to the checkpoint's dtype."""
    value = tensor.to(torch.float32)
    if site == ATTENTION_SITE or adapter.dense_fold:
        module = nn.Linear(1, 1, bias=False)
        module.weight = nn.Parameter(value, requires_grad=False)
        for transform in transforms:
            if site == ATTENTION_SITE:
                fold_into_attention_output(module, transform)
            else:
                fold_into_down_proj(module, transform if transform.dim() == 2 else torch.diag(transform))
        return module.weight.data.to(tensor.dtype)
    module = nn.Module()
    module.weight = nn.Parameter(value, requires_grad=False)
    for transform in transforms:
        scale = torch.diagonal(transform) if transform.dim() == 2 else transform
        fold_into_post_mlp_norm(module, scale, adapter.norm_weight_offset)
    return module.weight.data.to(tensor.dtype)


def _folded_name(adapter: ArchAdapter) -> str:
    return f"{adapter.down_proj if adapter.dense_fold else adapter.post_mlp_norm}.weight"


def save_pruned_checkpoint(
    source_dir: str | Path,
    target: str | Path,
    kept: list[int],
    folds: dict[int, list[torch.Tensor]],
    *,
    attention_folds: dict[int, list[torch.Tensor]] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``source_dir`` keeping original blocks ``kept`` (in order), with
    ``folds[layer_idx]`` (maps at the MLP site, in order) and ``attention_folds[layer_idx]`` (maps
    replacing the attention output projection) folded into those blocks, to ``target``. The weights
    come from the source's shards, or from its GGUF file (dequantized), one tensor at a time."""
    from transformers import AutoConfig

    source_dir, target = Path(source_dir), Path(target)
    config = AutoConfig.from_pretrained(source_dir)
    adapter = adapter_for(config)
    reader = open_weights(source_dir)
    rename = _renamer(adapter, kept)
    folded_name = _folded_name(adapter)
    if adapter.dense_fold and any(
        name.endswith(f"{adapter.down_proj}.bias") for name in reader.names()
    ):  # pragma: no cover - no supported family has a down_proj bias
        raise ExportError(f"{adapter.family}: streaming the fold into a down_proj bias is not supported")
    attention_folds = attention_folds or {}
    attention_name = f"{adapter.attention_output}.weight"
    for by_layer, tensor_name in ((folds, folded_name), (attention_folds, attention_name)):
        missing = {j for j in by_layer if f"{adapter.layers_path}.{j}.{tensor_name}" not in reader.weight_map}
        if missing:
            raise ExportError(f"no {tensor_name} tensor for block(s) {sorted(missing)} in {source_dir}")

    def producer(name: str, layer_idx: int | None, rest: str | None):
        def produce() -> torch.Tensor:
            tensor = reader.get(name)
            if layer_idx in folds and rest == folded_name:
                tensor = fold_tensor(adapter, rest, tensor, folds[layer_idx])
            if layer_idx in attention_folds and rest == attention_name:
                tensor = fold_tensor(adapter, rest, tensor, attention_folds[layer_idx], ATTENTION_SITE)
            return tensor

        return produce

    tensors = []
    for name in reader.names():
        new_name, layer_idx, rest = rename(name)
        if new_name is not None:
            tensors.append((new_name, reader.numel(name) * 4, producer(name, layer_idx, rest)))
    with staged_dir(target) as tmp:
        total_bytes = write_shards(tensors, tmp, after_shard=reader.close)
        reader.close()
        adapter.slice_config(config, kept)
        config.dtype = checkpoint_dtype(config)
        config.save_pretrained(tmp)
        for item in source_dir.iterdir():
            if item.is_file() and item.name not in ("config.json", PROVENANCE_FILE):
                if not _WEIGHT_FILE.match(item.name):
                    shutil.copy2(item, tmp / item.name)
        if provenance is not None:
            write_provenance(tmp, provenance)
    log.info("wrote %s: %d blocks, %.1f MB", target, len(kept), total_bytes / 1e6)
    return target


def save_maps(
    path: Path,
    folds: dict[int, list[torch.Tensor]],
    attention_folds: dict[int, list[torch.Tensor]] | None = None,
) -> None:
    """The fitted maps (float64) written atomically: ``block.{layer_idx}.{k}`` at the MLP site and
    ``attention.{layer_idx}.{k}`` at the attention site, in folding order."""
    from safetensors.torch import save_file

    tensors = {
        f"{prefix}.{j}.{k}": t.to(torch.float64).contiguous()
        for prefix, by_layer in (
            (_SITE_PREFIX[MLP_SITE], folds),
            (_SITE_PREFIX[ATTENTION_SITE], attention_folds or {}),
        )
        for j, ts in by_layer.items()
        for k, t in enumerate(ts)
    }
    with staged_file(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "rmexport-maps"})


def load_maps(path: Path, site: str = MLP_SITE) -> dict[int, list[torch.Tensor]]:
    """The maps ``save_maps`` wrote at ``site``, by original block index, in folding order."""
    from safetensors.torch import load_file

    prefix = _SITE_PREFIX[site]
    tensors = {n: t for n, t in load_file(path).items() if n.split(".")[0] == prefix}
    folds: dict[int, list[torch.Tensor]] = {}
    for name in sorted(tensors, key=lambda n: tuple(int(x) for x in n.split(".")[1:])):
        folds.setdefault(int(name.split(".")[1]), []).append(tensors[name])
    return folds
