"""HF checkpoint -> GGUF that llama.cpp loads: ``rmexport export gguf CKPT --out FILE --type T``.

Tensor names come from the ``gguf`` package's ``TensorNameMap`` for the adapter's GGUF
architecture; a tensor it cannot map is an error, never skipped. What llama.cpp expects
differently from transformers is done here and nowhere else:

- where the adapter says so (``gguf_permute_qk``: Llama, Mistral): llama.cpp rotates adjacent
  pairs, transformers rotates halves, so ``q_proj``/``k_proj`` rows are permuted per head (the same
  permutation for their biases);
- Gemma: RMSNorm weights are stored with the ``+1`` offset baked in (adapter.norm_weight_offset);
- tied embeddings: no ``output.weight``; llama.cpp reuses ``token_embd``;
- Llama 3.1+ rope scaling travels as the ``rope_freqs`` tensor.

f32/f16/bf16/q8_0 are written by gguf-py; K-quants (q4_k_m) are made from an f32 file by
llama.cpp's own quantizer. A model whose source was a GGUF keeps that file's metadata
(general.*, tokenizer, chat template); only what pruning changed is rewritten.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from safetensors import safe_open

from rmexport import llamacpp as llama_cpp_tools
from rmexport.arch import ArchAdapter, adapter_for
from rmexport.atomic import staged_file
from rmexport.errors import ConfigError, ExportError
from rmexport.fileio import open_gguf, read_provenance
from rmexport.llamacpp import QUANTIZER_TYPES
from rmexport.log import get_logger, progress
from rmexport.records import JsonObject

from . import gguf_metadata, gguf_tokenizer, imatrix

__all__ = [
    "GGUF_TYPES",
    "GGUFSummary",
    "describe_gguf",
    "export_gguf",
    "quantize_gguf",
    "requantize_gguf",
    "summarize_gguf",
]

log = get_logger(__name__)

# An importance matrix file, calibration text to compute one from, or none.
ImatrixSource = Path | str | imatrix.CalibrationText | None


# llama.cpp refuses these without an importance matrix (their main tensors are IQ1/IQ2/IQ3_XXS, or
# Q2_K in a Q2_K_S file).
_NEEDS_IMATRIX = frozenset("iq1_s iq1_m iq2_xxs iq2_xs iq2_s iq2_m iq3_xxs q2_k_s".split())
# Types whose quantizers ignore an importance matrix.
_IGNORES_IMATRIX = frozenset("f32 f16 bf16 q8_0 tq1_0 tq2_0 mxfp4_moe".split())
# llama.h's value for a file type the installed gguf-py has no name for yet.
_FILE_TYPES_NOT_IN_GGUF_PY = {"q2_0": 41}


@dataclass(frozen=True)
class GGUFType:
    name: str
    file_type: int  # llama_ftype, as general.file_type records it
    tensor_type: GGMLQuantizationType | None  # written by us (2-D weights; 1-D stay F32); None: by llama.cpp

    @property
    def by_llama_cpp(self) -> bool:
        """Written as f32, then quantized by llama.cpp's own quantizer (its per-tensor type mixture)."""
        return self.tensor_type is None

    @property
    def bits(self) -> int:
        """Nominal bits per weight of the type's main tensors, from its name (q4_k_m: 4, bf16: 16)."""
        return int(re.search(r"\d+", self.name).group())

    @property
    def uses_imatrix(self) -> bool:
        return self.name not in _IGNORES_IMATRIX

    @property
    def needs_imatrix(self) -> bool:
        return self.name in _NEEDS_IMATRIX

    @property
    def imatrix_by_default(self) -> bool:
        """Whether ``--imatrix`` defaults to ``auto``: for types at or below 4 bits that use one."""
        return self.uses_imatrix and self.bits <= 4


def _file_type(name: str) -> int:
    if name in _FILE_TYPES_NOT_IN_GGUF_PY:
        return _FILE_TYPES_NOT_IN_GGUF_PY[name]
    return int(LlamaFileType["ALL_F32" if name == "f32" else f"MOSTLY_{name.upper()}"])


# f32/f16/bf16/q8_0 are written by gguf-py directly; every other type llama.cpp's quantizer makes is
# quantized by it, from an f32 file.
_WRITTEN_BY_US = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
}
GGUF_TYPES: dict[str, GGUFType] = {
    name: GGUFType(name, _file_type(name), _WRITTEN_BY_US.get(name)) for name in QUANTIZER_TYPES
}

_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def _gguf_type(name: str) -> GGUFType:
    try:
        return GGUF_TYPES[name]
    except KeyError:
        raise ConfigError(
            f"unknown GGUF type {name!r}", hint="choose one of " + ", ".join(GGUF_TYPES)
        ) from None


