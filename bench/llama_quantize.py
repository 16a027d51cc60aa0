"""llama.cpp's ``llama-quantize`` tool, built once from the source llama-cpp-python's sdist vendors.

The installed llama-cpp-python ships libllama but not the command-line tools. Its sdist carries the
matching ``vendor/llama.cpp``; we download it, build only the ``llama-quantize`` target (static, no
network libraries) and keep the binary in ``$RMEXPORT_CACHE/llama-quantize/<version>/``, so the
build happens once per llama-cpp-python version.

    python -m bench.llama_quantize            # build (or find) it and print its path
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from rmexport.errors import ToolchainError
from rmexport.log import get_logger

__all__ = ["find_or_build", "prune_layers", "prune_layers_libllama", "supports_prune_layers"]

log = get_logger(__name__)

_BINARY = "llama-quantize"
_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)


def _cache_root() -> Path:
    from rmexport.models import cache_dir

    return cache_dir() / "llama-quantize"


def _version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def _download_sdist(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(into)]
    done = subprocess.run([*cmd, f"llama-cpp-python=={version}"], capture_output=True, text=True)
    archives = list(into.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not archives:
        raise ToolchainError(
            f"could not download the llama-cpp-python {version} sdist: {done.stderr.strip()[-300:]}",
            hint="pass --llama-quantize PATH to a llama-quantize you built yourself",
        )
    return archives[0]


def _vendored_commit(archive: Path) -> str:
    """The llama.cpp commit the sdist's changelog names for its own version (``unknown`` if none)."""
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/CHANGELOG.md")), None)
        if member is None:
            return "unknown"
        text = tar.extractfile(member).read().decode(errors="replace")
    for line in text.splitlines():
        if "update llama.cpp to ggml-org/llama.cpp@" in line:
            return line.rsplit("@", 1)[1].strip()
    return "unknown"


def _build(version: str, target: Path) -> None:
    if shutil.which("cmake") is None:
        raise ToolchainError("cmake is not installed", hint="apt-get install cmake build-essential")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent) as scratch:
        scratch = Path(scratch)
        archive = _download_sdist(version, scratch)
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/", 3)
                if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"]:
                    m.name = parts[3]
                    members.append(m)
            tar.extractall(scratch / "src", members=members, filter="data")
        start = time.perf_counter()
        jobs = str(min(2, os.cpu_count() or 1))
        steps = (
            ["cmake", "-S", str(scratch / "src"), "-B", str(scratch / "build"), *_CMAKE_FLAGS],
            ["cmake", "--build", str(scratch / "build"), "--target", _BINARY, "-j", jobs],
        )
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise ToolchainError(
                    f"building {_BINARY} failed at `{' '.join(cmd[:2])}`: {done.stderr.strip()[-400:]}",
                    hint="pass --llama-quantize PATH to a llama-quantize you built yourself",
                )
        built = scratch / "build" / "bin" / _BINARY
        staged = target.with_name(target.name + ".partial")
        shutil.copy2(built, staged)
        info = {
            "llama_cpp_python": version,
            "llama_cpp_commit": _vendored_commit(archive),
            "cmake_flags": list(_CMAKE_FLAGS),
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        (target.parent / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        os.replace(staged, target)
        log.info("built %s in %.0f s: %s", _BINARY, info["build_seconds"], target)


def find_or_build(explicit: str | Path | None = None) -> Path:
    """Path of a ``llama-quantize``: ``explicit`` if given, else the cached build (built if absent)."""
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolchainError(f"{path} is not an executable", hint="give the path of llama-quantize")
        return path
    version = _version()
    target = _cache_root() / version / _BINARY
    if not target.is_file():
        log.info("building %s from llama-cpp-python %s's vendored llama.cpp (once)", _BINARY, version)
        _build(version, target)
    return target


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
