"""Read a GGUF file one tensor at a time, under Hugging Face tensor names, like ``CheckpointReader``.

``GGUFCheckpointReader`` parses the header once (``fileio.read_gguf_header``), records where each tensor's
bytes lie, and closes the mapping again. ``get(hf_name)`` then reads that tensor's bytes from the
file, dequantizes them with ``gguf.quants.dequantize`` and returns float32 in transformers'
layout, so a block engine can materialise one decoder block at a time from a quantized file.

GGUF names are mapped to HF names with the ``gguf`` package's ``TensorNameMap``, applied to the
parameter names of the transformers model for the file's config (built on the meta device, so it
costs nothing). What llama.cpp's converter changed is undone here:
- llama arch (Llama, Mistral): q/k rows are stored in llama.cpp's pairwise rotary order; they are
  permuted back per head (biases too);
- Gemma 2/3: RMSNorm weights are stored as ``1 + w``; ``w`` is returned;
- tied embeddings: a file without ``output.weight`` has no ``lm_head.weight``, as an HF checkpoint
  with tied embeddings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from ..arch import ArchAdapter, adapter_for
from ..errors import ModelLoadError
from ..fileio import GGUFTensorInfo, open_gguf
from ..log import get_logger
from ..records import JsonObject

__all__ = [
    "GGUFCheckpointReader",
    "GGUFFacts",
    "GGUFTensorInfo",
    "config_from_gguf",
    "gguf_block_bytes",
    "gguf_model_bytes",
    "read_gguf_facts",
]

log = get_logger(__name__)

# GGUF tensors with no transformers parameter: derived data that transformers recomputes.
_DERIVED = ("rope_freqs.weight",)
DEQUANTIZE_CHUNK_BYTES = 32 * 2**20  # float32 output per dequantize call


@dataclass(frozen=True)
class GGUFFacts:
    """What a GGUF file is, read from its header alone."""

    path: Path
    arch: str
    block_count: int
    tensors: dict[str, GGUFTensorInfo]
    tied_embeddings: bool
    file_type: int | None
    tensor_types: dict[str, int] = field(default_factory=dict)
    metadata: JsonObject = field(default_factory=dict, repr=False)  # the file's key-value pairs


def read_gguf_facts(path: str | Path) -> GGUFFacts:
    """Parse the header of ``path``; ModelLoadError when it is not a complete GGUF file."""
    path = Path(path)
    header = open_gguf(path)
    tensors = {t.name: t for t in header.tensors}
    metadata = header.metadata
    arch = metadata.get(gguf.Keys.General.ARCHITECTURE)
    if not arch:
        raise ModelLoadError(f"{path} has no general.architecture key", hint="is it a llama.cpp model file?")
    block_count = metadata.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    if block_count is None:
        raise ModelLoadError(f"{path} has no {arch}.block_count key")
    file_type = metadata.get(gguf.Keys.General.FILE_TYPE)
    return GGUFFacts(
        path=path,
        arch=str(arch),
        block_count=int(block_count),
        tensors=tensors,
        tied_embeddings="output.weight" not in tensors,
        file_type=None if file_type is None else int(file_type),
        tensor_types=dict(Counter(t.qtype.name for t in tensors.values())),
        metadata={k: v for k, v in metadata.items() if not k.startswith("tokenizer.ggml.")},
    )


def config_from_gguf(path: str | Path) -> Any:
    """The transformers config of a GGUF file (transformers' own GGUF metadata mapping)."""
    from transformers import AutoConfig

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise ModelLoadError(
            f"transformers could not read the config of {path} ({type(e).__name__}: {str(e)[:160]})",
            hint="the file may be truncated, or of an architecture transformers cannot load from GGUF",
        ) from e
    adapter = adapter_for(config)
    if not getattr(config, "architectures", None):
        config.architectures = [adapter.hf_architectures[0]]
    pattern = open_gguf(path).metadata.get(f"{adapter.gguf_arch}.attention.sliding_window_pattern")
    adapter.complete_config_from_gguf(config, pattern if isinstance(pattern, list) else None)
    return config


def _model_arch(arch: str) -> Any:
    for key, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return key
    raise ModelLoadError(f"the installed gguf package does not know architecture {arch!r}")


def _hf_parameter_names(config: Any) -> list[str]:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return list(model.state_dict())


def _gguf_to_hf(facts: GGUFFacts, config: Any) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, for every tensor in the file."""
    name_map = gguf.get_tensor_name_map(_model_arch(facts.arch), facts.block_count)
    candidates: dict[str, str] = {}
    for hf_name in _hf_parameter_names(config):
        found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is not None:
            candidates.setdefault(found, hf_name)
    mapping: dict[str, str] = {}
    for gguf_name in facts.tensors:
        if gguf_name in _DERIVED:
            continue
        if gguf_name not in candidates:
            raise ModelLoadError(
                f"can not map GGUF tensor {gguf_name!r} of {facts.path.name} to a "
                f"{type(config).__name__} parameter",
                hint="the file holds tensors this architecture's transformers model does not have",
            )
        mapping[gguf_name] = candidates[gguf_name]
    return mapping


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q/k from llama.cpp's pairwise rotary layout back to transformers' half-split one."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpointReader:
    """HF tensor name -> GGUF file; reads and dequantizes tensors one at a time.

    The same interface as ``CheckpointReader``: ``weight_map``, ``names()``, ``get()``,
    ``shards``, ``close()``. ``bytes_read`` / ``bytes_dequantized`` /
    ``tensors_read`` count what ``get`` has done (``reset_counters()`` zeroes them).
    """

    def __init__(self, path: str | Path, config: Any | None = None):
        self.path = Path(path)
        self.directory = self.path.parent
        self.facts = read_gguf_facts(self.path)
        self.config = config if config is not None else config_from_gguf(self.path)
        self.adapter: ArchAdapter = adapter_for(self.config)
        self._gguf_names = {hf: g for g, hf in _gguf_to_hf(self.facts, self.config).items()}
        self.weight_map: dict[str, str] = {hf: self.path.name for hf in self._gguf_names}
        self._file: Any = None
        self.reset_counters()

    # --- facts -----------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.facts.arch

    @property
    def block_count(self) -> int:
        return self.facts.block_count

    @property
    def shards(self) -> list[str]:
        return [self.path.name]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def gguf_name(self, hf_name: str) -> str:
        if hf_name not in self._gguf_names:
            raise ModelLoadError(f"tensor {hf_name!r} is missing from {self.path}")
        return self._gguf_names[hf_name]

    def info(self, hf_name: str) -> GGUFTensorInfo:
        return self.facts.tensors[self.gguf_name(hf_name)]

    def numel(self, hf_name: str) -> int:
        return self.info(hf_name).numel

    # --- reading -----------------------------------------------------------------------------
    def reset_counters(self) -> None:
        self.bytes_read = 0
        self.bytes_dequantized = 0
        self.tensors_read = 0

    def raw(self, hf_name: str) -> np.ndarray:
        """The tensor's bytes as stored (uint8, GGUF byte shape)."""
        info = self.info(hf_name)
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        buf = bytearray(info.n_bytes)
        self._file.seek(info.offset)
        if self._file.readinto(buf) != info.n_bytes:
            raise ModelLoadError(f"{self.path} is truncated inside tensor {info.name}")
        self.bytes_read += info.n_bytes
        return np.frombuffer(buf, dtype=np.uint8).reshape(info.byte_shape)

    def get(self, hf_name: str) -> torch.Tensor:
        """The tensor as transformers holds it, in float32."""
        info = self.info(hf_name)
        data = self._to_transformers(hf_name, self._dequantize(info, self.raw(hf_name)))
        self.bytes_dequantized += data.nbytes
        self.tensors_read += 1
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))

    def _dequantize(self, info: GGUFTensorInfo, raw: np.ndarray) -> np.ndarray:
        """``raw`` as float32 of ``info.shape``, a few rows at a time: gguf-py's dequantizers hold
        several float arrays of the whole input at once (2.2 GB for a 0.9 GB embedding)."""
        out = np.empty(info.shape, dtype=np.float32)
        rows = out.reshape(-1, info.shape[-1]) if out.ndim > 1 else out.reshape(1, -1)
        raw_rows = raw.reshape(rows.shape[0], -1)
        step = max(1, DEQUANTIZE_CHUNK_BYTES // max(1, rows.shape[1] * 4))
        try:
            for lo in range(0, rows.shape[0], step):
                chunk = dequantize(raw_rows[lo : lo + step], info.qtype)
                rows[lo : lo + step] = np.asarray(chunk, dtype=np.float32).reshape(-1, rows.shape[1])
        except NotImplementedError as e:
            raise ModelLoadError(
                f"tensor {info.name} of {self.path.name} is {info.qtype.name}, which the gguf package "
                "cannot dequantize",
                hint="upgrade the gguf package",
            ) from e
        return out

    def _to_transformers(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        import gguf

        offset = self.adapter.norm_weight_offset
        if offset and hf_name.endswith("norm.weight"):
            data = data - np.float32(offset)
        if self.arch == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]:
            name = self.gguf_name(hf_name)
            cfg = self.config
            if name.split(".")[-2] == "attn_q":
                data = _unpermute_rope_rows(data, cfg.num_attention_heads)
            elif name.split(".")[-2] == "attn_k":
                kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
                data = _unpermute_rope_rows(data, kv_heads)
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> GGUFCheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self.close()


def gguf_model_bytes(path: str | Path, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the file's tensors would take in ``dtype`` once dequantized (header only)."""
    element_size = torch.tensor([], dtype=dtype).element_size()
    return sum(t.numel for t in read_gguf_facts(path).tensors.values()) * element_size


def gguf_block_bytes(reader: GGUFCheckpointReader, layer_idx: int, prefix: str = "model.layers") -> int:
    """Float32 bytes of one decoder block's tensors (what loading that block dequantizes)."""
    head = f"{prefix}.{layer_idx}."
    return sum(reader.info(n).numel * 4 for n in reader.names() if n.startswith(head))
