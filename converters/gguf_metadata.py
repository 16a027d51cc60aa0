"""GGUF key/values for a model: llama.cpp's hyperparameter keys from an HF config, and carry-over.

Keys come from ``gguf.Keys`` (the package's own table). Each value records its GGUF type so
that metadata read from a source GGUF can be written back byte for byte.

What llama.cpp assumes differently from transformers is a fact of the family and lives in its
adapter (``rmexport/arch``): the refusals (``gguf_cut_problem``, ``llama_cpp_problem``: Gemma's
query scale, Qwen's missing sliding window, ...) and which keys exist (``gguf_softcapping``,
``gguf_sliding_window``, ``gguf_rope_base_swa``). This module turns a config into those keys.
The sliding pattern is written as the per-layer array ``{arch}.attention.sliding_window_pattern``
(``adapter.gguf_swa_pattern``), which llama.cpp's Gemma loaders read (``load_swa_pattern``), so a
pruned Gemma runs with the pattern of the blocks it kept. Only a llama.cpp too old to read the
array, which would derive the pattern from the layer index instead, gets a refusal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gguf
from gguf import GGUFValueType, Keys

from rmexport.arch import ArchAdapter
from rmexport.errors import ExportError
from rmexport.fileio import GGUFHeader, open_gguf
from rmexport.llamacpp import installed_version
from rmexport.log import get_logger
from rmexport.records import JsonObject

__all__ = [
    "KV",
    "Metadata",
    "carry_over",
    "header_metadata",
    "llama3_rope_factors",
    "model_metadata",
    "read_metadata",
    "runtime_problem",
    "swa_pattern_kv",
    "write_metadata",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class KV:
    """One GGUF key's value and its GGUF type (``sub_type`` for arrays)."""

    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


Metadata = dict[str, KV]

_SLIDING = "sliding_attention"


def _u32(v: int) -> KV:
    return KV(int(v), GGUFValueType.UINT32)


def _f32(v: float) -> KV:
    return KV(float(v), GGUFValueType.FLOAT32)


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _layer_types(config: Any) -> list[str]:
    return list(getattr(config, "layer_types", None) or [])


def runtime_problem(config: Any, adapter: ArchAdapter, llama_cpp_version: str | None = None) -> str | None:
    """Why llama.cpp (llama-cpp-python ``llama_cpp_version``, default: the installed one) would
    compute this config differently from transformers, or None."""
    version = llama_cpp_version or installed_version()
    problem = adapter.gguf_cut_problem(_layer_types(config), version) or adapter.llama_cpp_problem(config)
    if problem:
        return problem
    rope = _rope_scaling(config)
    if rope and rope.get("rope_type", rope.get("type")) not in (None, "default", "linear", "yarn", "llama3"):
        return f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported by this writer"
    return None


def _rope_scaling(config: Any) -> JsonObject | None:
    rope = getattr(config, "rope_scaling", None)
    return dict(rope) if rope else None


def llama3_rope_factors(config: Any) -> list[float] | None:
    """Per-frequency divisors llama.cpp reads from ``rope_freqs.weight`` for Llama 3.1+ scaling."""
    rope = _rope_scaling(config)
    if not rope or rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    dim = int(getattr(config, "partial_rotary_factor", 1.0) * _head_dim(config))
    base = float(config.rope_theta)
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = original / low, original / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return factors


def model_metadata(config: Any, adapter: ArchAdapter, name: str) -> Metadata:
    """The architecture keys llama.cpp reads for this family, from the (pruned) HF config."""
    arch = adapter.gguf_arch
    head_dim = _head_dim(config)
    meta: Metadata = {
        Keys.General.TYPE: KV("model", GGUFValueType.STRING),
        Keys.General.NAME: KV(name, GGUFValueType.STRING),
        Keys.LLM.CONTEXT_LENGTH.format(arch=arch): _u32(config.max_position_embeddings),
        Keys.LLM.EMBEDDING_LENGTH.format(arch=arch): _u32(config.hidden_size),
        Keys.LLM.BLOCK_COUNT.format(arch=arch): _u32(config.num_hidden_layers),
        Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch): _u32(config.intermediate_size),
        Keys.Attention.HEAD_COUNT.format(arch=arch): _u32(config.num_attention_heads),
        Keys.Attention.HEAD_COUNT_KV.format(arch=arch): _u32(
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        ),
        Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch): _f32(config.rms_norm_eps),
        Keys.Attention.KEY_LENGTH.format(arch=arch): _u32(head_dim),
        Keys.Attention.VALUE_LENGTH.format(arch=arch): _u32(head_dim),
        Keys.Rope.DIMENSION_COUNT.format(arch=arch): _u32(head_dim),
        Keys.Rope.FREQ_BASE.format(arch=arch): _f32(getattr(config, "rope_theta", 10000.0)),
        Keys.LLM.VOCAB_SIZE.format(arch=arch): _u32(config.vocab_size),
    }
    meta.update(_rope_scaling_metadata(config, arch))
    meta.update(_family_metadata(config, adapter))
    if adapter.llama_cpp_full_attention and getattr(config, "sliding_window", None):
        log.warning(
            "llama.cpp runs %s with full attention; sliding_window=%s only matters past that length",
            adapter.family,
            config.sliding_window,
        )
    return meta


