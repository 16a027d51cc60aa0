"""Prune a GGUF file directly: drop blocks, fold the fitted maps, keep every other byte.

``write_pruned_gguf`` writes a GGUF of the same architecture and quantization as its source:
- every tensor of a kept block, the embeddings, the output head and the norms are copied byte for
  byte, in their own type; block tensors are renamed ``blk.{old}`` -> ``blk.{new}``;
- the tensor a fitted map is folded into is rewritten: ``ffn_down`` for dense families
  (``W_down <- Tᵀ·W_down`` for a d×d map, with ``W_down`` as transformers holds it, [d, d_ff],
  which is also the GGUF data's numpy orientation; ``W_down <- Wᵀ`` for a d_ff×d map of the
  hidden activations), or, for Gemma, the ``post_ffw_norm`` weight scaled per channel; and the
  ``attn_output`` of a block whose attention output the repair refitted (``W_o <- Wᵀ``).
  It is computed in float64 from the dequantized source and quantized (``ggml_quant.quantize_like``:
  gguf-py, or llama.cpp's own quantizer for K-quants) to the source's type, except that a folded
  ``ffn_down`` or a refitted ``attn_output`` is written at no fewer bits than Q8_0 (``folded_type``);
- metadata is the source's, except ``{arch}.block_count`` and the per-layer arrays (any
  ``{arch}.*`` array as long as the old block count), which are sliced to the kept blocks;
- a family whose llama.cpp loader has sliding layers (Gemma 2/3) gets the kept blocks' pattern as
  the per-layer array ``{arch}.attention.sliding_window_pattern``: the source's array, sliced, or,
  when the source has none, the pattern llama.cpp derived for the source from the layer index.

The file is written beside the target and renamed into place when complete.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGUFValueType, GGUFWriter, Keys

from rmexport.arch import gguf_adapter
from rmexport.errors import ConfigError, ExportError, ModelLoadError
from rmexport.fileio import GGUFTensorInfo, open_gguf
from rmexport.llamacpp import installed_version
from rmexport.log import get_logger, progress
from rmexport.records import JsonObject, from_jsonable

from . import gguf_metadata
from .ggml_quant import Quantized, bits_per_weight, quantize_like

__all__ = [
    "BlockCount",
    "FileSizes",
    "GGUFPrune",
    "TensorWrite",
    "folded_type",
    "write_pruned_gguf",
]

log = get_logger(__name__)

_SLIDING, _FULL = "sliding_attention", "full_attention"


def _renamed(tensor: GGUFTensorInfo, new_block: int) -> str:
    parts = tensor.name.split(".")
    return ".".join([parts[0], str(new_block), *parts[2:]])


class _Source:
    """The source file's metadata and tensor table; tensor bytes are read on demand."""

    def __init__(self, path: Path):
        header = open_gguf(path, strings=True)
        self.path = path
        self.tensors = header.tensors
        self.by_name = {t.name: t for t in self.tensors}
        self.metadata = gguf_metadata.header_metadata(header)
        arch = self.metadata.get(Keys.General.ARCHITECTURE)
        if arch is None:
            raise ModelLoadError(f"{path} has no general.architecture key")
        self.arch = str(arch.value)
        block_key = Keys.LLM.BLOCK_COUNT.format(arch=self.arch)
        if block_key not in self.metadata:
            raise ModelLoadError(f"{path} has no {block_key} key")
        self.block_key = block_key
        self.block_count = int(self.metadata[block_key].value)

    def read(self, tensor: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes (uint8, GGUF byte shape)."""
        buf = bytearray(tensor.n_bytes)
        with open(self.path, "rb") as f:
            f.seek(tensor.offset)
            if f.readinto(buf) != tensor.n_bytes:
                raise ModelLoadError(f"{self.path} is truncated inside tensor {tensor.name}")
        return np.frombuffer(buf, dtype=np.uint8).reshape(tensor.byte_shape)

    def dequantized(self, tensor: GGUFTensorInfo) -> np.ndarray:
        try:
            data = gguf.quants.dequantize(self.read(tensor), tensor.qtype)
        except NotImplementedError as e:
            raise ExportError(
                f"tensor {tensor.name} is {tensor.qtype.name}, which the gguf package cannot dequantize"
            ) from e
        return np.asarray(data, dtype=np.float32).reshape(tensor.shape)


# --- checks --------------------------------------------------------------------------------------
def _check_request(
    source: _Source, kept: list[int], folds: dict[int, list[torch.Tensor]], llama_cpp_version: str | None
) -> None:
    n = source.block_count
    if not kept:
        raise ConfigError("no blocks would be kept", hint="keep at least one block")
    if sorted(set(kept)) != list(kept):
        raise ConfigError(f"the blocks to keep must be increasing and unique, got {kept}")
    if kept[0] < 0 or kept[-1] >= n:
        raise ConfigError(f"blocks {kept} are outside blocks 0..{n - 1} of {source.path.name}")
    stray = sorted(set(folds) - set(kept))
    if stray:
        raise ConfigError(
            f"maps are folded into blocks {stray}, which are removed", hint="fold into kept blocks"
        )
    layer_types = _source_layer_types(source)
    adapter = gguf_adapter(source.arch)
    if layer_types is not None and adapter is not None:
        problem = adapter.gguf_cut_problem([layer_types[i] for i in kept], llama_cpp_version)
        if problem:
            raise ExportError(f"llama.cpp cannot represent this cut: {problem}", hint="choose another cut")


def _source_layer_types(source: _Source) -> list[str] | None:
    """The sliding/global pattern llama.cpp runs the source with: its per-layer array, or the one
    derived from the layer index (None: the family's loader has no sliding layers)."""
    adapter = gguf_adapter(source.arch)
    if adapter is None or not adapter.llama_cpp_swa_period:
        return None
    stored = source.metadata.get(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=source.arch))
    if stored is not None and isinstance(stored.value, list) and len(stored.value) == source.block_count:
        return [_SLIDING if v else _FULL for v in stored.value]
    return adapter.llama_cpp_layer_types(source.block_count)


# --- the fold ------------------------------------------------------------------------------------
# A fitted map folded into ffn_down is a new matrix, not a small edit of a quantized one: on
# SmolLM2-135M (Q4_1, cut [12, 20)) its largest weight is 22.8 against a spread (std) of 0.52, and
# Q4_1's 16 levels per block of 32 cannot hold both. That one tensor requantized alone to Q4_1 gives
# KL 0.165 (top-1 0.76) to the pruned PyTorch model, 38x the whole Q4_1 source file's own error
# (0.0043); Q5_K 0.046, Q6_K 0.010, Q8_0 0.0010 (top-1 0.98). So it is written in Q8_0 when the
# source's type has fewer bits (+0.37 MiB for that model), and in the source's type otherwise.
_FOLDED_DENSE_MIN = gguf.GGMLQuantizationType.Q8_0


def folded_type(source_type: gguf.GGMLQuantizationType, *, dense: bool) -> gguf.GGMLQuantizationType:
    """The type a folded tensor is written in: a dense fold (``ffn_down``) at no fewer bits than
    Q8_0, a norm weight (Gemma) in its source's type."""
    if dense and bits_per_weight(source_type) < 8:
        return _FOLDED_DENSE_MIN
    return source_type


def _as_matrix(transform: torch.Tensor) -> np.ndarray:
    t = transform.detach().to("cpu", torch.float64).numpy()
    return np.diag(t) if t.ndim == 1 else t


def _as_scale(transform: torch.Tensor) -> np.ndarray:
    t = transform.detach().to("cpu", torch.float64).numpy()
    if t.ndim == 2:
        if np.abs(t - np.diag(np.diagonal(t))).max() > 0:
            raise ConfigError("this architecture has a norm after the MLP; only a diagonal map folds exactly")
        t = np.diagonal(t)
    return t


def _folded(
    source: _Source,
    block: int,
    transforms: list[torch.Tensor],
    dense_fold: bool,
    norm_weight_offset: float,
) -> dict[str, np.ndarray]:
    """Source tensor name -> its folded values (float64, numpy orientation)."""
    if dense_fold:
        weight_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_DOWN].format(bid=block) + ".weight"
        tensor = _require(source, weight_name)
        w = source.dequantized(tensor).astype(np.float64)  # [d, d_ff]: transformers' W_down
        bias_tensor = source.by_name.get(weight_name.removesuffix(".weight") + ".bias")
        b = None if bias_tensor is None else source.dequantized(bias_tensor).astype(np.float64)
        for transform in transforms:
            t = _as_matrix(transform)
            if t.shape == w.shape[::-1] and w.shape[0] != w.shape[1]:  # a map of the hidden activations
                w, b = t.T.copy(), None if b is None else np.zeros_like(b)
                continue
            if t.shape != (w.shape[0], w.shape[0]):
                raise ConfigError(f"map of shape {t.shape} does not fit {weight_name} of shape {w.shape}")
            w = t.T @ w
            if b is not None:
                b = b @ t
        out = {weight_name: w}
        if b is not None:
            out[bias_tensor.name] = b
        return out
    norm_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_POST_NORM].format(bid=block) + ".weight"
    tensor = _require(source, norm_name)
    w = source.dequantized(tensor).astype(np.float64)
    for transform in transforms:
        s = _as_scale(transform)
        if s.shape != w.shape:
            raise ConfigError(f"scale of shape {s.shape} does not fit {norm_name} of shape {w.shape}")
        w = (norm_weight_offset + w) * s - norm_weight_offset
    return {norm_name: w}


