"""llama.cpp's ``llama-quantize`` tool for the GGUF-native benchmark (``--prune-layers``).

Built once per llama-cpp-python version from the sources its sdist vendors, by
``rmexport.llama_tools`` (``make llama-tools``); this module builds it on demand.

    python -m bench.llama_quantize            # build (or find) it and print its path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from rmexport import llama_tools
from rmexport.errors import ToolchainError
from rmexport.log import get_logger

__all__ = ["find_or_build", "prune_layers", "prune_layers_libllama", "supports_prune_layers"]

log = get_logger(__name__)

_BINARY = "llama-quantize"


def find_or_build(explicit: str | Path | None = None) -> Path:
    """Path of a ``llama-quantize``: ``explicit`` if given, else the cached build (built if absent)."""
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolchainError(f"{path} is not an executable", hint="give the path of llama-quantize")
        return path
    return llama_tools.build((_BINARY,))[_BINARY]


def supports_prune_layers(tool: Path) -> bool:
    """Whether this ``llama-quantize`` knows ``--prune-layers`` (its usage text lists it)."""
    done = subprocess.run([str(tool), "--help"], capture_output=True, text=True)
    return "--prune-layers" in done.stdout + done.stderr


def prune_layers(
    tool: Path, source: Path, target: Path, removed: list[int], type_name: str, *, threads: int
) -> tuple[float, float]:
    """``llama-quantize --allow-requantize --prune-layers`` of ``removed``: (wall seconds, its peak RSS MiB).

    The peak comes from GNU ``time`` (``/usr/bin/time``); without it, NaN.
    """
    cmd = [
        str(tool),
        "--allow-requantize",
        "--prune-layers",
        ",".join(str(i) for i in removed),
        str(source),
        str(target),
        type_name.upper(),
        str(threads),
    ]
    timer = shutil.which("time", path="/usr/bin:/bin")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        peak_file = Path(scratch) / "peak"
        # GNU time forks the tool from its own small process, so the peak it reports is the tool's;
        # os.wait4 from Python would report at least this Python process's RSS (Linux keeps the
        # forking parent's high-water mark across execve).
        prefix = [timer, "-f", "%M", "-o", str(peak_file)] if timer else []
        with open(Path(scratch) / "log", "w+b") as output:
            done = subprocess.run([*prefix, *cmd], stdout=output, stderr=subprocess.STDOUT)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                output.seek(0)
                tail = output.read().decode(errors="replace").strip()[-400:]
                raise ToolchainError(f"{_BINARY} --prune-layers failed (rc {done.returncode}): {tail}")
        peak = float(peak_file.read_text().split()[-1]) / 1024 if timer else float("nan")
    return seconds, peak


def prune_layers_libllama(
    source: Path, target: Path, removed: list[int], type_name: str, *, threads: int
) -> float:
    """The same prune through libllama's ``llama_model_quantize`` (what the tool calls), in this process.

    Sets exactly what ``llama-quantize --allow-requantize --prune-layers`` sets: the target type,
    ``allow_requantize`` and the ``-1``-terminated layer list; returns the wall time.
    """
    import ctypes

    from converters.llama_cpp import LLAMA_FTYPES, llama_module

    llama_cpp = llama_module()
    params = llama_cpp.llama_model_quantize_default_params()
    if not hasattr(params, "prune_layers"):
        raise ToolchainError(
            f"llama-cpp-python {llama_cpp.__version__} has no prune_layers in llama_model_quantize_params",
            hint="use the llama-quantize binary (--llama-quantize)",
        )
    layers = (ctypes.c_int32 * (len(removed) + 1))(*removed, -1)
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[type_name])
    params.nthread = threads
    params.allow_requantize = True
    params.prune_layers = ctypes.cast(layers, ctypes.POINTER(ctypes.c_int32))
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise ToolchainError(f"llama_model_quantize with prune_layers failed (return code {rc})")
    return time.perf_counter() - start


def main() -> int:
    tool = find_or_build()
    print(tool)
    print("--prune-layers:", "yes" if supports_prune_layers(tool) else "no")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
