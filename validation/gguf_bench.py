"""Perplexity and speed in llama.cpp, original vs pruned: ``rmexport bench gguf``.

Perplexity: llama.cpp's logits over the SAME held-out windows every backend uses
(``heldout_windows``) and the same ``perplexity`` function as PyTorch; llama-perplexity is not
used because it chunks text its own way. Speed: ``validation.speed``'s protocol (llama-bench's
pp512 and tg128, original and pruned alternating round by round until the median speed-up
settles), timed around libllama's decode through llama-cpp-python, both models loaded once with
the same threads, context and batch. Each phase's speed-up is shown next to its ideal, the FLOP
ratio of what llama.cpp computes in that phase (``validation.flops``).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.gguf_export import describe_gguf
from rmexport import llamacpp as llama_cpp_tools
from rmexport.calib.corpus import load_corpus
from rmexport.calib.tokens import heldout_windows
from rmexport.errors import ConfigError
from rmexport.log import get_logger
from rmexport.sysinfo import machine_info, usable_cores
from validation.gguf_parity import gguf_type_of
from validation.perplexity import measured_on, perplexity, torch_forward, windows_digest

from . import speed as speed_protocol
from .flops import ModelShape, ideal_speedups

__all__ = [
    "DEFAULT_PROTOCOL",
    "bench_gguf",
    "format_table",
    "gguf_perplexity",
    "llama_cpp_forward",
    "speed",
]

log = get_logger(__name__)

DEFAULT_PROTOCOL = speed_protocol.SpeedProtocol(prompt_tokens=(512,), gen_tokens=128)
_VERSIONS = ("llama-cpp-python", "gguf", "numpy")


def llama_cpp_forward(model: Any):
    """``forward(ids[B, T]) -> logits[B, T, V]`` for ``validation.perplexity`` (one row at a time)."""

    def forward(ids: torch.Tensor) -> np.ndarray:
        return np.stack([llama_cpp_tools.eval_logits(model, row.tolist()) for row in ids])

    return forward


def _prompt_phase(model: Any, tokens: list[int]) -> speed_protocol.Phase:
    """pp: the whole prompt in one batch from an empty cache (logits of the last position only).
    ``reset`` sets n_tokens = 0, so the next eval drops the whole KV cache, untimed."""
    return speed_protocol.Phase(
        step=lambda _k: speed_protocol.timed(lambda: model.eval(tokens)), reset=model.reset
    )


def _generation_phase(model: Any, tokens: list[int]) -> speed_protocol.Phase:
    """tg: one token per decode from an empty cache, as llama-bench's tg test."""
    return speed_protocol.Phase(
        step=lambda k: speed_protocol.timed(lambda: model.eval([tokens[k]])),
        steps=len(tokens),
        reset=model.reset,
    )


def speed(
    original: str | Path, pruned: str | Path, protocol: speed_protocol.SpeedProtocol = DEFAULT_PROTOCOL
) -> dict[str, Any]:
    """The speed protocol on two GGUF files in llama.cpp, with each phase's ideal speed-up."""
    paths = {"original": Path(original), "pruned": Path(pruned)}
    threads = protocol.resolved_threads()
    context = protocol.context
    with contextlib.ExitStack() as stack:
        models = {
            role: stack.enter_context(llama_cpp_tools.open_model(path, n_ctx=context, n_threads=threads))
            for role, path in paths.items()
        }
        vocab = min(model.n_vocab() for model in models.values())
        ids = np.random.default_rng(0).integers(min(10, vocab - 1), vocab, size=context).tolist()
        phases = {
            role: {
                name: (_prompt_phase if name.startswith("pp") else _generation_phase)(model, ids[:tokens])
                for name, tokens in protocol.phases.items()
            }
            for role, model in models.items()
        }
        result = speed_protocol.run_protocol(phases["original"], phases["pruned"], protocol)
        # llama.cpp may round the context up (to a multiple of 256); record what it used.
        actual_ctx = {role: model.n_ctx() for role, model in models.items()}
    shapes = {role: ModelShape.from_gguf(path) for role, path in paths.items()}
    ideals = ideal_speedups(shapes["original"], shapes["pruned"], protocol.phases, prompt_head="last")
    result["settings"] = {
        "n_ctx_requested": context,
        "n_ctx": actual_ctx,
        "n_batch": context,
        "n_ubatch": context,
        "n_threads": threads,
    }
    return speed_protocol.attach_ideal(result, ideals)