def _replaced_attention_output(
    source: _Source, block: int, transforms: list[torch.Tensor]
) -> tuple[str, np.ndarray]:
    """``attn_output``'s name and its new values (float64, [d, d_attn]: transformers' ``W_o``)."""
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_OUT].format(bid=block) + ".weight"
    w = source.dequantized(_require(source, name)).astype(np.float64)
    if source.by_name.get(name.removesuffix(".weight") + ".bias") is not None:
        raise ExportError(f"{source.path.name}: replacing {name} with a bias beside it is not supported")
    for transform in transforms:
        t = _as_matrix(transform)
        if t.shape != w.shape[::-1]:
            raise ConfigError(f"map of shape {t.shape} does not replace {name} of shape {w.shape}")
        w = t.T.copy()
    return name, w


def _require(source: _Source, name: str) -> Any:
    if name not in source.by_name:
        raise ExportError(f"{source.path.name} has no tensor {name!r} to fold the map into")
    return source.by_name[name]


def _relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    norm = float(np.linalg.norm(exact))
    return float(np.linalg.norm(approx.astype(np.float64) - exact)) / norm if norm else 0.0


# --- metadata ------------------------------------------------------------------------------------
def _pruned_metadata(source: _Source, kept: list[int]) -> gguf_metadata.Metadata:
    meta: gguf_metadata.Metadata = {}
    for key, kv in source.metadata.items():
        if key == source.block_key:
            kv = gguf_metadata.KV(len(kept), kv.vtype, kv.sub_type)
        elif (
            kv.vtype == GGUFValueType.ARRAY
            and key.startswith(source.arch + ".")
            and isinstance(kv.value, list)
            and len(kv.value) == source.block_count
        ):
            kv = gguf_metadata.KV([kv.value[i] for i in kept], kv.vtype, kv.sub_type)
        meta[key] = kv
    adapter, layer_types = gguf_adapter(source.arch), _source_layer_types(source)
    if adapter is not None and layer_types is not None:
        pattern = adapter.gguf_swa_pattern([layer_types[i] for i in kept])
        if pattern is not None:
            key = Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=source.arch)
            meta[key] = gguf_metadata.swa_pattern_kv(pattern)
    return meta


