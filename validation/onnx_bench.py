"""Original vs pruned ONNX exports in onnxruntime: held-out perplexity and speed.

- Perplexity: ``validation.perplexity.perplexity`` over ``heldout_windows`` (the same windows and
  the same computation as the PyTorch and llama.cpp numbers), logits from the plain session.
- Speed: ``validation.speed``'s protocol, the same as in llama.cpp: prefill of 128 and 512
  tokens (batch 1, empty cache) and generation of 128 tokens one at a time from an empty cache
  through the KV cache with IO binding (the cache stays in onnxruntime buffers); original and
  pruned sessions are created once, with the same threads, and alternate round by round until
  the median speed-up settles.
- Ideal: the FLOP ratio of what the graph computes in each phase (``validation.flops``). An
  exported graph that returns logits for every position runs the LM head on the whole prompt,
  so its prefill ideal is below L/N, like generation's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rmexport.calib.corpus import load_corpus
from rmexport.calib.tokens import heldout_windows
from rmexport.errors import ConfigError, ModelLoadError
from rmexport.records import Evaluation, JsonObject, from_jsonable
from rmexport.sysinfo import MachineInfo, describe_machine, usable_cores

from . import speed as speed_protocol
from .flops import ModelShape, ideal_speedups
from .ort_decoder import OrtDecoder
from .perplexity import measured_here, perplexity, windows_digest

__all__ = [
    "DEFAULT_PROTOCOL",
    "OnnxBench",
    "OnnxQuality",
    "format_table",
    "measure_onnx",
    "onnx_quality",
]

log = logging.getLogger(__name__)

DEFAULT_EVAL_TOKENS = 4096
DEFAULT_PROTOCOL = speed_protocol.SpeedProtocol(prompt_tokens=(512,), gen_tokens=128)
_VERSIONS = ("onnxruntime", "onnxruntime-gpu", "onnx", "optimum-onnx", "torch", "transformers", "numpy")


@dataclass(frozen=True)
class OnnxQuality:
    """One export's size and held-out perplexity, with the digest of the windows it was measured on."""

    onnx_dir: str
    num_hidden_layers: int
    providers: list[str]
    size_bytes: int
    ppl: float
    mean_nll: float
    tokens: int
    windows: int
    windows_sha256: str

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> OnnxQuality:
        return from_jsonable(cls, data)


@dataclass(frozen=True)
class OnnxBench:
    """``measure_onnx``'s result; ``to_json()`` is ``checks/onnx_bench.json``."""

    backend: str
    eval: Evaluation
    threads: int
    machine: MachineInfo
    models: dict[str, OnnxQuality]  # "original", "pruned"
    ppl_ratio: float  # pruned over original
    size_ratio: float
    speed: speed_protocol.SpeedRun  # with each phase's ideal

    def to_json(self) -> JsonObject:
        return asdict(self) | {"speed": self.speed.to_json()}

    @classmethod
    def from_json(cls, data: JsonObject) -> OnnxBench:
        return from_jsonable(cls, data)


def _prompt_phase(decoder: OrtDecoder, ids: np.ndarray) -> speed_protocol.Phase:
    return speed_protocol.Phase(step=lambda _k: speed_protocol.timed(lambda: decoder.prefill(ids)))


def _generation_phase(decoder: OrtDecoder, first: int, tokens: int) -> speed_protocol.Phase:
    """``tokens`` single-token steps from an empty cache: the first token, then tokens - 1 decodes."""
    steps: Iterator[None] = iter(())

    def reset() -> None:
        nonlocal steps
        steps = decoder.decode_steps(first)

    return speed_protocol.Phase(
        step=lambda _k: speed_protocol.timed(lambda: next(steps)), steps=tokens, reset=reset
    )


def _head_positions(decoder: OrtDecoder, ids: np.ndarray) -> str:
    """``all`` when the graph returns logits for every position of a prompt, else ``last``."""
    return "all" if decoder.forward(ids[None, :2]).shape[1] == 2 else "last"


def speed(decoders: dict[str, OrtDecoder], protocol: speed_protocol.SpeedProtocol) -> speed_protocol.SpeedRun:
    """The speed protocol on two loaded ``OrtDecoder``s, with each phase's ideal speed-up."""
    vocab = min(int(d.config["vocab_size"]) for d in decoders.values())
    ids = np.random.default_rng(0).integers(min(10, vocab - 1), vocab, size=protocol.context, dtype=np.int64)
    phases = {
        role: {
            name: _prompt_phase(decoder, ids[:tokens])
            if name.startswith("pp")
            else _generation_phase(decoder, int(ids[0]), tokens)
            for name, tokens in protocol.phases.items()
        }
        for role, decoder in decoders.items()
    }
    run = speed_protocol.measure_speed(phases["original"], phases["pruned"], protocol)
    heads = {role: _head_positions(d, ids) for role, d in decoders.items()}
    if heads["original"] != heads["pruned"]:
        raise ConfigError(
            f"the original graph computes logits for the {heads['original']} position(s), "
            f"the pruned one for the {heads['pruned']}",
            hint="export both with the same flavor",
        )
    shapes = {role: ModelShape.from_config(d.config) for role, d in decoders.items()}
    ideals = ideal_speedups(
        shapes["original"], shapes["pruned"], protocol.phases, prompt_head=heads["original"]
    )
    settings = {"intra_op_threads": protocol.resolved_threads(), "io_binding": True, "batch": 1}
    return replace(run, settings=settings).with_ideal(ideals)


