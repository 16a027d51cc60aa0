"""A checkpoint's weights, one module at a time, in a model skeleton on the meta device.

``ModelSkeleton`` builds the causal LM with transformers' own classes for the config under
``accelerate.init_empty_weights()``: every parameter is on the meta device and costs nothing.
Single modules (the embedding, one decoder block, the final norm and LM head) are materialised
from the checkpoint on demand. A *resident* skeleton keeps what it loaded (a model that fits the
memory budget is read once); otherwise each module goes back to the meta device when freed, so at
most one block's weights are in memory at a time. Either way the callers run the same code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from safetensors import safe_open
from torch import nn

from ..arch import ArchAdapter, adapter_for
from ..errors import ExportError, ModelLoadError
from ..fileio import read_provenance
from ..log import get_logger, progress
from .gguf_reader import GGUFCheckpointReader

if TYPE_CHECKING:
    from safetensors import safe_open

__all__ = [
    "CheckpointReader",
    "ModelSkeleton",
    "checkpoint_dtype",
    "config_dtype",
    "largest_module_bytes",
    "model_bytes",
    "open_weights",
    "return_freed_memory",
    "tensors_under",
    "write_safetensors",
    "write_shards",
]

MAX_SHARD_BYTES = 2**30  # shards are written one tensor at a time; this only sets how many files
RELEASE_BYTES = 256 * 2**20  # a writer's source unmaps its files after this much (mapped pages are resident)
_HEADER_ENTRY_BYTES = 96  # header room per tensor besides its name: dtype, a 2-D shape, offsets
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

log = get_logger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointReader:
    """Tensor name -> shard file of a safetensors checkpoint; reads tensors one at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_FILE).is_file():
            with safe_open(self.directory / SINGLE_FILE, framework="pt") as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}  # noqa: SIM118
        else:
            raise ModelLoadError(
                f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}",
                hint="layer-by-layer pruning reads safetensors checkpoints only",
            )
        self._handles: dict[str, safe_open] = {}

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, shard: str) -> safe_open:
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.directory / shard, framework="pt")
        return self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ModelLoadError(f"tensor {name!r} is missing from {self.directory}")
        return self._handle(self.weight_map[name]).get_tensor(name)

    def numel(self, name: str) -> int:
        count = 1
        for size in self._handle(self.weight_map[name]).get_slice(name).get_shape():
            count *= size
        return count

    def close(self) -> None:
        self._handles.clear()


@functools.cache
def _malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere a no-op).

    glibc keeps freed blocks of up to 32 MiB (activations, statistics, logits) in its heaps, and a
    module materialised next (the 0.9 GB embedding of a 152k vocabulary) is mapped beside them:
    before each LM head pass of Qwen2.5-1.5B's guard, 0.65 to 0.95 GB of the RSS was freed heap."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def tensors_under(reader: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name without prefix, tensor)`` for every tensor of ``reader`` under ``prefix.``."""
    head = prefix + "."
    for name in reader.weight_map:
        if name.startswith(head):
            yield name[len(head) :], reader.get(name)


def config_dtype(config: Any) -> Any:
    """The dtype a config declares, or None: ``dtype`` since transformers 4.56, ``torch_dtype``
    before (reading the old name on a newer transformers prints a deprecation warning)."""
    if hasattr(config, "dtype"):
        return config.dtype
    return getattr(config, "torch_dtype", None)


def checkpoint_dtype(config: Any) -> torch.dtype:
    dtype = config_dtype(config) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return dtype


