"""Small readers and writers of the files every stage shares: a GGUF's header, a checkpoint's provenance,
the cache folder.

They sit below method, converters and validation alike, so none of those has to import the model
resolver (``rmexport.models``) to read them.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf.quants import quant_shape_to_byte_shape

from .errors import ModelLoadError
from .records import JsonObject

__all__ = [
    "GGUF_MAGIC",
    "PROVENANCE_FILE",
    "cache_dir",
    "GGUFHeader",
    "GGUFHeaderError",
    "GGUFTensorInfo",
    "content_fingerprint",
    "open_gguf",
    "read_gguf_header",
    "read_provenance",
    "write_provenance",
]

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what llama.cpp reads
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_ENTRIES = 1 << 24
_MAX_DIMS = 8


class GGUFHeaderError(ValueError):
    """The header is not a GGUF header llama.cpp reads; the message says where it went wrong."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor's bytes lie in the file, and what they are."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows last), i.e. transformers' [out, in] for a weight
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def block(self) -> int | None:
        """The decoder block index of a ``blk.N.*`` tensor, else None."""
        parts = self.name.split(".")
        return int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else None


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    size: int  # of the file, in bytes
    metadata: JsonObject  # arrays of strings are None unless read with strings=True
    value_types: dict[str, tuple[int, int | None]]  # key -> GGUF value type, and the item type of an array
    tensors: list[GGUFTensorInfo]  # in file order

    @property
    def data_end(self) -> int:
        return max((t.offset + t.n_bytes for t in self.tensors), default=0)


class _Cursor:
    """Reads little-endian GGUF values from a buffer; running off its end is a truncated header."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFHeaderError("truncated header")

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        self._need(size)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, decode: bool = True) -> str | None:
        n = self.scalar("Q")
        if n > 1 << 30:
            raise GGUFHeaderError("corrupt header (string length)")
        self._need(n)
        start, self.pos = self.pos, self.pos + n
        if not decode:
            return None
        try:
            return bytes(self.buf[start : self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFHeaderError("corrupt header (a key or string is not UTF-8)") from None

    def peek_u32(self) -> int:
        self._need(4)
        return struct.unpack_from("<I", self.buf, self.pos)[0]

    def value(self, vtype: int, strings: bool, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth < 4:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if count > 1 << 32:
                raise GGUFHeaderError("corrupt header (array length)")
            if item_type in _SCALARS:
                fmt = f"<{count}{_SCALARS[item_type]}"
                self._need(struct.calcsize(fmt))
                items = list(struct.unpack_from(fmt, self.buf, self.pos))
                self.pos += struct.calcsize(fmt)
                return items
            if item_type == _STRING and not strings:  # tokenizer vocabularies: skipped, not decoded
                for _ in range(count):
                    self.string(decode=False)
                return None
            return [self.value(item_type, strings, depth + 1) for _ in range(count)]
        raise GGUFHeaderError(f"corrupt header (value type {vtype})")


def read_gguf_header(path: str | Path, *, strings: bool = False) -> GGUFHeader:
    """Key/values and tensor infos of a GGUF file, parsed straight from its bytes (a fraction of a
    second where ``gguf.GGUFReader`` takes seconds over a large vocabulary).

    Raises GGUFHeaderError for what is not a complete GGUF file (a header llama.cpp cannot read,
    or tensor data that runs past the end of the file), OSError for what cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    if size < 4:
        raise GGUFHeaderError("it is empty" if size == 0 else "truncated header")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        if buf[:4] != GGUF_MAGIC:
            raise GGUFHeaderError(f"wrong magic {bytes(buf[:4])!r}")
        cur.pos = 4
        version = cur.scalar("I")
        if version not in GGUF_VERSIONS:
            raise GGUFHeaderError(f"GGUF version {version} (llama.cpp reads versions 2 and 3)")
        n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
        if n_tensors > _MAX_ENTRIES or n_kv > _MAX_ENTRIES:
            raise GGUFHeaderError("corrupt header (entry counts)")
        metadata: JsonObject = {}
        value_types: dict[str, tuple[int, int | None]] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.scalar("I")
            value_types[key] = (vtype, cur.peek_u32() if vtype == _ARRAY else None)
            metadata[key] = cur.value(vtype, strings)
        entries = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("I")
            if n_dims > _MAX_DIMS:
                raise GGUFHeaderError(f"corrupt tensor info for {name!r}")
            dims = tuple(cur.scalar("Q") for _ in range(n_dims))
            entries.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
        header_end = cur.pos
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment < 1:
        raise GGUFHeaderError(f"corrupt header (alignment {alignment!r})")
    data_start = -(-header_end // alignment) * alignment
    tensors = []
    for name, dims, type_id, offset in entries:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFHeaderError(f"tensor {name!r} has unknown type {type_id}") from None
        elements = math.prod(dims)
        if elements % block:
            raise GGUFHeaderError(f"corrupt tensor info for {name!r}")
        tensors.append(
            GGUFTensorInfo(
                name, qtype, tuple(reversed(dims)), data_start + offset, elements // block * type_size
            )
        )
    header = GGUFHeader(path, version, size, metadata, value_types, tensors)
    if header.data_end > size:
        raise GGUFHeaderError(
            f"truncated: its tensor data ends at byte {header.data_end}, the file has {size}"
        )
    return header


def open_gguf(path: str | Path, *, strings: bool = False) -> GGUFHeader:
    """``read_gguf_header``, with ModelLoadError for a file that is missing, unreadable or not a
    whole GGUF."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        return read_gguf_header(path, strings=strings)
    except (GGUFHeaderError, OSError) as e:
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({e})",
            hint="the file may be truncated or corrupt; download or convert it again",
        ) from e


def cache_dir() -> Path:
    """Where rmexport keeps what it derives once per machine (conversions, corpora, perplexities)."""
    root = os.environ.get("RMEXPORT_CACHE") or Path.home() / ".cache" / "rmexport"
    return Path(root)


PROVENANCE_FILE = "rmexport_source.json"


def write_provenance(checkpoint: Path, info: JsonObject) -> None:
    """Record where a checkpoint came from (source GGUF, kept blocks) beside its config.

    The GGUF writer reads ``gguf_file`` to carry the source file's metadata over.
    """
    (Path(checkpoint) / PROVENANCE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_provenance(checkpoint: str | Path) -> JsonObject:
    path = Path(checkpoint) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


_EDGE_BYTES = 1 << 20


def _file_fingerprint(path: Path, h: Any) -> None:
    st = path.stat()
    h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0".encode())
    with path.open("rb") as f:
        h.update(f.read(_EDGE_BYTES))
        if st.st_size > 2 * _EDGE_BYTES:
            f.seek(st.st_size - _EDGE_BYTES)
            h.update(f.read(_EDGE_BYTES))


def content_fingerprint(path: str | Path) -> str:
    """A short hash that changes when the file (or any regular file directly in the folder) is
    rewritten: its size, its modification and status-change times, its first and last MiB.

    Reading every byte would cost seconds to minutes per run on multi-GB sources. The times catch
    an edit anywhere in a file, which head and tail alone miss (a block changed mid-shard); the
    status-change time is set by the kernel on every write and cannot be set back the way a
    modification time can (``touch -d``, ``cp -p``); head and tail cover filesystems with coarse
    timestamps. A chmod or a restore from backup also changes it: that costs a rerun, never a
    wrong reuse."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for file in files:
        if not file.name.startswith("."):
            _file_fingerprint(file, h)
    return h.hexdigest()[:16]
