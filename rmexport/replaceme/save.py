"""Stream a pruned checkpoint from the original one, shard by shard, without loading the model.

Every tensor is copied in the source's dtype except: tensors of removed blocks are dropped,
later blocks get their new indices, and the fitted maps are folded into the block before each
cut (``W_down ← Tᵀ·W_down`` in float64, or the diagonal into Gemma's post-MLP norm), with the
same arithmetic as the in-memory fold on a float32 model, then cast to the checkpoint's dtype.
The config is sliced by the adapter, the tokenizer and generation files are copied, the shard
index is rewritten. Everything is written into a temporary folder that replaces ``target``
only when complete.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ArchAdapter, adapter_for
from ..atomic import replace_dir
from ..calib.weights import INDEX_FILE, SINGLE_FILE, CheckpointReader, checkpoint_dtype
from ..errors import ExportError
from ..log import get_logger, progress
from ..models import PROVENANCE_FILE, write_provenance
from .apply import fold_into_down_proj, fold_into_post_mlp_norm

__all__ = ["fold_tensor", "save_pruned_checkpoint"]

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
    adapter: ArchAdapter, param_name: str, tensor: torch.Tensor, transforms: list[torch.Tensor]
) -> torch.Tensor:
    """A block's ``param_name`` tensor with ``transforms`` folded in, in the tensor's dtype.

    The arithmetic is that of ``replaceme.apply`` on a float32 model: each fold in float64,
    stored as float32, and the result cast back to the checkpoint's dtype."""
    value = tensor.to(torch.float32)
    if adapter.dense_fold:
        module = nn.Linear(1, 1, bias=False)
        module.weight = nn.Parameter(value, requires_grad=False)
        for transform in transforms:
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
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``source_dir`` keeping original blocks ``kept`` (in order), with
    ``folds[layer_idx]`` (maps, in order) folded into those blocks, to ``target``."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    source_dir, target = Path(source_dir), Path(target)
    config = AutoConfig.from_pretrained(source_dir)
    adapter = adapter_for(config)
    reader = CheckpointReader(source_dir)
    rename = _renamer(adapter, kept)
    folded_name = _folded_name(adapter)
    if adapter.dense_fold and any(
        name.endswith(f"{adapter.down_proj}.bias") for name in reader.names()
    ):  # pragma: no cover - no supported family has a down_proj bias
        raise ExportError(f"{adapter.family}: streaming the fold into a down_proj bias is not supported")
    missing = {j for j in folds if f"{adapter.layers_path}.{j}.{folded_name}" not in reader.weight_map}
    if missing:
        raise ExportError(f"no {folded_name} tensor for block(s) {sorted(missing)} in {source_dir}")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shards = reader.shards
        sharded = len(shards) > 1 or not (source_dir / SINGLE_FILE).is_file()
        weight_map: dict[str, str] = {}
        total_bytes = 0
        for number, shard in enumerate(progress(shards, desc="Writing shards", total=len(shards)), 1):
            out_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors" if sharded else SINGLE_FILE
            tensors: dict[str, torch.Tensor] = {}
            for name in [n for n, s in reader.weight_map.items() if s == shard]:
                new_name, layer_idx, rest = rename(name)
                if new_name is None:
                    continue
                tensor = reader.get(name)
                if layer_idx in folds and rest == folded_name:
                    tensor = fold_tensor(adapter, rest, tensor, folds[layer_idx])
                tensors[new_name] = tensor.contiguous()
                weight_map[new_name] = out_name
                total_bytes += tensor.numel() * tensor.element_size()
            reader.close()
            if tensors:
                save_file(tensors, tmp / out_name, metadata={"format": "pt"})
            del tensors
        reader.close()
        if sharded:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

        adapter.slice_config(config, kept)
        config.dtype = checkpoint_dtype(config)
        config.save_pretrained(tmp)
        for item in source_dir.iterdir():
            if item.is_file() and item.name not in ("config.json", PROVENANCE_FILE):
                if not _WEIGHT_FILE.match(item.name):
                    shutil.copy2(item, tmp / item.name)
        if provenance is not None:
            write_provenance(tmp, provenance)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %d blocks, %.1f MB", target, len(kept), total_bytes / 1e6)
    return target