def _model_arch(adapter: ArchAdapter) -> gguf.MODEL_ARCH:
    for arch, name in gguf.MODEL_ARCH_NAMES.items():
        if name == adapter.gguf_arch:
            return arch
    raise ExportError(f"the installed gguf package does not know architecture {adapter.gguf_arch!r}")


def _safetensors_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint / n for n in names]
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise ExportError(
            f"no *.safetensors weights in {checkpoint}", hint="save the model with save_pretrained"
        )
    return files


def _hf_tensors(checkpoint: Path) -> Iterator[tuple[str, Any]]:
    for path in _safetensors_files(checkpoint):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, (path, name)


def _load(ref: tuple[Path, str]) -> np.ndarray:
    path, name = ref
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).to(torch.float32).numpy()


def _permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q/k from transformers' half-split rotary layout to llama.cpp's pairwise one."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class _Planned:
    gguf_name: str
    kind: gguf.MODEL_TENSOR
    hf_name: str
    ref: Any
    block: int


def _plan(checkpoint: Path, config: Any, adapter: ArchAdapter) -> list[_Planned]:
    name_map = gguf.get_tensor_name_map(_model_arch(adapter), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    planned = []
    for hf_name, ref in _hf_tensors(checkpoint):
        if hf_name.endswith(_SKIPPED_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ExportError(f"can not map tensor {hf_name!r} to a {adapter.gguf_arch} GGUF tensor")
        kind, gguf_name = found
        parts = gguf_name.split(".")
        block = (
            int(parts[1]) if parts[0] == "blk" else (-1 if kind == gguf.MODEL_TENSOR.TOKEN_EMBD else 1 << 30)
        )
        planned.append(_Planned(gguf_name, kind, hf_name, ref, block))
    planned.sort(key=lambda p: (p.block, p.gguf_name))
    names = [p.gguf_name for p in planned]
    duplicates = [n for n, c in Counter(names).items() if c > 1]
    if duplicates:
        raise ExportError(f"several checkpoint tensors map to {duplicates[0]!r}")
    return planned


def _prepare(p: _Planned, config: Any, adapter: ArchAdapter) -> np.ndarray:
    data = _load(p.ref)
    if adapter.norm_weight_offset and p.hf_name.endswith("norm.weight"):
        data = data + np.float32(adapter.norm_weight_offset)
    if adapter.gguf_permute_qk:
        if p.kind == gguf.MODEL_TENSOR.ATTN_Q:
            data = _permute_rope_rows(data, config.num_attention_heads)
        elif p.kind == gguf.MODEL_TENSOR.ATTN_K:
            data = _permute_rope_rows(
                data, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            )
    return np.ascontiguousarray(data, dtype=np.float32)


def _encoding(shape: tuple[int, ...], gtype: GGUFType) -> tuple[Any, GGMLQuantizationType | None]:
    """(numpy dtype, raw GGML type or None) a tensor of ``shape`` is written in: 1-D stays F32;
    Q8_0 rows not divisible by the block size fall back to F16."""
    if len(shape) < 2 or gtype.tensor_type == GGMLQuantizationType.F32:
        return np.float32, None
    if gtype.tensor_type == GGMLQuantizationType.F16:
        return np.float16, None
    block = gguf.GGML_QUANT_SIZES[gtype.tensor_type][0]
    if shape[-1] % block:
        log.warning("row width %d is not a multiple of %d: tensor kept as F16", shape[-1], block)
        return np.float16, None
    return np.uint8, gtype.tensor_type


def _encode(data: np.ndarray, gtype: GGUFType) -> np.ndarray:
    dtype, raw_dtype = _encoding(data.shape, gtype)
    return gguf.quants.quantize(data, raw_dtype) if raw_dtype is not None else data.astype(dtype)


def _shape(ref: tuple[Path, str]) -> tuple[int, ...]:
    path, name = ref
    with safe_open(str(path), framework="pt") as f:
        return tuple(f.get_slice(name).get_shape())


def _metadata(checkpoint: Path, config: Any, adapter: ArchAdapter) -> gguf_metadata.Metadata:
    name = getattr(config, "_name_or_path", "") or checkpoint.name
    ours = gguf_metadata.model_metadata(config, adapter, name=Path(name).name or checkpoint.name)
    source = read_provenance(checkpoint).get("gguf_file")
    if source and Path(source).is_file():
        log.info("carrying metadata over from the source GGUF %s", Path(source).name)
        return gguf_metadata.carry_over(ours, gguf_metadata.read_metadata(source), adapter.gguf_arch)
    if source:
        log.warning("source GGUF %s is gone; writing metadata from the checkpoint alone", source)
    ours.update(gguf_tokenizer.tokenizer_metadata(checkpoint, config.vocab_size))
    return ours


def _write(checkpoint: Path, config: Any, adapter: ArchAdapter, path: Path, gtype: GGUFType) -> None:
    """Header and tensor infos first (from shard headers), then one tensor at a time: the model is
    never whole in memory."""
    meta = _metadata(checkpoint, config, adapter)
    planned = _plan(checkpoint, config, adapter)
    embed = next((p for p in planned if p.kind == gguf.MODEL_TENSOR.TOKEN_EMBD), None)
    tokens = meta.get(gguf.Keys.Tokenizer.LIST)
    if embed is not None and tokens is not None:
        rows = _shape(embed.ref)[0]
        if len(tokens.value) != rows:
            raise ExportError(f"tokenizer has {len(tokens.value)} tokens but the embedding has {rows} rows")
    writer = GGUFWriter(path, adapter.gguf_arch)
    try:
        gguf_metadata.write_metadata(writer, meta)
        writer.add_file_type(LlamaFileType(gtype.file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        producers: list[Any] = []
        rope_factors = gguf_metadata.llama3_rope_factors(config)
        if rope_factors is not None:
            factors = np.array(rope_factors, np.float32)
            writer.add_tensor_info(
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                factors.shape,
                factors.dtype,
                factors.nbytes,
            )
            producers.append(lambda: factors)
        for p in planned:
            shape = _shape(p.ref)
            dtype, raw_dtype = _encoding(shape, gtype)
            if raw_dtype is not None:
                shape = gguf.quant_shape_to_byte_shape(shape, raw_dtype)
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(p.gguf_name, shape, np.dtype(dtype), nbytes, raw_dtype=raw_dtype)
            producers.append(lambda p=p: _encode(_prepare(p, config, adapter), gtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for produce in progress(producers, desc="(1/2) Converting tensors", total=len(producers)):
            writer.write_tensor_data(produce())
    finally:
        writer.close()


def _quantize(
    f32_file: Path, target: Path, gtype: GGUFType, importance: imatrix.Importance | None, name: str
) -> None:
    """llama.cpp's quantizer, given the importance matrix and its provenance keys as llama-quantize
    gives them (the matrix's file ``name``, not where it was staged, so the bytes do not vary)."""
    metadata: dict[str, int | str] = {}
    if importance is not None:
        imatrix.check_matches(importance, f32_file)
        metadata["quantize.imatrix.file"] = name
        if importance.datasets:
            metadata["quantize.imatrix.dataset"] = importance.datasets[0]
        metadata["quantize.imatrix.entries_count"] = len(importance.entries)
        if importance.chunk_count > 0:
            metadata["quantize.imatrix.chunks_count"] = importance.chunk_count
    llama_cpp_tools.quantize(
        f32_file,
        target,
        gtype.name,
        imatrix=importance.entries if importance is not None else None,
        metadata=metadata,
    )


def _quantize_staged(
    f32_file: Path,
    tmp: Path,
    staged_matrix: Path | None,
    out: Path,
    gtype: GGUFType,
    source: imatrix.Importance | ImatrixSource,
) -> None:
    """Quantize ``f32_file`` into ``tmp`` (staged for ``out``); a matrix computed from calibration
    text goes to ``staged_matrix`` (staged for ``imatrix_path_for(out)``)."""
    importance = source if isinstance(source, imatrix.Importance) else None
    name = None if importance is None else importance.path.name
    if isinstance(source, imatrix.CalibrationText):
        imatrix.compute_imatrix(f32_file, source, staged_matrix)
        importance, name = imatrix.read_imatrix(staged_matrix), imatrix.imatrix_path_for(out).name
    _quantize(f32_file, tmp, gtype, importance, name)


def _staged_outputs(
    stack: contextlib.ExitStack, out: Path, source: ImatrixSource
) -> tuple[Path, Path | None]:
    """Staging paths for ``out`` and, when one is computed, its matrix. The matrix's is entered first,
    so it is placed after the GGUF and removed with it when anything fails."""
    matrix = None
    if isinstance(source, imatrix.CalibrationText):
        matrix = stack.enter_context(staged_file(imatrix.imatrix_path_for(out)))
    return stack.enter_context(staged_file(out)), matrix


def requantize_gguf(
    source: str | Path, out_file: str | Path, type: str, *, imatrix_source: ImatrixSource = None
) -> Path:
    """A GGUF file (any type, e.g. a quantized source model) as ``type``, by llama.cpp's quantizer from
    its weights dequantized to f32: the other route to a ladder of types when there is no float
    checkpoint. ``imatrix_source`` as for ``export_gguf``."""
    gtype = _gguf_type(type)
    imatrix_source = _usable_imatrix(gtype, imatrix_source)
    given = imatrix.read_imatrix(imatrix_source) if isinstance(imatrix_source, (str, Path)) else None
    out = Path(out_file)
    with contextlib.ExitStack() as stack:
        tmp, staged_matrix = _staged_outputs(stack, out, imatrix_source)
        f32_tmp = tmp.with_name(tmp.name + ".f32")
        llama_cpp_tools.quantize(source, f32_tmp, "f32", allow_requantize=True)
        _quantize_staged(f32_tmp, tmp, staged_matrix, out, gtype, given or imatrix_source)
    log.info(
        "wrote %s (%s from %s, %.1f MiB)", out, gtype.name, Path(source).name, out.stat().st_size / 2**20
    )
    return out


def quantize_gguf(
    f32_file: str | Path, out_file: str | Path, type: str, *, imatrix_file: str | Path | None = None
) -> Path:
    """An f32 GGUF as ``type`` by llama.cpp's quantizer, with the importance matrix in ``imatrix_file``
    (checked against the model first): many types from one f32 file, without writing it again."""
    gtype = _gguf_type(type)
    matrix = _usable_imatrix(gtype, imatrix_file)
    importance = imatrix.read_imatrix(matrix) if matrix is not None else None
    name = None if importance is None else importance.path.name
    out = Path(out_file)
    with staged_file(out) as tmp:
        _quantize(Path(f32_file), tmp, gtype, importance, name)
    return out


def _usable_imatrix(gtype: GGUFType, source: ImatrixSource) -> ImatrixSource:
    if source is not None and not gtype.uses_imatrix:
        log.warning("%s does not use an importance matrix: the one given is not used", gtype.name)
        return None
    if source is None and gtype.needs_imatrix:
        raise ConfigError(
            f"llama.cpp quantizes {gtype.name} only with an importance matrix",
            hint="use --imatrix auto or --imatrix FILE",
        )
    return source


def export_gguf(
    checkpoint: str | Path, out_file: str | Path, type: str = "f16", *, imatrix_source: ImatrixSource = None
) -> Path:
    """Write ``checkpoint`` (an HF directory) as a GGUF of ``type`` to ``out_file``; return its path.

    ``imatrix_source``: an importance matrix file to quantize with, or calibration text to compute
    one from (on the f32 file, with ``llama-imatrix``; written beside ``out_file`` as
    ``<stem>.imatrix.gguf``), or None. Types that ignore a matrix warn and go without."""
    from transformers import AutoConfig

    gtype = _gguf_type(type)
    imatrix_source = _usable_imatrix(gtype, imatrix_source)
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise ConfigError(f"{checkpoint} is not an HF checkpoint directory (no config.json)")
    given = imatrix.read_imatrix(imatrix_source) if isinstance(imatrix_source, (str, Path)) else None
    config = AutoConfig.from_pretrained(checkpoint)
    adapter = adapter_for(config)
    problem = gguf_metadata.runtime_problem(config, adapter)
    if problem:
        raise ExportError(
            f"llama.cpp cannot represent this model: {problem}", hint="choose another cut, or export ONNX"
        )
    out = Path(out_file)
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give the GGUF file to write", hint=f"e.g. {out}/model.gguf")
    # Staged beside ``out`` as .rmexport-staging-<pid>-<name>.*, renamed into place when complete.
    with contextlib.ExitStack() as stack:
        tmp, staged_matrix = _staged_outputs(stack, out, imatrix_source)
        if gtype.by_llama_cpp:
            f32_tmp = tmp.with_name(tmp.name + ".f32")
            _write(checkpoint, config, adapter, f32_tmp, GGUF_TYPES["f32"])
            _quantize_staged(f32_tmp, tmp, staged_matrix, out, gtype, given or imatrix_source)
        else:
            _write(checkpoint, config, adapter, tmp, gtype)
    log.info("wrote %s (%s, %.1f MiB)", out, gtype.name, out.stat().st_size / 2**20)
    return out


@dataclass(frozen=True)
class GGUFSummary:
    """A GGUF file at a glance: size, architecture, block count and tensor types (where K-quant
    fallbacks show)."""

    file: str
    size_bytes: int
    architecture: str
    block_count: int | None
    tensor_types: dict[str, int]  # type name -> tensors of that type
    tensors: int

    def to_json(self) -> JsonObject:
        return asdict(self)


def summarize_gguf(path: str | Path) -> GGUFSummary:
    header = open_gguf(path)
    types = Counter(t.qtype.name for t in header.tensors)
    arch = header.metadata[gguf.Keys.General.ARCHITECTURE]
    block_count = header.metadata.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    return GGUFSummary(
        file=str(path),
        size_bytes=header.size,
        architecture=arch,
        block_count=None if block_count is None else int(block_count),
        tensor_types=dict(sorted(types.items())),
        tensors=len(header.tensors),
    )


def describe_gguf(path: str | Path) -> JsonObject:
    """``summarize_gguf`` as JSON: the form validation/gguf_bench.py and validation/frontier.py read
    (until they take the record itself)."""
    return summarize_gguf(path).to_json()
