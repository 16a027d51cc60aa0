"""The size–quality–speed frontier in llama.cpp: GGUF files of a ladder of types, the original's and the
pruned model's, each measured alike.

A point is one GGUF file: its size; its perplexity over held-out windows of every text source; and the
mean KL divergence of its next-token distribution from the original model's float one, at every
position of those windows. The original's float distribution (its f32 GGUF in llama.cpp, with an f32
KV cache) is computed once and stored as float16 log-probabilities ``[positions, vocab]``
(``write_reference``); every point reads it back, so one llama.cpp pass over the windows gives a point
both numbers. Speed is ``gguf_bench.speed``: pp512 and tg128, a pruned point against the original's
point of the same type, A B B A; before it, ``warm_up`` runs each of the two files once untimed (read
through into the page cache, loaded by llama.cpp, a short prompt evaluated), so that neither a file no
longer in the page cache nor a first load is paid inside the timed round.

``pareto`` marks the points that no other point beats on both axes; ``headline`` says in one
sentence what the frontier shows.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.gguf_export import describe_gguf
from rmexport import llamacpp as llama_cpp_tools
from rmexport.atomic import staged_file
from rmexport.calib.corpus import load_corpus
from rmexport.calib.tokens import heldout_windows
from rmexport.errors import ConfigError
from rmexport.log import get_logger, progress
from rmexport.measures import perplexity as perplexity_of
from rmexport.records import JsonObject, from_jsonable
from validation.gguf_parity import gguf_type_of
from validation.perplexity import window_nll, windows_digest

__all__ = [
    "WARMUP_TOKENS",
    "FrontierPoint",
    "FrontierRow",
    "Reference",
    "SourcePoint",
    "WarmUp",
    "frontier_windows",
    "headline",
    "measure_point",
    "page_cache_fraction",
    "pareto",
    "warm_up",
    "write_reference",
]

log = get_logger(__name__)

# The warm-up's prompt: one decode of any length reads every weight of every block (and a tied head the
# whole embedding), so a few tokens are enough; the file itself is read through before.
WARMUP_TOKENS = 16
_READ_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class Reference:
    """The float model's stored log-probabilities (``write_reference``) and what they were made from."""

    file: str  # .npy, float16 [positions, vocab]
    model: str  # the f32 GGUF
    positions: int
    windows_sha256: dict[str, str]  # source -> windows_digest
    seconds: float

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> Reference:
        return from_jsonable(cls, data)


@dataclass(frozen=True)
class SourcePoint:
    """One file on one text source's windows."""

    ppl: float
    kl: float  # mean over the source's predicted positions
    tokens: int


@dataclass(frozen=True)
class FrontierPoint:
    """One GGUF file measured (``measure_point``); ``imatrix`` and ``extra`` say how its ladder made it."""

    file: str
    type: str
    size_bytes: int
    block_count: int
    sources: dict[str, SourcePoint]
    ppl: float  # every source's windows pooled: exp of the mean NLL over every predicted token
    kl: float
    tokens: int
    seconds: float
    imatrix: bool = False  # quantized with the importance matrix
    extra: bool = False  # a benchmark's extra file (``--plain``), beside the ladder: not timed

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> FrontierPoint:
        return from_jsonable(cls, data)


@dataclass
class FrontierRow:
    """One row of the frontier's table: a point, its speed, and whether it is on either Pareto frontier."""

    model: str  # "original" or "pruned"
    type: str
    blocks: int
    size_mib: float
    ppl: float
    ppl_by_source: dict[str, float]
    kl: float
    pp_tokens_per_s: float | None
    tg_tokens_per_s: float | None
    tg_speedup: float | None  # the pruned rows only
    speed_rounds: int | None
    imatrix: bool
    extra: bool
    pareto_size: bool = False
    pareto_speed: bool = False

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> FrontierRow:
        return from_jsonable(cls, data)


@dataclass(frozen=True)
class WarmUp:
    """One file's untimed turn before the speed step times it (``warm_up``)."""

    file: str
    resident_before: float | None  # fraction of its pages in the page cache before (page_cache_fraction)
    resident_after: float | None  # and after
    tokens: int  # evaluated by llama.cpp (its own count)
    seconds: float  # read, load and evaluation

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> WarmUp:
        return from_jsonable(cls, data)


def frontier_windows(tokenizer: Any, tokens: Mapping[str, int], window: int = 512) -> dict[str, torch.Tensor]:
    """Held-out windows ``[n, window + 1]`` of each text source: BOS, then ``window`` tokens at a time of
    the first ``tokens[source]`` held-out tokens, the text the prune's perplexity checks start with."""
    return {
        source: heldout_windows(load_corpus(source), tokenizer, n, window) for source, n in tokens.items()
    }