def open_weights(directory: str | Path) -> Any:
    """The reader of a checkpoint's weights: its safetensors shards, or, for a GGUF source's cached
    conversion (config and tokenizer only), the GGUF file itself, dequantized one tensor at a time."""
    directory = Path(directory)
    if (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file():
        return CheckpointReader(directory)
    gguf_file = read_provenance(directory).get("gguf_file")
    if gguf_file and Path(gguf_file).is_file():
        from transformers import AutoConfig

        return GGUFCheckpointReader(gguf_file, config=AutoConfig.from_pretrained(directory))
    return CheckpointReader(directory)  # raises the clear "no weights" error


def model_bytes(directory: str | Path, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the checkpoint's tensors would take in ``dtype`` (read from headers only)."""
    reader = open_weights(directory)
    try:
        elements = sum(reader.numel(name) for name in reader.names())
    finally:
        reader.close()
    return elements * torch.tensor([], dtype=dtype).element_size()


def largest_module_bytes(directory: str | Path, layers_path: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes in ``dtype`` of the largest module a streamed pass holds at once: one decoder block
    (the tensors under ``layers_path.<i>.``), or any other module (the embedding, the LM head)."""
    head = layers_path + "."
    elements: dict[str, int] = {}
    reader = open_weights(directory)
    try:
        for name in reader.names():
            if name.startswith(head):
                module = head + name[len(head) :].split(".", 1)[0]
            else:
                module = name.rpartition(".")[0]
            elements[module] = elements.get(module, 0) + reader.numel(name)
    finally:
        reader.close()
    return max(elements.values(), default=0) * torch.tensor([], dtype=dtype).element_size()


def _safetensors_dtype(dtype: torch.dtype) -> str:
    if dtype not in _SAFETENSORS_DTYPES:
        raise ExportError(f"cannot write a {dtype} tensor to safetensors")
    return _SAFETENSORS_DTYPES[dtype]


class _HeaderEntry(TypedDict):
    """One tensor of a safetensors header."""

    dtype: str
    shape: list[int]
    data_offsets: list[int]  # [begin, end) in the data that follows the header


def _header(entries: dict[str, _HeaderEntry], size: int | None = None) -> bytes:
    """The JSON header, padded with spaces (as the format allows) to ``size`` or to a multiple of 8."""
    text = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    size = size if size is not None else -(-len(text) // 8) * 8
    return text + b" " * (size - len(text))


def write_safetensors(path: Path, items: list[tuple[str, int, Any]], release: Any = None) -> dict[str, int]:
    """Write ``(name, bytes, produce)`` items to one safetensors file, one tensor in memory at a time.

    The data is written behind a space reserved for the header, which is written last; a header
    larger than the reserve (tensors of many dimensions) is written in front of a copy of the data.
    ``release()`` runs after every ``RELEASE_BYTES`` produced. Returns each tensor's bytes."""
    reserve = _header_reserve(items)
    entries: dict[str, _HeaderEntry] = {}
    sizes: dict[str, int] = {}
    offset = since_release = 0
    with open(path, "w+b") as f:
        f.seek(8 + reserve)
        for name, _, produce in items:
            return_freed_memory()
            tensor = produce().cpu().contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            f.write(data.data)
            entries[name] = {
                "dtype": _safetensors_dtype(tensor.dtype),
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + data.nbytes],
            }
            sizes[name] = data.nbytes
            offset += data.nbytes
            since_release += data.nbytes
            del tensor, data
            if release is not None and since_release >= RELEASE_BYTES:
                release()
                since_release = 0
        header = _header(entries)
        if len(header) <= reserve:
            header = _header(entries, reserve)
            f.seek(0)
            f.write(struct.pack("<Q", len(header)) + header)
            return sizes
        with open(path.with_name(path.name + ".header"), "wb") as g:
            g.write(struct.pack("<Q", len(header)) + header)
            f.seek(8 + reserve)
            shutil.copyfileobj(f, g, 16 * 2**20)
    os.replace(path.with_name(path.name + ".header"), path)
    return sizes


def _header_reserve(items: list[tuple[str, int, Any]]) -> int:
    """Bytes to leave for the header: each entry's name plus room for a 2-D shape and offsets."""
    size = len(_header({})) + sum(len(json.dumps(name)) + _HEADER_ENTRY_BYTES for name, _, _ in items)
    return -(-size // 8) * 8


def write_shards(
    tensors: list[tuple[str, int, Any]],
    directory: Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    after_shard: Any = None,
) -> int:
    """Write ``(name, bytes, produce)`` items as safetensors shards of at most ``max_shard_bytes``
    (``model.safetensors`` when one is enough, else numbered shards and an index). Tensors are
    produced and written one at a time, so memory holds one tensor; ``after_shard()`` runs after
    each shard and every ``RELEASE_BYTES`` within one (a reader closes its memory-mapped files
    there: mapped pages count as resident memory). Returns the total bytes."""
    groups: list[list[tuple[str, int, Any]]] = [[]]
    size = 0
    for item in tensors:
        if groups[-1] and size + item[1] > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item[1]
    weight_map: dict[str, str] = {}
    total = 0
    for number, group in enumerate(progress(groups, desc="Writing shards", total=len(groups)), 1):
        name = SINGLE_FILE if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        sizes = write_safetensors(directory / name, group, release=after_shard)
        for key, n_bytes in sizes.items():
            weight_map[key] = name
            total += n_bytes
        if after_shard is not None:
            after_shard()
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total


class ModelSkeleton:
    """The model's module tree on the meta device; weights are loaded one module at a time."""

    def __init__(
        self,
        directory: str | Path,
        *,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        resident: bool = False,
        attn_implementation: str | None = None,
    ):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.directory = Path(directory)
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.resident = resident
        self.config = AutoConfig.from_pretrained(self.directory)
        self.adapter: ArchAdapter = adapter_for(self.config)
        self.reader = open_weights(self.directory)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32, **kwargs)
        self.model.eval()
        self.n_layers = len(self.adapter.blocks(self.model))
        # Block path -> its GPU, where resident blocks are spread over several (``calib.placement``);
        # everything else is on ``device``.
        self.block_devices: dict[str, torch.device] = {}
        self._loaded: set[str] = set()
        # Non-persistent buffers (rotary frequencies, embedding scales) are real tensors already.
        for name, buffer in list(self.model.named_buffers()):
            if buffer.device.type != "meta":
                self._set(name, buffer, dtype=buffer.dtype)

    # --- module paths ---------------------------------------------------------------------
    @property
    def base_path(self) -> str:
        return self.adapter.layers_path.rpartition(".")[0]

    @property
    def base(self) -> nn.Module:
        return self.model.get_submodule(self.base_path)

    @property
    def embedding_path(self) -> str:
        return f"{self.base_path}.embed_tokens"

    def block_path(self, layer_idx: int) -> str:
        return f"{self.adapter.layers_path}.{layer_idx}"

    def block(self, layer_idx: int) -> nn.Module:
        return self.adapter.blocks(self.model)[layer_idx]

    # --- loading and freeing ----------------------------------------------------------------
    def _set(
        self,
        name: str,
        value: torch.Tensor,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        from accelerate.utils import set_module_tensor_to_device

        if dtype is None and value.is_floating_point():
            dtype = self.compute_dtype
        set_module_tensor_to_device(self.model, name, device or self.device, value=value, dtype=dtype)

    def load_module(self, path: str, *, aliases: dict[str, str] | None = None) -> nn.Module:
        """Materialise every parameter of the module at ``path`` (once, if resident).

        ``aliases`` maps a parameter name to the checkpoint tensor it shares (tied weights)."""
        module = self.model.get_submodule(path)
        if path in self._loaded:
            return module
        return_freed_memory()
        found = dict(tensors_under(self.reader, path))
        for name, tensor_name in (aliases or {}).items():
            found.setdefault(name, self.reader.get(tensor_name))
        # Unmap the shards: mapped pages count as resident memory for as long as a file is open.
        self.reader.close()
        device = self.block_devices.get(path, self.device)
        for name, _ in module.named_parameters():
            if name not in found:
                raise ModelLoadError(f"tensor {path}.{name} is missing from {self.directory}")
            self._set(f"{path}.{name}", found[name], device=device)
        if self.resident:
            self._loaded.add(path)
        return module

    def load_embedding(self) -> nn.Module:
        return self.load_module(self.embedding_path)

    def load_block(self, layer_idx: int) -> nn.Module:
        """Original block ``layer_idx`` with its weights in the compute dtype."""
        return self.load_module(self.block_path(layer_idx))

    def load_head(self) -> tuple[nn.Module, nn.Module]:
        """The final norm and the LM head (tied to the embedding when the checkpoint says so)."""
        norm = self.load_module(f"{self.base_path}.norm")
        head_name = "lm_head.weight"
        aliases = {}
        if head_name not in self.reader.weight_map:
            aliases = {"weight": f"{self.embedding_path}.weight"}
        return norm, self.load_module("lm_head", aliases=aliases)

    def free(self, path: str) -> None:
        """Send the module's parameters back to the meta device (unless resident)."""
        if self.resident:
            return
        module = self.model.get_submodule(path)
        for name, param in list(module.named_parameters(recurse=True)):
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            owner._parameters[attr] = nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False
            )

    def free_block(self, layer_idx: int) -> None:
        self.free(self.block_path(layer_idx))

    def close(self) -> None:
        self.reader.close()
