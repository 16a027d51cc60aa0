"""Typed configurations: what the CLI builds from its arguments and the pipeline and the Python API take.

``PruneOptions`` (``rmexport.prune``) configures one prune; the configs here bundle it with what the
other stages need, and one config per command carries what the CLI read. They are plain frozen
dataclasses; the CLI builds them and hands them to its checks (``rmexport.inputs.check_*_args``),
which turn every bad value into a one-line ``RMExportError`` before any work. Paths stay as the user
typed them (they appear so in messages and results).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .models import DEFAULT_MODEL
from .prune import PruneOptions
from .speed_settings import SpeedProtocol, SpeedRounds

__all__ = [
    "ONNX_DTYPES",
    "ONNX_FLAVORS",
    "RUN_EVAL_TOKENS",
    "RUN_PRUNE_DEFAULTS",
    "BenchGGUFConfig",
    "BenchONNXConfig",
    "ExportGGUFConfig",
    "ExportONNXConfig",
    "PruneConfig",
    "RunConfig",
    "ValidateGGUFConfig",
    "ValidateONNXConfig",
    "ratio_label",
]

ONNX_FLAVORS = ("optimum", "genai")
ONNX_DTYPES = ("fp32", "fp16")
# One set of held-out windows for every backend of a run, so the report compares like with like.
# 4,096 tokens (8 windows) per text source: the pruned and original models are compared on the
# same windows, so the gaps the report shows (tens of percent) are far above this sample's noise.
RUN_EVAL_TOKENS = 4096
# The prune options whose default differs in ``rmexport run`` (its --help and the README say so).
RUN_PRUNE_DEFAULTS = {"eval_tokens": RUN_EVAL_TOKENS, "ood_tokens": RUN_EVAL_TOKENS}


@dataclass(frozen=True)
class ExportONNXConfig:
    dtype: str = "fp32"
    flavor: str = "optimum"
    precision: str | None = None  # genai weights: int4, or None for the same as dtype


@dataclass(frozen=True)
class ExportGGUFConfig:
    type: str = "f16"
    imatrix: str | None = None  # auto, none or a file; None: auto at 4 bits and fewer, else none


@dataclass(frozen=True)
class RunConfig:
    """``rmexport run``: prune, export ONNX and GGUF, validate, benchmark, report."""

    model: str = DEFAULT_MODEL
    prune: PruneOptions = field(default_factory=lambda: PruneOptions(**RUN_PRUNE_DEFAULTS))
    out_root: Path = Path("out")
    force: bool = False
    onnx_flavor: str = "optimum"
    onnx_dtype: str = "fp32"
    gguf_type: str = "f16"
    skip_onnx: bool = False
    skip_gguf: bool = False
    skip_bench: bool = False
    speed: SpeedRounds = field(default_factory=SpeedRounds)

    @property
    def ratio(self) -> float | None:
        return self.prune.ratio

    @property
    def layers(self) -> int | None:
        return self.prune.layers

    @property
    def blocks(self) -> int:
        return self.prune.blocks

    @property
    def eval_tokens(self) -> int:
        return self.prune.eval_tokens

    @property
    def ratio_label(self) -> str:
        return ratio_label(self.ratio, self.layers)


@dataclass(frozen=True)
class PruneConfig:
    """``rmexport prune``: prune ``model`` into ``out`` (``hf/`` and ``prune.json``)."""

    model: str
    out: Path
    prune: PruneOptions = field(default_factory=PruneOptions)


@dataclass(frozen=True)
class ValidateONNXConfig:
    """``rmexport validate onnx``: an ONNX export against the checkpoint it was made from."""

    onnx_dir: str
    reference: str
    prompts: int
    prompt_tokens: int
    new_tokens: int
    json: str | None = None


@dataclass(frozen=True)
class ValidateGGUFConfig:
    """``rmexport validate gguf``: a GGUF file in llama.cpp against the checkpoint it came from."""

    gguf_file: str
    reference: str
    prompts: int
    tokens: int  # per prompt, BOS included
    new_tokens: int
    threads: int
    report_only: bool = False
    json: str | None = None


@dataclass(frozen=True)
class BenchONNXConfig:
    """``rmexport bench onnx``: perplexity and speed of two ONNX exports in onnxruntime."""

    original: str
    pruned: str
    eval_tokens: int
    window: int
    protocol: SpeedProtocol
    json: str | None = None


@dataclass(frozen=True)
class BenchGGUFConfig:
    """``rmexport bench gguf``: perplexity and speed of two models (GGUF or checkpoint) in llama.cpp."""

    original: str
    pruned: str
    types: str  # comma-separated GGUF types for checkpoints, as typed
    eval_tokens: int
    window: int
    protocol: SpeedProtocol
    torch_reference: bool = True
    work_dir: str | None = None
    json: str | None = None


def ratio_label(ratio: float | None, layers: int | None) -> str:
    """How a run folder names the cut: ``0.25``, or ``8l`` for ``--layers 8``."""
    return f"{ratio:g}" if layers is None else f"{layers}l"
