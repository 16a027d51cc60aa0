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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.gguf_export import summarize_gguf
from rmexport import llamacpp as llama_cpp_tools
from rmexport.calib.corpus import load_corpus
from rmexport.calib.tokens import heldout_windows
from rmexport.errors import ConfigError
from rmexport.log import get_logger
from rmexport.records import JsonObject, from_jsonable
from rmexport.sysinfo import MachineInfo, describe_machine, usable_cores
from validation.gguf_parity import gguf_type_of
from validation.perplexity import PerplexityResult, measured_here, perplexity, torch_forward, windows_digest

from . import speed as speed_protocol
from .flops import ModelShape, ideal_speedups

__all__ = [
    "DEFAULT_PROTOCOL",
    "GGUFBench",
    "GGUFQuality",
    "GGUFTypeBench",
    "HeldoutPerplexity",
    "bench_gguf",
    "format_table",
    "gguf_perplexity",
    "llama_cpp_forward",
    "measure_speed",
    "speed",
]

log = get_logger(__name__)

DEFAULT_PROTOCOL = speed_protocol.SpeedProtocol(prompt_tokens=(512,), gen_tokens=128)
_VERSIONS = ("llama-cpp-python", "gguf", "numpy")


@dataclass(frozen=True)
class HeldoutPerplexity:
    """Perplexity over the held-out windows (a PyTorch reference's, beside llama.cpp's)."""

    ppl: float
    mean_nll: float
    tokens: int
    windows: int

    @classmethod
    def of(cls, result: PerplexityResult) -> HeldoutPerplexity:
        return cls(ppl=result.ppl, mean_nll=result.mean_nll, tokens=result.n_tokens, windows=result.n_windows)


@dataclass(frozen=True)
class GGUFQuality:
    """One GGUF's size, blocks and held-out perplexity, with the digest of the windows it was measured on."""

    file: str
    size_bytes: int
    block_count: int | None
    ppl: float
    mean_nll: float
    tokens: int
    windows: int
    windows_sha256: str

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> GGUFQuality:
        return from_jsonable(cls, data)


@dataclass(frozen=True)
class GGUFTypeBench:
    """Original vs pruned at one GGUF type."""

    original: GGUFQuality
    pruned: GGUFQuality
    size_ratio: float  # pruned over original
    speed: speed_protocol.SpeedRun  # with each phase's ideal and llama.cpp's settings

    def to_json(self) -> JsonObject:
        return asdict(self) | {"speed": self.speed.to_json()}


@dataclass(frozen=True)
class GGUFBench:
    """``bench_gguf``'s result; ``to_json()`` is one type's entry of ``checks/gguf_bench.json``."""

    original: str
    pruned: str
    windows: int
    window_tokens: int
    n_threads: int
    library: dict[str, str | bool]  # llamacpp.library_info
    machine: MachineInfo
    torch: dict[str, HeldoutPerplexity]  # "original", "pruned": of the HF checkpoints given
    types: dict[str, GGUFTypeBench]

    def to_json(self) -> JsonObject:
        return asdict(self) | {"types": {t: entry.to_json() for t, entry in self.types.items()}}

    @classmethod
    def from_json(cls, data: JsonObject) -> GGUFBench:
        return from_jsonable(cls, data)


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


def measure_speed(
    original: str | Path, pruned: str | Path, protocol: speed_protocol.SpeedProtocol = DEFAULT_PROTOCOL
) -> speed_protocol.SpeedRun:
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
        run = speed_protocol.measure_speed(phases["original"], phases["pruned"], protocol)
        # llama.cpp may round the context up (to a multiple of 256); record what it used.
        actual_ctx = {role: model.n_ctx() for role, model in models.items()}
    shapes = {role: ModelShape.from_gguf(path) for role, path in paths.items()}
    ideals = ideal_speedups(shapes["original"], shapes["pruned"], protocol.phases, prompt_head="last")
    settings = {
        "n_ctx_requested": context,
        "n_ctx": actual_ctx,
        "n_batch": context,
        "n_ubatch": context,
        "n_threads": threads,
    }
    return replace(run, settings=settings).with_ideal(ideals)


def speed(
    original: str | Path, pruned: str | Path, protocol: speed_protocol.SpeedProtocol = DEFAULT_PROTOCOL
) -> JsonObject:
    """``measure_speed`` as JSON: the form rmexport/frontier.py stores (until it takes the record itself)."""
    return measure_speed(original, pruned, protocol).to_json()


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
    return summarize_gguf(path).block_count


def _windows(original: str | Path, pruned: str | Path, eval_tokens: int, window: int) -> torch.Tensor:
    corpus = load_corpus("builtin")
    checkpoint = next((s for s in (original, pruned) if not _is_gguf(s)), None)
    if checkpoint is not None:
        from transformers import AutoTokenizer

        return heldout_windows(corpus, AutoTokenizer.from_pretrained(str(checkpoint)), eval_tokens, window)
    with llama_cpp_tools.open_model(original, n_ctx=64) as model:
        return heldout_windows(corpus, _LlamaTokenizer(model), eval_tokens, window)


