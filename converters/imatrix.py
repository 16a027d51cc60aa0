"""Importance matrices (llama.cpp's ``imatrix``): compute one with ``llama-imatrix``, read one, and
check that it belongs to the model it is about to quantize.

An imatrix holds, for every matmul weight ``W`` of the model, the mean of ``x_j²`` over the
calibration tokens for each input column ``j`` of ``W``. llama.cpp's quantizers weigh each
weight's rounding error by it, so the columns the text actually exercises are kept most exact.

Files are llama.cpp's GGUF imatrix format (``<tensor>.in_sum2`` and ``<tensor>.counts`` per weight,
``imatrix.datasets`` / ``imatrix.chunk_count`` / ``imatrix.chunk_size``); the older ``.dat`` format
is read too. Anything unreadable, or written for another model, is a ``ConfigError`` (exit 2).
"""

from __future__ import annotations

import re
import struct
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

from rmexport.atomic import staging_name
from rmexport.errors import ConfigError, ToolchainError
from rmexport.fileio import open_gguf
from rmexport.llama_tools import find_tool
from rmexport.llamacpp import default_threads
from rmexport.log import get_logger
from rmexport.records import JsonObject, from_jsonable

__all__ = [
    "CalibrationText",
    "Importance",
    "ImatrixUse",
    "check_matches",
    "compute_imatrix",
    "imatrix_path_for",
    "quantized_with",
    "read_imatrix",
]

log = get_logger(__name__)

_SUMS, _COUNTS = ".in_sum2", ".counts"
_BLOCK = re.compile(r"^blk\.(\d+)\.")
# The name llama-imatrix records as its dataset: the text file's name, relative, so that the same
# text gives the same bytes wherever it was written.
_TEXT_NAME = "calibration.txt"


@dataclass(frozen=True)
class Importance:
    """Per weight tensor: mean squared input activation per column (float32, experts concatenated)."""

    path: Path
    entries: dict[str, np.ndarray]
    datasets: tuple[str, ...]
    chunk_count: int


@dataclass(frozen=True)
class CalibrationText:
    """Text to compute an importance matrix from, read by ``llama-imatrix`` in chunks of
    ``chunk_tokens`` tokens (each starts with BOS where the model adds one), at most ``max_chunks`` of
    them (None: as many as the text fills)."""

    text: str
    chunk_tokens: int = 512
    max_chunks: int | None = None


def imatrix_path_for(gguf_file: str | Path) -> Path:
    """Where the importance matrix of ``gguf_file`` is written: beside it, ``<stem>.imatrix.gguf``."""
    gguf_file = Path(gguf_file)
    return gguf_file.with_name(f"{gguf_file.stem}.imatrix.gguf")


def _corrupt(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"{path} is not a readable importance matrix: {why}",
        hint="give a file written by llama-imatrix (or rmexport), or --imatrix auto",
    )


def _read_gguf(path: Path) -> Importance:
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    names = sorted({n[: -len(_SUMS)] for n in tensors if n.endswith(_SUMS)})
    if not names:
        raise _corrupt(path, "a GGUF without any <tensor>.in_sum2 entries")
    entries = {}
    for name in names:
        counts = tensors.get(name + _COUNTS)
        sums = tensors[name + _SUMS]
        if counts is None:
            raise _corrupt(path, f"{name} has sums but no counts")
        if (
            sums.tensor_type != gguf.GGMLQuantizationType.F32
            or counts.tensor_type != gguf.GGMLQuantizationType.F32
        ):
            raise _corrupt(path, f"{name}'s sums and counts are not F32")
        sums_data = np.asarray(sums.data, dtype=np.float32).reshape(-1)
        counts_data = np.rint(np.asarray(counts.data, dtype=np.float32).reshape(-1))
        if counts_data.size == 0 or sums_data.size % counts_data.size:
            raise _corrupt(path, f"{name} has {sums_data.size} sums for {counts_data.size} counts")
        # As llama-quantize reads it: sums over counted tokens, and 1 where an expert saw none.
        per_expert = sums_data.reshape(counts_data.size, -1)
        means = np.where(counts_data[:, None] > 0, per_expert / np.maximum(counts_data[:, None], 1), 1.0)
        entries[name] = means.astype(np.float32).reshape(-1)
    datasets_field = reader.get_field("imatrix.datasets")
    datasets = tuple(datasets_field.contents()) if datasets_field is not None else ()
    chunks_field = reader.get_field("imatrix.chunk_count")
    chunk_count = int(chunks_field.contents()) if chunks_field is not None else 0
    if datasets_field is None or chunks_field is None or reader.get_field("imatrix.chunk_size") is None:
        raise _corrupt(path, "its imatrix.* metadata is missing")
    return Importance(path, entries, datasets, chunk_count)


