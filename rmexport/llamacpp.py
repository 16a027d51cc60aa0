"""The real llama.cpp, through llama-cpp-python (ctypes bindings to libllama).

One place knows how to load a GGUF, read its logits, tokenize, time evaluation and run
llama.cpp's own quantizer, and the pre-tokenizer regexes llama.cpp knows by name; everything else
(the GGUF writer, the tokenizer rebuild of a GGUF source, validation) calls these.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from rmexport.errors import ExportError, ToolchainError
from rmexport.log import get_logger

__all__ = [
    "LLAMA_FTYPES",
    "QUANTIZER_TYPES",
    "PRE_TOKENIZER_REGEXES",
    "default_threads",
    "extra_buffer_types_usable",
    "eval_logits",
    "installed_version",
    "library_info",
    "llama_module",
    "open_model",
    "quantize",
    "tokenize",
]

log = get_logger(__name__)

_GGML_TYPE_F32 = 0  # ggml_type enum value

# Every file type llama.cpp's quantizer makes (llama-quantize's list, less its aliases and COPY), by
# our lower-case names -> llama_ftype values (llama.h's enum, as the binding exposes it).
QUANTIZER_TYPES = (
    "f32 f16 bf16 q8_0 q6_k q5_k_m q5_k_s q5_0 q5_1 q4_k_m q4_k_s q4_0 q4_1 iq4_xs iq4_nl mxfp4_moe "
    "q3_k_l q3_k_m q3_k_s iq3_m iq3_s iq3_xs iq3_xxs q2_k q2_k_s q2_0 iq2_m iq2_s iq2_xs iq2_xxs "
    "iq1_m iq1_s q1_0 tq2_0 tq1_0"
).split()
LLAMA_FTYPES = {
    name: "LLAMA_FTYPE_ALL_F32" if name == "f32" else f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    for name in QUANTIZER_TYPES
}


# The split regexes exactly as the families' tokenizer.json files state them.
PRE_TOKENIZER_REGEXES: dict[str, str] = {
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "tekken": (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}


def llama_module() -> Any:
    """The ``llama_cpp`` package, or ToolchainError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ToolchainError(
            f"llama-cpp-python is not importable ({e})",
            hint="pip install llama-cpp-python (builds llama.cpp from source)",
        ) from e
    return llama_cpp


def installed_version() -> str | None:
    """llama-cpp-python's version from its package metadata (None: not installed); loads no library."""
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _system_info() -> str:
    info = llama_module().llama_print_system_info()
    return info.decode(errors="replace").strip() if isinstance(info, bytes) else str(info)


def extra_buffer_types_usable(system_info: str) -> bool:
    """Whether llama.cpp may place weights in its extra CPU buffer types (AMX, repacked layouts).

    On CPUs with AMX, llama.cpp puts quantized weights in its AMX buffer, and its AMX matrix
    multiply crashes (SIGSEGV) on the first decode of any quantized model, Q4_1 and Q4_K_M alike
    (llama-cpp-python 0.3.36 here; llama.cpp issue 20824). Without extra buffer types llama.cpp
    runs its plain CPU kernels, as it does on every CPU without AMX.
    """
    return "AMX_INT8 = 1" not in system_info


def library_info() -> dict[str, str | bool]:
    system_info = _system_info()
    return {
        "llama_cpp_python": llama_module().__version__,
        "system_info": system_info,
        "extra_buffer_types": extra_buffer_types_usable(system_info),
    }


@contextlib.contextmanager
def _model_params_without_extra_buffer_types(llama_cpp: Any) -> Iterator[None]:
    """``llama_cpp.Llama`` takes no ``use_extra_bufts``; it builds its model parameters from
    ``llama_model_default_params()`` while loading, so that function answers without them meanwhile."""
    binding = llama_cpp.llama_cpp
    default_params = binding.llama_model_default_params

    def without_extra_buffer_types() -> Any:
        params = default_params()
        params.use_extra_bufts = False
        return params

    binding.llama_model_default_params = without_extra_buffer_types
    try:
        yield
    finally:
        binding.llama_model_default_params = default_params


