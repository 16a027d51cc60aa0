"""The size–quality–speed frontier in llama.cpp: GGUF files of a ladder of types, the original's and the
pruned model's, each measured alike.

A point is one GGUF file: its size; its perplexity over held-out windows of every text source; and the
mean KL divergence of its next-token distribution from the original model's float one, at every
position of those windows. The original's float distribution (its f32 GGUF in llama.cpp, with an f32
KV cache) is computed once and stored as float16 log-probabilities ``[positions, vocab]``
(``write_reference``); every point reads it back, so one llama.cpp pass over the windows gives a point
both numbers. Speed is ``gguf_bench.speed``: pp512 and tg128, a pruned point against the original's
point of the same type, A B B A.

``pareto`` marks the points that no other point beats on both axes; ``headline`` says in one
sentence what the frontier shows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
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
from validation.gguf_parity import gguf_type_of
from validation.perplexity import window_nll, windows_digest

__all__ = ["frontier_windows", "headline", "measure_point", "pareto", "write_reference"]

log = get_logger(__name__)


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
) -> dict:
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
    return {
        "file": str(out),
        "model": str(f32_gguf),
        "positions": row,
        "windows_sha256": {source: windows_digest(w) for source, w in windows.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def _kl_sum(reference: np.ndarray, logits: np.ndarray) -> float:
    """Summed KL(reference ‖ logits) over the rows (float32 per row, summed in float64). The stored
    float16 log-probabilities are normalised again, so the reference is an exact distribution."""
    p_log = torch.log_softmax(torch.from_numpy(np.asarray(reference, dtype=np.float32)), -1)
    q_log = torch.log_softmax(torch.from_numpy(logits), -1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).double().sum())


def measure_point(
    gguf_file: str | Path,
    windows: Mapping[str, torch.Tensor],
    reference: Mapping[str, Any],
    threads: int,
    *,
    recorded_as: str | Path | None = None,
) -> dict[str, Any]:
    """Size, and per source perplexity and mean KL to the reference (``write_reference``'s record), of one
    GGUF over ``windows``; ``recorded_as`` is the path the result names (where a staged file will be)."""
    gguf_file = Path(gguf_file)
    digests = {source: windows_digest(w) for source, w in windows.items()}
    if digests != reference["windows_sha256"]:
        raise ConfigError(
            f"{gguf_file.name}: the reference log-probabilities were made on other windows",
            hint="measure the original's points again (--force)",
        )
    stored = np.load(reference["file"], mmap_mode="r")
    if stored.shape[0] != _positions(windows):
        raise ConfigError(
            f"{reference['file']} holds {stored.shape[0]} positions, the windows have {_positions(windows)}"
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
        source: {
            "ppl": perplexity_of(s["nll"], s["count"]),
            "kl": s["kl"] / s["count"],
            "tokens": s["count"],
        }
        for source, s in sums.items()
    }
    total = sum(s["count"] for s in sums.values())
    return {
        "file": str(recorded_as or gguf_file),
        "type": gguf_type_of(gguf_file),
        "size_bytes": gguf_file.stat().st_size,
        "block_count": describe_gguf(gguf_file)["block_count"],
        "sources": per_source,
        # All sources' windows pooled: exp of the mean NLL over every predicted token.
        "ppl": perplexity_of(sum(s["nll"] for s in sums.values()), total),
        "kl": sum(s["kl"] for s in sums.values()) / total,
        "tokens": total,
        "seconds": round(time.perf_counter() - started, 1),
    }


def pareto(points: Sequence[tuple[float, float]], *, higher_x_is_better: bool) -> list[bool]:
    """For each ``(x, perplexity)``: whether no other point is at least as good on both and better on
    one (lower perplexity; lower x, or higher where ``higher_x_is_better``)."""
    sign = -1.0 if higher_x_is_better else 1.0

    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        ax, bx = sign * a[0], sign * b[0]
        return ax <= bx and a[1] <= b[1] and (ax < bx or a[1] < b[1])

    return [not any(beats(other, p) for other in points if other is not p) for p in points]


def _nearest_pair(
    pruned: Sequence[dict[str, Any]], original: Sequence[dict[str, Any]], key: str
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The pruned and original points closest on ``key`` (relative difference)."""
    pairs = [(p, o) for p in pruned for o in original if p.get(key) and o.get(key)]
    if not pairs:
        return None
    return min(pairs, key=lambda pair: abs(math.log(pair[0][key] / pair[1][key])))


def _name(point: dict[str, Any]) -> str:
    return point["type"].upper()


def _winner(pruned: dict[str, Any], original: dict[str, Any]) -> str:
    better = "the pruned file" if pruned["ppl"] < original["ppl"] else "the original's"
    return f"{better} is the better one there"


def headline(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence from the numbers: the pruned point and the original's point nearest in file size,
    then nearest in tg128 speed, with their perplexities (``rows``: ``model``, ``type``, ``size_mib``,
    ``ppl``, ``tg_tokens_per_s``)."""
    pruned = [r for r in rows if r["model"] == "pruned"]
    original = [r for r in rows if r["model"] == "original"]
    parts = []
    by_size = _nearest_pair(pruned, original, "size_mib")
    if by_size:
        p, o = by_size
        parts.append(
            f"At about {p['size_mib']:.3g} MiB the pruned {_name(p)} ({p['size_mib']:.1f} MiB) has "
            f"perplexity {p['ppl']:.2f} where the original's {_name(o)} ({o['size_mib']:.1f} MiB) has "
            f"{o['ppl']:.2f}: {_winner(p, o)}"
        )
    by_speed = _nearest_pair(pruned, original, "tg_tokens_per_s")
    if by_speed:
        p, o = by_speed
        parts.append(
            f"at about {p['tg_tokens_per_s']:.3g} tokens/s of tg128 the pruned {_name(p)} has "
            f"{p['ppl']:.2f} where the original's {_name(o)} ({o['tg_tokens_per_s']:.0f} tokens/s) has "
            f"{o['ppl']:.2f}: {_winner(p, o)}"
        )
    return ("; ".join(parts) + ".") if parts else ""