def _read_legacy(path: Path, data: bytes) -> Importance:
    """The ``.dat`` format: entry count; per entry name, call count, values (sums already ÷ calls
    × calls); then optionally the chunk count and the dataset name."""

    def take(fmt: str, at: int) -> tuple[tuple, int]:
        size = struct.calcsize(fmt)
        if at + size > len(data):
            raise _corrupt(path, "it ends in the middle of an entry")
        return struct.unpack_from(fmt, data, at), at + size

    (n_entries,), at = take("<i", 0)
    if not 0 < n_entries < 1_000_000:
        raise _corrupt(path, "neither a GGUF nor a .dat imatrix")
    entries = {}
    for _ in range(n_entries):
        (length,), at = take("<i", at)
        if not 0 < length < 4096:
            raise _corrupt(path, "an entry's name length is out of range")
        (raw_name,), at = take(f"<{length}s", at)
        (calls, n_values), at = take("<ii", at)
        if n_values < 1:
            raise _corrupt(path, "an entry has no values")
        values, at = take(f"<{n_values}f", at)
        sums = np.array(values, dtype=np.float32)
        entries[raw_name.decode(errors="replace")] = sums / calls if calls > 0 else sums
    chunk_count, datasets = 0, ()
    if at + 4 <= len(data):
        (chunk_count,), at = take("<i", at)
        if at + 4 <= len(data):
            (length,), at = take("<i", at)
            if length > 0:
                (raw,), at = take(f"<{length}s", at)
                datasets = (raw.decode(errors="replace"),)
    return Importance(path, entries, datasets, chunk_count)


def read_imatrix(path: str | Path) -> Importance:
    """The importance matrix in ``path`` (GGUF or ``.dat``); ConfigError when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"importance matrix {path} does not exist", hint="--imatrix auto computes one")
    data = path.read_bytes()
    if data[:4] == b"GGUF":
        try:
            importance = _read_gguf(path)
        except ConfigError:
            raise
        except (ValueError, KeyError, IndexError, struct.error) as e:
            raise _corrupt(path, f"a damaged GGUF ({e})") from None
    else:
        importance = _read_legacy(path, data)
    for name, values in importance.entries.items():
        if not np.isfinite(values).all():
            raise _corrupt(path, f"{name} has NaN or infinite values")
    return importance


@dataclass(frozen=True)
class ImatrixUse:
    """The importance matrix a GGUF was quantized with, as its ``quantize.imatrix.*`` keys record it."""

    file: str
    dataset: str | None
    chunks: int | None  # quantize.imatrix.chunks_count
    entries: int | None  # quantize.imatrix.entries_count

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> ImatrixUse:
        return from_jsonable(cls, data)


def quantized_with(gguf_file: str | Path) -> ImatrixUse | None:
    """The importance matrix a GGUF was quantized with, or None when it was quantized without one."""
    metadata = open_gguf(gguf_file).metadata
    if "quantize.imatrix.file" not in metadata:
        return None
    return ImatrixUse(
        file=metadata["quantize.imatrix.file"],
        dataset=metadata.get("quantize.imatrix.dataset"),
        chunks=metadata.get("quantize.imatrix.chunks_count"),
        entries=metadata.get("quantize.imatrix.entries_count"),
    )


def check_matches(importance: Importance, model_gguf: str | Path) -> None:
    """ConfigError unless ``importance`` was made for this model: every entry names one of its weights,
    with that weight's row width, and both cover the same blocks."""
    widths = {t.name: t.shape[-1] for t in open_gguf(model_gguf).tensors if len(t.shape) >= 2}
    hint = "compute it for this model (--imatrix auto) or pass the matrix written beside its GGUF"
    for name, values in sorted(importance.entries.items()):
        if name not in widths:
            raise ConfigError(
                f"importance matrix {importance.path} does not match the model: it has {name}, "
                "the model does not",
                hint=hint,
            )
        if values.size % widths[name]:
            raise ConfigError(
                f"importance matrix {importance.path} does not match the model: {name} has {values.size} "
                f"values, the model's rows are {widths[name]} wide",
                hint=hint,
            )
    model_blocks = {int(m.group(1)) for n in widths if (m := _BLOCK.match(n))}
    matrix_blocks = {int(m.group(1)) for n in importance.entries if (m := _BLOCK.match(n))}
    if matrix_blocks != model_blocks:
        raise ConfigError(
            f"importance matrix {importance.path} does not match the model: it covers "
            f"{len(matrix_blocks)} blocks, the model has {len(model_blocks)}",
            hint=hint,
        )


def compute_imatrix(model_gguf: str | Path, calibration: CalibrationText, out_file: str | Path) -> Path:
    """Run ``llama-imatrix`` on ``model_gguf`` over ``calibration``; write the matrix (GGUF format) to
    ``out_file`` and return its path."""
    tool = find_tool("llama-imatrix")
    out_file = Path(out_file)
    # Named as a staging entry of this process, so that a later run removes it if this one is killed.
    with tempfile.TemporaryDirectory(prefix=staging_name(out_file), dir=out_file.parent) as scratch:
        scratch = Path(scratch)
        (scratch / _TEXT_NAME).write_text(calibration.text, encoding="utf-8")
        made = scratch / "imatrix.gguf"
        cmd = [
            str(tool),
            "-m", str(Path(model_gguf).resolve()),
            "-f", _TEXT_NAME,
            "-o", made.name,
            "-c", str(calibration.chunk_tokens),
            "-b", str(calibration.chunk_tokens),
            "-t", str(default_threads()),
            "--parse-special",
            "--no-ppl",
            *(["--chunks", str(calibration.max_chunks)] if calibration.max_chunks else []),
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True)
        if done.returncode != 0 or not made.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ToolchainError(f"llama-imatrix failed (rc {done.returncode}): {' | '.join(tail)}")
        made.replace(out_file)
    log.info("importance matrix of %s written to %s", Path(model_gguf).name, out_file)
    return out_file