def _windows(onnx_dir: Path, eval_tokens: int, window: int):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    return heldout_windows(load_corpus("builtin"), tokenizer, eval_tokens, window=window)


def _checked_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "model.onnx").is_file():
        raise ModelLoadError(
            f"no model.onnx in {path}", hint="create it with: rmexport export onnx CKPT --out DIR"
        )
    return path


def _measured(decoder: OrtDecoder, windows: torch.Tensor, role: str) -> OnnxQuality:
    ppl = perplexity(decoder.forward, windows, batch_size=1, desc=f"perplexity {role}")
    log.info("bench onnx: %s (%d blocks) ppl=%.3f", role, decoder.num_layers, ppl.ppl)
    return OnnxQuality(
        onnx_dir=str(decoder.dir),
        num_hidden_layers=decoder.num_layers,
        providers=decoder.session.get_providers(),
        size_bytes=sum(f.stat().st_size for f in decoder.dir.glob("model.onnx*")),
        ppl=ppl.ppl,
        mean_nll=ppl.mean_nll,
        tokens=ppl.n_tokens,
        windows=ppl.n_windows,
        windows_sha256=windows_digest(windows),
    )


def onnx_quality(
    onnx_dir: str | Path, *, eval_tokens: int = DEFAULT_EVAL_TOKENS, window: int = 512, threads: int = 0
) -> OnnxQuality:
    """What ``measure_onnx`` measures of one export besides speed: size and held-out perplexity. The
    original's never changes between runs, so a pipeline measures it once per model and hands it
    back to ``measure_onnx(original_perplexity=...)``."""
    onnx_dir = _checked_dir(onnx_dir)
    windows = _windows(onnx_dir, eval_tokens, window)
    return _measured(OrtDecoder(onnx_dir, threads=threads or usable_cores()), windows, "original")


def measure_onnx(
    original_dir: str | Path,
    pruned_dir: str | Path,
    *,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    window: int = 512,
    protocol: speed_protocol.SpeedProtocol = DEFAULT_PROTOCOL,
    original_perplexity: OnnxQuality | None = None,
) -> OnnxBench:
    """Perplexity and speed of two ONNX exports side by side, each speed-up against its ideal.

    ``original_perplexity`` (from ``onnx_quality``) is used instead of
    measuring the original again when it was measured on the same export and the same windows."""
    original_dir, pruned_dir = _checked_dir(original_dir), _checked_dir(pruned_dir)
    windows = _windows(original_dir, eval_tokens, window)
    if not np.array_equal(windows.numpy(), _windows(pruned_dir, eval_tokens, window).numpy()):
        raise ConfigError(
            "the two exports tokenize the held-out text differently",
            hint="compare a pruned model with the model it was pruned from",
        )
    earlier = original_perplexity
    threads = protocol.resolved_threads()
    paths = {"original": original_dir, "pruned": pruned_dir}
    decoders = {name: OrtDecoder(path, threads=threads) for name, path in paths.items()}
    reusable = earlier is not None and measured_here(
        earlier.onnx_dir, earlier.windows_sha256, original_dir, windows
    )
    models: dict[str, OnnxQuality] = {}
    for name, decoder in decoders.items():
        if name == "original" and reusable:
            log.info("bench onnx: original ppl=%.3f (measured once per model)", earlier.ppl)
            models[name] = earlier
        else:
            models[name] = _measured(decoder, windows, name)
    original, pruned = models["original"], models["pruned"]
    return OnnxBench(
        backend="onnxruntime",
        eval=Evaluation(source="builtin", tokens=original.tokens, window=window),
        threads=threads,
        machine=describe_machine(*_VERSIONS, threads=threads),
        models=models,
        ppl_ratio=pruned.ppl / original.ppl,
        size_ratio=pruned.size_bytes / original.size_bytes,
        speed=speed(decoders, protocol),
    )


def format_table(bench: OnnxBench) -> str:
    """The result as plain text: each model's size and perplexity, then the speed table."""
    machine = bench.machine
    lines = [
        f"onnxruntime {machine.versions.get('onnxruntime')} on {machine.cpu} "
        f"({machine.usable_cores} cores, {bench.threads} threads)",
        f"{'model':<9} {'blocks':>6} {'MiB':>8} {'perplexity':>11}",
    ]
    for role, m in bench.models.items():
        lines.append(f"{role:<9} {m.num_hidden_layers:>6} {m.size_bytes / 2**20:>8.1f} {m.ppl:>11.3f}")
    lines += [
        f"perplexity ratio x{bench.ppl_ratio:.3f}",
        "",
        *speed_protocol.format_phases(bench.speed),
    ]
    return "\n".join(lines)