# --- writing -------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass(frozen=True, kw_only=True)
class TensorWrite:
    """How one output tensor was written: ``copied`` byte for byte, or ``requantized`` (a folded one)."""

    source: str  # its name in the source file
    action: str  # "copied" or "requantized"
    source_type: str | None = None  # requantized only, as are quantizer and relative_error
    type: str
    quantizer: str | None = None
    relative_error: float | None = None

    def to_json(self) -> JsonObject:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class BlockCount:
    before: int
    after: int


@dataclass(frozen=True)
class FileSizes:
    source: int
    output: int


@dataclass(frozen=True)
class GGUFPrune:
    """What ``write_pruned_gguf`` did; ``to_json()`` is ``checks/gguf_native.json``."""

    source: str
    output: str
    arch: str
    block_count: BlockCount
    kept_blocks: list[int]
    copied: int  # tensors
    requantized: int
    type_changed: dict[str, str]  # output tensor -> the type it was written in, where not its source's
    dropped: int
    folded: dict[str, TensorWrite]  # the requantized tensors of ``tensors``
    tensors: dict[str, TensorWrite]  # every output tensor, by its output name
    size_bytes: FileSizes
    seconds: float

    def to_json(self) -> JsonObject:
        data = asdict(self)
        data["folded"] = {name: t.to_json() for name, t in self.folded.items()}
        data["tensors"] = {name: t.to_json() for name, t in self.tensors.items()}
        return data

    @classmethod
    def from_json(cls, data: JsonObject) -> GGUFPrune:
        return from_jsonable(cls, data)