def _rope_scaling_metadata(config: Any, arch: str) -> Metadata:
    rope = _rope_scaling(config)
    kind = rope.get("rope_type", rope.get("type")) if rope else None
    if kind in ("linear", "yarn"):
        meta = {
            Keys.Rope.SCALING_TYPE.format(arch=arch): KV(kind, GGUFValueType.STRING),
            Keys.Rope.SCALING_FACTOR.format(arch=arch): _f32(rope["factor"]),
        }
        if kind == "yarn" and rope.get("original_max_position_embeddings"):
            meta[Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch)] = _u32(
                rope["original_max_position_embeddings"]
            )
        return meta
    return {}  # llama3 scaling travels as the rope_freqs tensor


_SOFTCAPPING_KEYS = {
    "attn_logit_softcapping": Keys.LLM.ATTN_LOGIT_SOFTCAPPING,
    "final_logit_softcapping": Keys.LLM.FINAL_LOGIT_SOFTCAPPING,
}


def _family_metadata(config: Any, adapter: ArchAdapter) -> Metadata:
    """The keys only some families have, as their adapter declares them."""
    arch = adapter.gguf_arch
    meta: Metadata = {}
    for field in adapter.gguf_softcapping:
        if getattr(config, field, None):
            meta[_SOFTCAPPING_KEYS[field].format(arch=arch)] = _f32(getattr(config, field))
    pattern = adapter.gguf_swa_pattern(_layer_types(config))
    sliding = getattr(config, "sliding_window", None) and (pattern is None or any(pattern))
    if adapter.gguf_sliding_window and sliding:
        meta[Keys.Attention.SLIDING_WINDOW.format(arch=arch)] = _u32(config.sliding_window)
    if pattern is not None:
        meta[Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)] = swa_pattern_kv(pattern)
        _note_pattern_needs_array(adapter, pattern)
    if adapter.gguf_rope_base_swa and getattr(config, "rope_local_base_freq", None):
        meta[Keys.Rope.FREQ_BASE_SWA.format(arch=arch)] = _f32(config.rope_local_base_freq)
    return meta


def swa_pattern_kv(pattern: list[bool]) -> KV:
    """``{arch}.attention.sliding_window_pattern`` as llama.cpp reads it: one bool per block."""
    return KV([bool(v) for v in pattern], GGUFValueType.ARRAY, GGUFValueType.BOOL)


def _note_pattern_needs_array(adapter: ArchAdapter, pattern: list[bool]) -> None:
    derived = adapter.llama_cpp_layer_types(len(pattern))
    if derived is not None and pattern != [t == _SLIDING for t in derived]:
        log.warning(
            "the %s layer pattern no longer follows the layer index: llama.cpp runs this GGUF right "
            "only where it reads the per-layer sliding_window_pattern (llama-cpp-python >= %s)",
            adapter.family,
            adapter.llama_cpp_swa_array_since,
        )


def read_metadata(path: str) -> Metadata:
    """Every key/value of a GGUF file, typed."""
    return header_metadata(open_gguf(path, strings=True))


def header_metadata(header: GGUFHeader) -> Metadata:
    """``read_metadata`` of an already parsed header."""
    meta: Metadata = {}
    for key, value in header.metadata.items():
        vtype, item_type = header.value_types[key]
        meta[key] = KV(value, GGUFValueType(vtype), None if item_type is None else GGUFValueType(item_type))
    return meta


# Keys the writer always sets itself: they describe this file, not the model.
_OWN_KEYS = (Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION)


def carry_over(ours: Metadata, source: Metadata, arch: str) -> Metadata:
    """Metadata of the source GGUF, changed only where this checkpoint's config differs from it.

    ``general.*`` and ``tokenizer.*`` come over exactly. Architecture keys come over too, except
    the block count (ours) and, when the block counts differ, per-layer arrays: those are ours,
    made from the config's own per-layer lists, or dropped when the config has none. Keys only we
    know are added.
    """
    source_arch = source.get(Keys.General.ARCHITECTURE)
    if source_arch is not None and source_arch.value != arch:
        raise ExportError(f"source GGUF is for architecture {source_arch.value!r}, this model is {arch!r}")
    block_key = Keys.LLM.BLOCK_COUNT.format(arch=arch)
    n_source_blocks = source[block_key].value if block_key in source else None
    merged: Metadata = {}
    for key, kv in source.items():
        if key in _OWN_KEYS:
            continue
        if key == block_key:
            merged[key] = ours[key]
            continue
        is_per_layer = kv.vtype == GGUFValueType.ARRAY and key.startswith(arch + ".")
        same_blocks = n_source_blocks == ours[block_key].value
        if is_per_layer and n_source_blocks and len(kv.value) == n_source_blocks and not same_blocks:
            if key in ours:
                merged[key] = ours[key]
            else:
                log.warning("dropping the source GGUF's per-layer %s: the config has no list for it", key)
            continue
        elif key in ours and ours[key].value != kv.value and not key.startswith(("general.", "tokenizer.")):
            log.debug("keeping source GGUF's %s=%r (config says %r)", key, kv.value, ours[key].value)
        merged[key] = kv
    for key, kv in ours.items():
        if key not in merged and not key.startswith("general."):
            merged[key] = kv
    return merged


def write_metadata(writer: gguf.GGUFWriter, meta: Metadata) -> None:
    for key, kv in meta.items():
        if key == Keys.General.ARCHITECTURE:
            continue
        writer.add_key_value(key, kv.value, kv.vtype, kv.sub_type)