class _LlamaTokenizer:
    """Just enough of an HF tokenizer for ``heldout_windows``, backed by a GGUF's own tokenizer."""

    def __init__(self, model: Any):
        self._model = model
        self.bos_token_id = model.token_bos() if model.token_bos() >= 0 else None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": llama_cpp_tools.tokenize(self._model, text)}


def _is_gguf(spec: str | Path) -> bool:
    return str(spec).lower().endswith(".gguf")


def _block_count(path: Path) -> int | None:
    return describe_gguf(path)["block_count"]


def _windows(original: str | Path, pruned: str | Path, eval_tokens: int, window: int) -> torch.Tensor:
    corpus = load_corpus("builtin")
    checkpoint = next((s for s in (original, pruned) if not _is_gguf(s)), None)
    if checkpoint is not None:
        from transformers import AutoTokenizer

        return heldout_windows(corpus, AutoTokenizer.from_pretrained(str(checkpoint)), eval_tokens, window)
    with llama_cpp_tools.open_model(original, n_ctx=64) as model:
        return heldout_windows(corpus, _LlamaTokenizer(model), eval_tokens, window)


def _torch_ppl(checkpoint: Path, windows: torch.Tensor) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    return perplexity(torch_forward(model), windows, batch_size=1, desc="PyTorch perplexity").as_dict()


# (HF checkpoint, GGUF file to write, GGUF type) -> the file written; the caller supplies the writer.
Exporter = Callable[[Path, Path, str], Path]


def _gguf_file(spec: str | Path, gguf_type: str, work_dir: Path, role: str, export: Exporter | None) -> Path:
    if _is_gguf(spec):
        return Path(spec)
    if export is None:
        raise ConfigError(f"--{role} {spec} is not a GGUF file", hint="give GGUF files, or export them first")
    return export(Path(spec), work_dir / f"{role}-{gguf_type}.gguf", gguf_type)


def _quality(path: Path, windows: torch.Tensor, n_threads: int) -> dict[str, Any]:
    """Size, blocks and perplexity of one GGUF over the held-out windows (and their digest)."""
    f32 = gguf_type_of(path) == "f32"  # f32 weights: keep the KV cache in f32 too, as parity does
    with llama_cpp_tools.open_model(
        path, n_ctx=windows.shape[1], n_threads=n_threads, logits_all=True, f32_kv_cache=f32
    ) as model:
        ppl = perplexity(
            llama_cpp_forward(model), windows, batch_size=1, desc=f"llama.cpp perplexity {path.name}"
        )
    result = {"file": str(path), "size_bytes": path.stat().st_size, "block_count": _block_count(path)}
    result.update(ppl.as_dict())
    result["windows_sha256"] = windows_digest(windows)
    return result


def _earlier_measurement(
    earlier: Sequence[dict[str, Any]], path: Path, windows: torch.Tensor
) -> dict[str, Any] | None:
    """The measurement of ``path`` among ``earlier`` ones, if it was made on this file and these windows."""
    size = path.stat().st_size
    return next(
        (m for m in earlier if measured_on(m, path, windows, "file") and m["size_bytes"] == size), None
    )


def gguf_perplexity(
    path: str | Path, *, eval_tokens: int = 2048, window: int = 512, threads: int = 0
) -> dict[str, Any]:
    """What ``bench_gguf`` measures of one GGUF besides speed: size, blocks and held-out perplexity.
    The original's never changes between runs, so a pipeline measures it once per model and hands
    it back to ``bench_gguf(original_quality=...)``."""
    path = Path(path)
    return _quality(path, _windows(path, path, eval_tokens, window), threads or usable_cores())