def write_pruned_gguf(
    source_gguf: str | Path,
    out_file: str | Path,
    blocks: list[int],
    folds: dict[int, list[torch.Tensor]],
    *,
    dense_fold: bool,
    attention_folds: dict[int, list[torch.Tensor]] | None = None,
    norm_weight_offset: float = 0.0,
    llama_cpp_version: str | None = None,
) -> GGUFPrune:
    """Write ``source_gguf`` with only its ``blocks`` (source indices, in order) to ``out_file``.

    ``folds`` maps an original block index to the fitted maps folded into it, in order (d×d, d_ff×d
    for a map of the MLP's hidden activations, or a length-d diagonal); ``attention_folds`` the maps
    of the attention heads' output that replace a repaired block's ``attn_output`` (``W_o ← Wᵀ``).
    ``dense_fold``: fold into ``ffn_down`` (True) or scale ``post_ffw_norm``
    (False, Gemma). ``norm_weight_offset`` is what the runtime adds to the *stored* norm weight:
    0 for llama.cpp, whose Gemma files store ``1 + w`` already, so the stored weight is scaled as is.
    ``llama_cpp_version``: the llama-cpp-python the file must run in (default: the installed one); a
    cut whose layer pattern it cannot read is refused.

    Returns what was done: counts, and per output tensor its source name, type and action
    (``copied``, ``requantized``, or ``requantized`` with a different ``type`` than ``source_type``:
    a folded ``ffn_down`` of a type below 8 bits is written in Q8_0, listed in ``type_changed``).
    """
    start = time.perf_counter()
    source = _Source(Path(source_gguf))
    kept = [int(i) for i in blocks]
    folds = {int(i): list(ts) for i, ts in folds.items() if len(ts)}
    attention_folds = {int(i): list(ts) for i, ts in (attention_folds or {}).items() if len(ts)}
    _check_request(source, kept, folds | attention_folds, llama_cpp_version or installed_version())
    new_index = {old: new for new, old in enumerate(kept)}

    rewritten: dict[str, tuple[Quantized, float]] = {}  # name -> written data, its relative error
    for block, transforms in sorted(folds.items()):
        for name, exact in _folded(source, block, transforms, dense_fold, norm_weight_offset).items():
            tensor = source.by_name[name]
            qtype = folded_type(tensor.qtype, dense=dense_fold and name.endswith(".weight"))
            q = quantize_like(exact.astype(np.float32), qtype, name=name)
            back = np.asarray(gguf.quants.dequantize(q.data, q.qtype), dtype=np.float32).reshape(tensor.shape)
            rewritten[name] = (q, _relative_error(back, exact))
    for block, transforms in sorted(attention_folds.items()):
        name, exact = _replaced_attention_output(source, block, transforms)
        tensor = source.by_name[name]
        q = quantize_like(exact.astype(np.float32), folded_type(tensor.qtype, dense=True), name=name)
        back = np.asarray(gguf.quants.dequantize(q.data, q.qtype), dtype=np.float32).reshape(tensor.shape)
        rewritten[name] = (q, _relative_error(back, exact))

    plan: list[tuple[str, GGUFTensorInfo]] = []
    dropped = 0
    for tensor in source.tensors:
        block = tensor.block
        if block is None:
            plan.append((tensor.name, tensor))
        elif block in new_index:
            plan.append((_renamed(tensor, new_index[block]), tensor))
        else:
            dropped += 1

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    per_tensor: dict[str, TensorWrite] = {}
    try:
        writer = GGUFWriter(None, source.arch)
        try:
            meta = _pruned_metadata(source, kept)
            alignment = meta.pop(Keys.General.ALIGNMENT, None)
            if alignment is not None:
                writer.add_custom_alignment(int(alignment.value))
            gguf_metadata.write_metadata(writer, meta)
            for new_name, tensor in plan:
                if tensor.name in rewritten:
                    q, _ = rewritten[tensor.name]
                    writer.add_tensor_info(new_name, q.data.shape, np.dtype(np.uint8), q.data.nbytes, q.qtype)
                else:
                    writer.add_tensor_info(
                        new_name, tensor.byte_shape, np.dtype(np.uint8), tensor.n_bytes, tensor.qtype
                    )
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for new_name, tensor in progress(plan, desc="Writing tensors", total=len(plan)):
                if tensor.name in rewritten:
                    q, rel_error = rewritten[tensor.name]
                    writer.write_tensor_data(q.data)
                    per_tensor[new_name] = TensorWrite(
                        source=tensor.name,
                        action="requantized",
                        source_type=tensor.qtype.name,
                        type=q.qtype.name,
                        quantizer=q.quantizer,
                        relative_error=rel_error,
                    )
                else:
                    writer.write_tensor_data(source.read(tensor))
                    per_tensor[new_name] = TensorWrite(
                        source=tensor.name, action="copied", type=tensor.qtype.name
                    )
        finally:
            writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

    requantized = {n: t for n, t in per_tensor.items() if t.action == "requantized"}
    changed_type = {n: t.type for n, t in requantized.items() if t.type != t.source_type}
    record = GGUFPrune(
        source=str(source.path),
        output=str(out),
        arch=source.arch,
        block_count=BlockCount(before=source.block_count, after=len(kept)),
        kept_blocks=kept,
        copied=sum(1 for t in per_tensor.values() if t.action == "copied"),
        requantized=len(requantized),
        type_changed=changed_type,
        dropped=dropped,
        folded=requantized,
        tensors=per_tensor,
        size_bytes=FileSizes(source=source.path.stat().st_size, output=out.stat().st_size),
        seconds=time.perf_counter() - start,
    )
    log.info(
        "pruned GGUF %s: %d -> %d blocks, %d tensors copied, %d requantized%s (%.1f s)",
        out.name,
        source.block_count,
        len(kept),
        record.copied,
        record.requantized,
        "".join(
            f"; {', '.join(names)} written as {qtype}" for qtype, names in _by_value(changed_type).items()
        ),
        record.seconds,
    )
    return record


def _by_value(mapping: dict[str, str]) -> dict[str, list[str]]:
    """``{key: value}`` as ``{value: [keys]}``, in first-seen order."""
    grouped: dict[str, list[str]] = {}
    for key, value in mapping.items():
        grouped.setdefault(value, []).append(key)
    return grouped