def _torch_ppl(checkpoint: Path, windows: torch.Tensor) -> HeldoutPerplexity:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    return HeldoutPerplexity.of(
        perplexity(torch_forward(model), windows, batch_size=1, desc="PyTorch perplexity")
    )


# (HF checkpoint, GGUF file to write, GGUF type) -> the file written; the caller supplies the writer.
Exporter = Callable[[Path, Path, str], Path]


def _gguf_file(spec: str | Path, gguf_type: str, work_dir: Path, role: str, export: Exporter | None) -> Path:
    if _is_gguf(spec):
        return Path(spec)
    if export is None:
        raise ConfigError(f"--{role} {spec} is not a GGUF file", hint="give GGUF files, or export them first")
    return export(Path(spec), work_dir / f"{role}-{gguf_type}.gguf", gguf_type)


def _quality(path: Path, windows: torch.Tensor, n_threads: int) -> GGUFQuality:
    """Size, blocks and perplexity of one GGUF over the held-out windows (and their digest)."""
    f32 = gguf_type_of(path) == "f32"  # f32 weights: keep the KV cache in f32 too, as parity does
    with llama_cpp_tools.open_model(
        path, n_ctx=windows.shape[1], n_threads=n_threads, logits_all=True, f32_kv_cache=f32
    ) as model:
        ppl = perplexity(
            llama_cpp_forward(model), windows, batch_size=1, desc=f"llama.cpp perplexity {path.name}"
        )
    return GGUFQuality(
        file=str(path),
        size_bytes=path.stat().st_size,
        block_count=_block_count(path),
        ppl=ppl.ppl,
        mean_nll=ppl.mean_nll,
        tokens=ppl.n_tokens,
        windows=ppl.n_windows,
        windows_sha256=windows_digest(windows),
    )


def _earlier_measurement(
    earlier: Sequence[GGUFQuality], path: Path, windows: torch.Tensor
) -> GGUFQuality | None:
    """The measurement of ``path`` among ``earlier`` ones, if it was made on this file and these windows."""
    size = path.stat().st_size
    return next(
        (
            m
            for m in earlier
            if measured_here(m.file, m.windows_sha256, path, windows) and m.size_bytes == size
        ),
        None,
    )


def gguf_perplexity(
    path: str | Path, *, eval_tokens: int = 2048, window: int = 512, threads: int = 0
) -> GGUFQuality:
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
    original_quality: Sequence[GGUFQuality] = (),
) -> GGUFBench:
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
    library, machine = llama_cpp_tools.library_info(), describe_machine(*_VERSIONS, threads=threads)
    torch_ppl = {}
    if torch_reference:
        for role, spec in (("original", original), ("pruned", pruned)):
            if not _is_gguf(spec):
                torch_ppl[role] = _torch_ppl(Path(spec), windows)
    by_type = {}
    with tempfile.TemporaryDirectory(prefix="rmexport-bench-") as scratch:
        folder = Path(work_dir) if work_dir else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for gguf_type in types:
            paths = {
                role: _gguf_file(spec, gguf_type, folder, role, export)
                for role, spec in (("original", original), ("pruned", pruned))
            }
            quality = {}
            for role, path in paths.items():
                earlier = (
                    _earlier_measurement(original_quality, path, windows) if role == "original" else None
                )
                if earlier is not None:
                    log.info(
                        "llama.cpp perplexity of %s: %.3f (measured once per model)", path.name, earlier.ppl
                    )
                quality[role] = earlier or _quality(path, windows, threads)
            run = measure_speed(paths["original"], paths["pruned"], protocol)
            for phase, measured in run.phases.items():
                log.info(
                    "%s %s: x%.2f (ideal x%.2f) over %d rounds",
                    gguf_type,
                    phase,
                    measured.speedup.median,
                    measured.ideal,
                    run.rounds,
                )
            by_type[gguf_type] = GGUFTypeBench(
                original=quality["original"],
                pruned=quality["pruned"],
                size_ratio=quality["pruned"].size_bytes / quality["original"].size_bytes,
                speed=run,
            )
    return GGUFBench(
        original=str(original),
        pruned=str(pruned),
        windows=int(windows.shape[0]),
        window_tokens=window,
        n_threads=threads,
        library=library,
        machine=machine,
        torch=torch_ppl,
        types=by_type,
    )


def format_table(result: GGUFBench) -> str:
    header = f"{'type':<7} {'model':<9} {'blocks':>6} {'MiB':>7} {'ppl':>9} {'torch ppl':>9}"
    lines = [
        f"{result.windows} windows x {result.window_tokens} tokens, {result.n_threads} threads",
        header,
        "-" * len(header),
    ]
    for gguf_type, entry in result.types.items():
        for role in ("original", "pruned"):
            r = entry.original if role == "original" else entry.pruned
            torch_ppl = result.torch.get(role)
            torch_text = "-" if torch_ppl is None else f"{torch_ppl.ppl:.3f}"
            lines.append(
                f"{gguf_type:<7} {role:<9} {r.block_count or '?':>6} {r.size_bytes / 2**20:>7.1f} "
                f"{r.ppl:>9.3f} {torch_text:>9}"
            )
    for gguf_type, entry in result.types.items():
        lines += ["", f"{gguf_type} speed:", *speed_protocol.format_phases(entry.speed)]
    return "\n".join(lines)