def bench_gguf(
    original: str | Path,
    pruned: str | Path,
    *,
    types: tuple[str, ...] = ("f16", "q4_k_m"),
    eval_tokens: int = 2048,
    window: int = 512,
    protocol: speed_protocol.SpeedProtocol = DEFAULT_PROTOCOL,
    torch_reference: bool = True,
    work_dir: str | Path | None = None,
    export: Exporter | None = None,
    original_quality: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Perplexity, speed and size of original vs pruned in llama.cpp, per GGUF type.

    ``original`` and ``pruned`` are GGUF files, or HF checkpoints that ``export`` writes as a GGUF
    of each of ``types`` into ``work_dir`` (a benchmark measures; it does not convert by itself).
    ``original_quality`` (``gguf_perplexity`` of original GGUF files) is used instead of measuring
    an original again when it was measured on the same file and the same windows."""
    file_types = {gguf_type_of(s) for s in (original, pruned) if _is_gguf(s)}
    if len(file_types) > 1:
        raise ConfigError(f"--original and --pruned GGUF files have different types: {sorted(file_types)}")
    if file_types:
        types = tuple(file_types)
    threads = protocol.resolved_threads()
    windows = _windows(original, pruned, eval_tokens, window)
    result: dict[str, Any] = {
        "original": str(original),
        "pruned": str(pruned),
        "windows": int(windows.shape[0]),
        "window_tokens": window,
        "n_threads": threads,
        "library": llama_cpp_tools.library_info(),
        "machine": machine_info(*_VERSIONS, threads=threads),
        "torch": {},
        "types": {},
    }
    if torch_reference:
        for role, spec in (("original", original), ("pruned", pruned)):
            if not _is_gguf(spec):
                result["torch"][role] = _torch_ppl(Path(spec), windows)
    with tempfile.TemporaryDirectory(prefix="rmexport-bench-") as scratch:
        folder = Path(work_dir) if work_dir else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for gguf_type in types:
            paths = {
                role: _gguf_file(spec, gguf_type, folder, role, export)
                for role, spec in (("original", original), ("pruned", pruned))
            }
            entry: dict[str, Any] = {}
            for role, path in paths.items():
                earlier = (
                    _earlier_measurement(original_quality, path, windows) if role == "original" else None
                )
                if earlier is not None:
                    log.info(
                        "llama.cpp perplexity of %s: %.3f (measured once per model)",
                        path.name,
                        earlier["ppl"],
                    )
                entry[role] = earlier or _quality(path, windows, threads)
            entry["size_ratio"] = entry["pruned"]["size_bytes"] / entry["original"]["size_bytes"]
            entry["speed"] = speed(paths["original"], paths["pruned"], protocol)
            for phase, measured in entry["speed"]["phases"].items():
                log.info(
                    "%s %s: x%.2f (ideal x%.2f) over %d rounds",
                    gguf_type,
                    phase,
                    measured["speedup"]["median"],
                    measured["ideal"],
                    entry["speed"]["rounds"],
                )
            result["types"][gguf_type] = entry
    return result


def format_table(result: dict[str, Any]) -> str:
    header = f"{'type':<7} {'model':<9} {'blocks':>6} {'MiB':>7} {'ppl':>9} {'torch ppl':>9}"
    lines = [
        f"{result['windows']} windows x {result['window_tokens']} tokens, {result['n_threads']} threads",
        header,
        "-" * len(header),
    ]
    for gguf_type, entry in result["types"].items():
        for role in ("original", "pruned"):
            r = entry[role]
            torch_ppl = result["torch"].get(role, {}).get("ppl")
            torch_text = "-" if torch_ppl is None else f"{torch_ppl:.3f}"
            lines.append(
                f"{gguf_type:<7} {role:<9} {r['block_count'] or '?':>6} {r['size_bytes'] / 2**20:>7.1f} "
                f"{r['ppl']:>9.3f} {torch_text:>9}"
            )
    for gguf_type, entry in result["types"].items():
        lines += ["", f"{gguf_type} speed:", *speed_protocol.format_phases(entry["speed"])]
    return "\n".join(lines)
