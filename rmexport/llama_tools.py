"""llama.cpp's command-line tools (``llama-imatrix``, ``llama-quantize``), built once from the sources
that the installed llama-cpp-python's sdist vendors.

The installed llama-cpp-python ships libllama but not the tools. Its sdist carries the matching
``vendor/llama.cpp``; ``build()`` downloads it, builds only the tool targets (static, no network
libraries) and keeps the binaries in ``$RMEXPORT_CACHE/llama-tools/<version>/``, once per
llama-cpp-python version. Exporting never builds: a missing tool is an error that names
``make llama-tools``.

    python -m rmexport.llama_tools          # build (or find) the tools and print their paths
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .errors import ToolchainError
from .fileio import cache_dir
from .llamacpp import installed_version
from .log import get_logger

__all__ = ["MAKE_TARGET", "TOOLS", "build", "find_tool", "tool_path"]

log = get_logger(__name__)

TOOLS = ("llama-imatrix", "llama-quantize")
MAKE_TARGET = "make llama-tools"
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


def _version() -> str:
    version = installed_version()
    if version is None:
        raise ToolchainError("llama-cpp-python is not installed", hint="make setup")
    return version


def _cache_root() -> Path:
    return cache_dir() / "llama-tools"


def tool_path(name: str) -> Path:
    """Where ``name`` lives once built for the installed llama-cpp-python (it may not exist)."""
    return _cache_root() / _version() / name


def find_tool(name: str) -> Path:
    """The built ``name``; ToolchainError naming the make target when it is not built."""
    path = tool_path(name)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ToolchainError(
            f"{name} is not built for llama-cpp-python {_version()} (looked for {path})",
            hint=f"run `{MAKE_TARGET}` once (builds it from llama.cpp's sources, a few minutes)",
        )
    return path


def _download_sdist(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(into)]
    done = subprocess.run([*cmd, f"llama-cpp-python=={version}"], capture_output=True, text=True)
    archives = list(into.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not archives:
        raise ToolchainError(
            f"could not download the llama-cpp-python {version} sdist: {done.stderr.strip()[-300:]}",
            hint="the build needs the network once",
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


def _unpack_vendored(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 3)
            if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"]:
                member.name = parts[3]
                members.append(member)
        tar.extractall(into, members=members, filter="data")


def build(tools: tuple[str, ...] = TOOLS) -> dict[str, Path]:
    """Build whichever of ``tools`` are missing; return every tool's path."""
    missing = [t for t in tools if not tool_path(t).is_file()]
    if missing:
        _build(_version(), missing)
    return {t: tool_path(t) for t in tools}


def _build(version: str, tools: list[str]) -> None:
    if shutil.which("cmake") is None:
        raise ToolchainError("cmake is not installed", hint="apt-get install cmake build-essential")
    target_dir = _cache_root() / version
    target_dir.mkdir(parents=True, exist_ok=True)
    log.info("building %s from llama-cpp-python %s's vendored llama.cpp (once)", ", ".join(tools), version)
    with tempfile.TemporaryDirectory(dir=target_dir.parent) as scratch:
        scratch = Path(scratch)
        archive = _download_sdist(version, scratch)
        _unpack_vendored(archive, scratch / "src")
        start = time.perf_counter()
        jobs = str(min(2, os.cpu_count() or 1))
        targets = [arg for tool in tools for arg in ("--target", tool)]
        steps = (
            ["cmake", "-S", str(scratch / "src"), "-B", str(scratch / "build"), *_CMAKE_FLAGS],
            ["cmake", "--build", str(scratch / "build"), *targets, "-j", jobs],
        )
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = done.stderr.strip()[-400:]
                raise ToolchainError(f"building {', '.join(tools)} failed at `{' '.join(cmd[:2])}`: {tail}")
        info = {
            "llama_cpp_python": version,
            "llama_cpp_commit": _vendored_commit(archive),
            "cmake_flags": list(_CMAKE_FLAGS),
            "tools": sorted(set(tools) | {p.name for p in target_dir.glob("llama-*")}),
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        for tool in tools:
            staged = target_dir / f"{tool}.partial"
            shutil.copy2(scratch / "build" / "bin" / tool, staged)
            os.replace(staged, target_dir / tool)
        (target_dir / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        log.info("built %s in %.0f s under %s", ", ".join(tools), info["build_seconds"], target_dir)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, path in build().items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