def _positions(windows: Mapping[str, torch.Tensor]) -> int:
    """Predicted positions per window set: every position but the last of each window."""
    return sum(int(w.shape[0]) * (int(w.shape[1]) - 1) for w in windows.values())


def _open(path: Path, windows: Mapping[str, torch.Tensor], threads: int):
    width = int(next(iter(windows.values())).shape[1])
    f32 = gguf_type_of(path) == "f32"  # f32 weights: keep the KV cache in f32 too, as parity does
    return llama_cpp_tools.open_model(path, n_ctx=width, n_threads=threads, logits_all=True, f32_kv_cache=f32)


def _each_window(model: Any, windows: Mapping[str, torch.Tensor], desc: str):
    """(source, ids, logits) of every window, in order: logits ``[T, V]`` float32 for ids ``[T]``."""
    rows = [(source, ids) for source, w in windows.items() for ids in w]
    for source, ids in progress(rows, desc=desc, total=len(rows)):
        yield source, ids, llama_cpp_tools.eval_logits(model, ids.tolist())


def write_reference(
    f32_gguf: str | Path, windows: Mapping[str, torch.Tensor], out: str | Path, threads: int
) -> Reference:
    """The float model's log-probabilities at every predicted position of ``windows`` (sources in
    order, windows in order), float16, written to ``out`` (``.npy``); returns what they were made from."""
    f32_gguf, out = Path(f32_gguf), Path(out)
    started = time.perf_counter()
    row = 0
    with _open(f32_gguf, windows, threads) as model, staged_file(out) as tmp:
        shape = (_positions(windows), model.n_vocab())
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        for _source, _ids, logits in _each_window(model, windows, f"reference {f32_gguf.name}"):
            logprobs = torch.log_softmax(torch.from_numpy(logits[:-1]), -1)
            store[row : row + logprobs.shape[0]] = logprobs.numpy()
            row += logprobs.shape[0]
        store.flush()
        del store
    return Reference(
        file=str(out),
        model=str(f32_gguf),
        positions=row,
        windows_sha256={source: windows_digest(w) for source, w in windows.items()},
        seconds=round(time.perf_counter() - started, 1),
    )


def page_cache_fraction(path: str | Path) -> float | None:
    """The fraction of ``path``'s pages in the page cache (``mincore``), or None off Linux."""
    size = Path(path).stat().st_size
    if not sys.platform.startswith("linux"):
        return None
    if size == 0:
        return 1.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            resident = (ctypes.c_ubyte * pages)()
            if libc.mincore(address, size, resident) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
        finally:
            libc.munmap(address, size)
    return float((np.frombuffer(resident, dtype=np.uint8) & 1).sum()) / pages


def warm_up(gguf_file: str | Path, tokens: int = WARMUP_TOKENS) -> WarmUp:
    """Run ``gguf_file`` once, untimed: read it through (into the page cache), load it in llama.cpp and
    evaluate a short prompt. What a cold page cache or a first load costs is paid here, not in a timed
    round. On one thread: the prompt only has to touch the weights, and llama.cpp's threads wait for each
    other at every operation, so beside other jobs two threads on two cores took 8 s for the default
    model's 16 tokens where one took 0.07 s."""
    path = Path(gguf_file)
    before = page_cache_fraction(path)
    started = time.perf_counter()
    buffer = bytearray(_READ_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    with llama_cpp_tools.open_model(path, n_ctx=tokens, n_threads=1) as model:
        ids = np.random.default_rng(0).integers(min(10, model.n_vocab() - 1), model.n_vocab(), size=tokens)
        model.reset()
        model.eval(ids.tolist())
        evaluated = int(model.n_tokens)
    seconds = round(time.perf_counter() - started, 3)
    log.debug("warm-up %s: %.2f s, %s of its pages cached before", path.name, seconds, before)
    return WarmUp(str(path), before, page_cache_fraction(path), evaluated, seconds)


def _kl_sum(reference: np.ndarray, logits: np.ndarray) -> float:
    """Summed KL(reference ‖ logits) over the rows (float32 per row, summed in float64). The stored
    float16 log-probabilities are normalised again, so the reference is an exact distribution."""
    p_log = torch.log_softmax(torch.from_numpy(np.asarray(reference, dtype=np.float32)), -1)
    q_log = torch.log_softmax(torch.from_numpy(logits), -1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).double().sum())