@contextlib.contextmanager
def open_model(
    path: str | Path,
    *,
    n_ctx: int = 512,
    n_threads: int | None = None,
    logits_all: bool = False,
    f32_kv_cache: bool = False,
) -> Iterator[Any]:
    """A loaded ``llama_cpp.Llama`` on the CPU, closed on exit.

    llama.cpp keeps its KV cache in f16 by default; ``f32_kv_cache`` keeps it in f32, so that an
    f32 GGUF can be compared with PyTorch without that rounding.
    """
    llama_cpp = llama_module()
    threads = n_threads or default_threads()
    params_context = (
        contextlib.nullcontext()
        if extra_buffer_types_usable(_system_info())
        else _model_params_without_extra_buffer_types(llama_cpp)
    )
    try:
        with params_context:
            model = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=logits_all,
                n_gpu_layers=0,
                seed=0,
                verbose=False,
                **({"type_k": _GGML_TYPE_F32, "type_v": _GGML_TYPE_F32} if f32_kv_cache else {}),
            )
    except ValueError as e:
        raise ExportError(
            f"llama.cpp could not load {path}: {e}", hint="run with -v to see llama.cpp's log"
        ) from e
    try:
        yield model
    finally:
        model.close()


def eval_logits(model: Any, ids: list[int]) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` (float32) for one sequence, from an empty KV cache."""
    model.reset()  # n_tokens = 0: eval() then drops the whole KV cache before decoding
    model.eval(list(ids))
    return np.array(model.scores[: len(ids)], dtype=np.float32, copy=True)


def tokenize(model: Any, text: str) -> list[int]:
    """llama.cpp's tokens for ``text``: no BOS added, special-token text not parsed."""
    return list(model.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def _imatrix_array(llama_cpp: Any, imatrix: dict[str, np.ndarray]) -> tuple[Any, list[Any]]:
    """``imatrix`` as libllama's null-terminated ``llama_model_imatrix_data`` array, and the buffers
    it points into (kept alive by the caller for the duration of the call)."""
    entry = llama_cpp.llama_model_imatrix_data
    buffers = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
    array = (entry * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(zip(imatrix, buffers, strict=True)):
        array[i].name = name.encode()
        array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = values.size
    array[len(imatrix)].name = None
    return array, buffers


def _kv_overrides(llama_cpp: Any, values: dict[str, int | str]) -> Any:
    """``values`` as libllama's ``llama_model_kv_override`` array, ended by an empty key."""
    array = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for item, (key, value) in zip(array, values.items(), strict=False):
        item.key = key.encode()
        if isinstance(value, int):
            item.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            item.value.val_i64 = value
        else:
            item.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            item.value.val_str = value.encode()[:127]
    array[len(values)].key = b""
    return array


@contextlib.contextmanager
def _stderr_lines() -> Iterator[list[str]]:
    """What native code writes to file descriptor 2 inside the block, as lines (filled on exit)
    instead of on the terminal: llama.cpp's quantizer prints there whatever its log level."""
    lines: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines += [x for x in captured.read().decode("utf-8", "replace").splitlines() if x.strip()]


def quantize(
    source: str | Path,
    target: str | Path,
    type_name: str,
    *,
    n_threads: int | None = None,
    imatrix: dict[str, np.ndarray] | None = None,
    metadata: dict[str, int | str] | None = None,
    allow_requantize: bool = False,
) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize``), as ``llama-quantize``
    does: ``imatrix`` maps weight names to the mean squared activation of each input column,
    ``metadata`` is written into the file as extra keys (``quantize.imatrix.*``); ``allow_requantize``
    takes quantized tensors too (dequantized first)."""
    llama_cpp = llama_module()
    from llama_cpp import _logger as llama_cpp_logger

    # libllama logs every tensor while quantizing; show that only when we log at DEBUG.
    llama_cpp_logger.set_verbose(log.isEnabledFor(logging.DEBUG))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[type_name])
    params.nthread = n_threads or default_threads()
    params.allow_requantize = allow_requantize
    keep_alive: list[Any] = []
    if imatrix:
        array, buffers = _imatrix_array(llama_cpp, imatrix)
        keep_alive += [array, buffers]
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if metadata:
        overrides = _kv_overrides(llama_cpp, metadata)
        keep_alive.append(overrides)
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    start = time.perf_counter()
    with _stderr_lines() as printed:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    for line in printed:
        # One line per tensor whose row length the type cannot take ("falling back to q8_0"), then
        # llama.cpp's own count of them: the count is what a user needs.
        level = logging.INFO if "fallback quantization" in line else logging.DEBUG
        log.log(level, "llama.cpp: %s", line.split("WARNING: ")[-1])
    if rc != 0:
        raise ExportError(
            f"llama.cpp's quantizer failed for {type_name} (return code {rc})",
            hint="run with -v to see llama.cpp's log",
        )
    log.info(
        "llama.cpp quantized to %s%s in %.1f s",
        type_name,
        " with an importance matrix" if imatrix else "",
        time.perf_counter() - start,
    )
