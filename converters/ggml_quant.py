"""Quantize float rows into a GGML tensor type, for rewriting single tensors of an existing GGUF.

Two quantizers, tried in this order:
- gguf-py (``gguf.quants.quantize``) for the types it implements (F32, F16, BF16, Q4_0, Q4_1,
  Q5_0, Q5_1, Q8_0, ...), probed once per type;
- llama.cpp's own ``ggml_quantize_chunk`` from the libggml that llama-cpp-python ships, called
  through ctypes, for the K-quants and the IQ4 types. Without an importance matrix, exactly as
  ``llama-quantize`` does when it is given none.

A type neither can produce (IQ2/IQ1 need an importance matrix; a row width that is not a multiple
of the block) is replaced by the nearest type that can be produced and does not lose precision:
the one with the fewest bits per weight at or above the requested type's. ``quantize_like`` says
which type it wrote and by which quantizer.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rmexport.errors import ExportError
from rmexport.log import get_logger

__all__ = ["Quantized", "bits_per_weight", "ggml_library", "quantize_like", "quantizer_for"]

log = get_logger(__name__)

# Types handed to ggml_quantize_chunk. ggml aborts the process on a type its quantizer does not
# handle, so only types known to quantize without an importance matrix are listed.
_GGML_TYPES = frozenset(
    {
        GGMLQuantizationType.Q2_K,
        GGMLQuantizationType.Q3_K,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
        GGMLQuantizationType.IQ4_NL,
        GGMLQuantizationType.IQ4_XS,
    }
)
# Mainstream weight types a tensor may fall back to (ties in size: earlier wins). F32 is always
# producible, so the ladder never runs out.
_FALLBACKS = tuple(
    getattr(GGMLQuantizationType, n)
    for n in "Q4_K Q5_K Q6_K Q2_K Q3_K IQ4_XS IQ4_NL Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 F16 BF16 F32".split()
)


@dataclass(frozen=True)
class Quantized:
    """Bytes of one tensor (uint8, GGUF byte shape), the type they are in, and who made them."""

    data: np.ndarray
    qtype: GGMLQuantizationType
    quantizer: str  # "gguf-py" | "llama.cpp"


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return 8.0 * type_size / block_size


@functools.cache
def _gguf_py_can(qtype: GGMLQuantizationType) -> bool:
    block_size = GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block_size), np.float32), qtype)
    except NotImplementedError:
        return False
    return True


@functools.cache
def ggml_library() -> Any | None:
    """libggml-base from llama-cpp-python's package folder (ctypes), or None when it is absent."""
    try:
        import llama_cpp
    except ImportError:
        return None
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        if not hasattr(lib, "ggml_quantize_chunk"):
            continue
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        return lib
    log.debug("no libggml-base with ggml_quantize_chunk under %s", lib_dir)
    return None


@functools.cache
def _ggml_can(qtype: GGMLQuantizationType) -> bool:
    if qtype not in _GGML_TYPES:
        return False
    lib = ggml_library()
    if lib is None:
        return False
    # The enum must mean the same type in gguf-py and in this libggml.
    name = (lib.ggml_type_name(int(qtype)) or b"").decode()
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return (
        name.lower() == qtype.name.lower()
        and lib.ggml_row_size(int(qtype), block_size) == type_size
        and not lib.ggml_quantize_requires_imatrix(int(qtype))
    )


def quantizer_for(qtype: GGMLQuantizationType, n_per_row: int) -> str | None:
    """Who can write rows of ``n_per_row`` values in ``qtype``: "gguf-py", "llama.cpp" or None."""
    if qtype not in GGML_QUANT_SIZES or n_per_row % GGML_QUANT_SIZES[qtype][0]:
        return None
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or _gguf_py_can(qtype):
        return "gguf-py"
    if _ggml_can(qtype):
        return "llama.cpp"
    return None


def _nearest(qtype: GGMLQuantizationType, n_per_row: int) -> GGMLQuantizationType:
    wanted = bits_per_weight(qtype)
    candidates = [
        t
        for t in _FALLBACKS
        if t != qtype and bits_per_weight(t) >= wanted and quantizer_for(t, n_per_row) is not None
    ]
    if not candidates:
        return GGMLQuantizationType.F32
    return min(candidates, key=lambda t: (bits_per_weight(t), _FALLBACKS.index(t)))


def _to_bytes(array: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return np.ascontiguousarray(array).view(np.uint8).reshape(byte_shape)


def _with_ggml(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    lib = ggml_library()
    n_per_row = rows.shape[-1]
    flat = np.ascontiguousarray(rows.reshape(-1, n_per_row), dtype=np.float32)
    n_rows = flat.shape[0]
    row_bytes = int(lib.ggml_row_size(int(qtype), n_per_row))
    out = np.empty(n_rows * row_bytes, dtype=np.uint8)
    written = lib.ggml_quantize_chunk(
        int(qtype), flat.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None
    )
    if written != out.nbytes:
        raise ExportError(
            f"llama.cpp's quantizer wrote {written} bytes for {qtype.name}, expected {out.nbytes}"
        )
    return out


def quantize_like(data: np.ndarray, qtype: GGMLQuantizationType, *, name: str = "tensor") -> Quantized:
    """``data`` (float, GGUF/numpy orientation: rows last) in ``qtype``, or the nearest type that can
    be produced (logged as a warning)."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise ExportError(f"{name} has NaN or infinite values; it cannot be quantized")
    n_per_row = data.shape[-1]
    target = qtype
    quantizer = quantizer_for(target, n_per_row)
    if quantizer is None:
        target = _nearest(qtype, n_per_row)
        quantizer = quantizer_for(target, n_per_row) or "gguf-py"
        log.warning(
            "%s: %s cannot be produced here (row width %d); written as %s instead",
            name,
            qtype.name,
            n_per_row,
            target.name,
        )
    if quantizer == "llama.cpp":
        raw = _with_ggml(data, target)
    else:
        raw = gguf.quants.quantize(data, target)
    return Quantized(_to_bytes(raw, target, data.shape), target, quantizer)