def measure_point(
    gguf_file: str | Path,
    windows: Mapping[str, torch.Tensor],
    reference: Reference,
    threads: int,
    *,
    recorded_as: str | Path | None = None,
) -> FrontierPoint:
    """Size, and per source perplexity and mean KL to the reference (``write_reference``'s record), of one
    GGUF over ``windows``; ``recorded_as`` is the path the result names (where a staged file will be)."""
    gguf_file = Path(gguf_file)
    digests = {source: windows_digest(w) for source, w in windows.items()}
    if digests != reference.windows_sha256:
        raise ConfigError(
            f"{gguf_file.name}: the reference log-probabilities were made on other windows",
            hint="measure the original's points again (--force)",
        )
    stored = np.load(reference.file, mmap_mode="r")
    if stored.shape[0] != _positions(windows):
        raise ConfigError(
            f"{reference.file} holds {stored.shape[0]} positions, the windows have {_positions(windows)}"
        )
    started = time.perf_counter()
    sums = {source: {"nll": 0.0, "count": 0, "kl": 0.0} for source in windows}
    row = 0
    with _open(gguf_file, windows, threads) as model:
        if model.n_vocab() != stored.shape[1]:
            raise ConfigError(
                f"{gguf_file.name} has a vocabulary of {model.n_vocab()}, the original's of {stored.shape[1]}"
            )
        for source, ids, logits in _each_window(model, windows, f"frontier {gguf_file.name}"):
            nll, count = window_nll(logits[None], ids[None])
            sums[source]["nll"] += nll
            sums[source]["count"] += count
            sums[source]["kl"] += _kl_sum(stored[row : row + count], logits[:-1])
            row += count
    per_source = {
        source: SourcePoint(
            ppl=perplexity_of(s["nll"], s["count"]), kl=s["kl"] / s["count"], tokens=int(s["count"])
        )
        for source, s in sums.items()
    }
    total = sum(int(s["count"]) for s in sums.values())
    return FrontierPoint(
        file=str(recorded_as or gguf_file),
        type=gguf_type_of(gguf_file),
        size_bytes=gguf_file.stat().st_size,
        block_count=describe_gguf(gguf_file)["block_count"],
        sources=per_source,
        ppl=perplexity_of(sum(s["nll"] for s in sums.values()), total),
        kl=sum(s["kl"] for s in sums.values()) / total,
        tokens=total,
        seconds=round(time.perf_counter() - started, 1),
    )


def pareto(points: Sequence[tuple[float, float]], *, higher_x_is_better: bool) -> list[bool]:
    """For each ``(x, perplexity)``: whether no other point is at least as good on both and better on
    one (lower perplexity; lower x, or higher where ``higher_x_is_better``)."""
    sign = -1.0 if higher_x_is_better else 1.0

    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        ax, bx = sign * a[0], sign * b[0]
        return ax <= bx and a[1] <= b[1] and (ax < bx or a[1] < b[1])

    return [not any(beats(other, p) for other in points if other is not p) for p in points]


def _nearest_pair(
    pruned: Sequence[FrontierRow], original: Sequence[FrontierRow], key: str
) -> tuple[FrontierRow, FrontierRow] | None:
    """The pruned and original rows closest on ``key`` (relative difference)."""
    pairs = [(p, o) for p in pruned for o in original if getattr(p, key) and getattr(o, key)]
    if not pairs:
        return None
    return min(pairs, key=lambda pair: abs(math.log(getattr(pair[0], key) / getattr(pair[1], key))))


def _winner(pruned: FrontierRow, original: FrontierRow) -> str:
    better = "the pruned file" if pruned.ppl < original.ppl else "the original's"
    return f"{better} is the better one there"


def headline(rows: Sequence[FrontierRow]) -> str:
    """One sentence from the numbers: the pruned row and the original's row nearest in file size, then
    nearest in tg128 speed, with their perplexities."""
    pruned = [r for r in rows if r.model == "pruned"]
    original = [r for r in rows if r.model == "original"]
    parts = []
    by_size = _nearest_pair(pruned, original, "size_mib")
    if by_size:
        p, o = by_size
        parts.append(
            f"At about {p.size_mib:.3g} MiB the pruned {p.type.upper()} ({p.size_mib:.1f} MiB) has "
            f"perplexity {p.ppl:.2f} where the original's {o.type.upper()} ({o.size_mib:.1f} MiB) has "
            f"{o.ppl:.2f}: {_winner(p, o)}"
        )
    by_speed = _nearest_pair(pruned, original, "tg_tokens_per_s")
    if by_speed:
        p, o = by_speed
        parts.append(
            f"at about {p.tg_tokens_per_s:.3g} tokens/s of tg128 the pruned {p.type.upper()} has "
            f"{p.ppl:.2f} where the original's {o.type.upper()} ({o.tg_tokens_per_s:.0f} tokens/s) has "
            f"{o.ppl:.2f}: {_winner(p, o)}"
        )
    return ("; ".join(parts) + ".") if parts else ""
