"""Typed configurations: what the CLI builds from its arguments and the pipeline and the Python API take.

``PruneOptions`` (``rmexport.prune``) configures one prune; the configs here bundle it with what the
other stages need, and one config per command carries what the CLI read. They are frozen dataclasses
whose fields declare their command-line options (``rmexport.options``): the CLI's arguments, their
help and each value's bounds come from here. The CLI builds them and hands them to its checks
(``rmexport.inputs.check_*_args``), which turn every bad value into a one-line ``RMExportError``
before any work. Paths stay as the user typed them (they appear so in messages and results).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from converters.gguf_export import GGUF_TYPES
from converters.onnx_export import DTYPES, FLAVORS, PRECISIONS
from validation.onnx_bench import DEFAULT_EVAL_TOKENS as ONNX_EVAL_TOKENS
from validation.onnx_parity import DEFAULT_NEW_TOKENS, DEFAULT_PROMPT_TOKENS, DEFAULT_PROMPTS

from .models import DEFAULT_MODEL
from .options import REQUIRED, option
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

ONNX_FLAVORS = FLAVORS
ONNX_DTYPES = DTYPES
# One set of held-out windows for every backend of a run, so the report compares like with like.
# 4,096 tokens (8 windows) per text source: the pruned and original models are compared on the
# same windows, so the gaps the report shows (tens of percent) are far above this sample's noise.
RUN_EVAL_TOKENS = 4096
# The prune options whose default differs in ``rmexport run`` (its --help and the README say so).
RUN_PRUNE_DEFAULTS = {"eval_tokens": RUN_EVAL_TOKENS, "ood_tokens": RUN_EVAL_TOKENS}
_MODEL_HELP = "alias, hub id, HF directory or .gguf file"


@dataclass(frozen=True)
class ExportONNXConfig:
    dtype: str = option("fp32", "--dtype", "activation/weight dtype", choices=DTYPES)
    flavor: str = option(
        "optimum",
        "--flavor",
        "optimum: standard ops, ORTModelForCausalLM; genai: onnxruntime-genai builder (fused ops)",
        choices=FLAVORS,
    )
    # genai weights: int4, or None for the same as dtype
    precision: str | None = option(
        None, "--precision", "weights; int4 needs --flavor genai", choices=PRECISIONS
    )


@dataclass(frozen=True)
class ExportGGUFConfig:
    type: str = option(
        "f16",
        "--type",
        "f32, f16, bf16, q8_0 (written directly) or any type llama.cpp's quantizer makes: "
        + ", ".join(t for t in GGUF_TYPES if GGUF_TYPES[t].by_llama_cpp),
        metavar="TYPE",
        choices=GGUF_TYPES,
    )
    imatrix: str | None = option(
        None,  # auto at 4 bits and fewer, else none
        "--imatrix",
        "importance matrix for llama.cpp's quantizer: auto computes it with llama-imatrix from the "
        "calibration text of the prune (prune.json beside the checkpoint; else the default mixture) and "
        "writes it beside the GGUF as <name>.imatrix.gguf; FILE reuses one",
        metavar="auto|FILE|none",
        shown_default="auto for types of 4 bits and fewer, none above",
    )


@dataclass(frozen=True)
class RunConfig:
    """``rmexport run``: prune, export ONNX and GGUF, validate, benchmark, report."""

    model: str = option(DEFAULT_MODEL, "MODEL", _MODEL_HELP, positional=True)
    prune: PruneOptions = field(default_factory=lambda: PruneOptions(**RUN_PRUNE_DEFAULTS))
    out_root: Path = option(Path("out"), "--out-root", "results go to OUT_ROOT/<model>-r<ratio>/", parse=Path)
    force: bool = option(False, "--force", "redo every stage even if its inputs did not change")
    onnx_flavor: str = option("optimum", "--onnx-flavor", "optimum or genai", choices=ONNX_FLAVORS)
    onnx_dtype: str = option("fp32", "--onnx-dtype", "ONNX weights", choices=ONNX_DTYPES)
    gguf_type: str = option(
        "f16",
        "--gguf-type",
        "GGUF type checked for parity: "
        + ", ".join(GGUF_TYPES)
        + "; benchmarked with q4_k_m, except that a quantized GGUF source is benchmarked in its own type "
        "only, against the source file",
    )
    skip_onnx: bool = option(False, "--skip-onnx", "no ONNX export")
    skip_gguf: bool = option(False, "--skip-gguf", "no GGUF export")
    skip_bench: bool = option(False, "--skip-bench", "no perplexity/latency benchmarks in the runtimes")
    frontier: bool | None = option(
        None,
        "--frontier",
        "size, perplexity, KL and speed of a ladder of llama.cpp types (Q8_0 to Q2_K and the source's "
        "own), original and pruned: prune, or quantize harder?",
        kind="switch",
        shown_default="on for a GGUF source, as the default model is; off otherwise and with --skip-bench",
    )
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


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """``rmexport prune``: prune ``model`` into ``out`` (``hf/`` and ``prune.json``)."""

    model: str = option(DEFAULT_MODEL, "MODEL", _MODEL_HELP, positional=True)
    out: Path = option(REQUIRED, "--out", "output folder; gets hf/ and prune.json", parse=Path)
    prune: PruneOptions = field(default_factory=PruneOptions)


@dataclass(frozen=True)
class ValidateONNXConfig:
    """``rmexport validate onnx``: an ONNX export against the checkpoint it was made from."""

    onnx_dir: str = option(REQUIRED, "ONNX_DIR", "folder written by `rmexport export onnx`", positional=True)
    reference: str = option(REQUIRED, "--reference", "the HF checkpoint the export was made from")
    prompts: int = option(DEFAULT_PROMPTS, "--prompts", "held-out prompts", kind="count")
    prompt_tokens: int = option(
        DEFAULT_PROMPT_TOKENS, "--prompt-tokens", "tokens per prompt", kind="count", minimum=2
    )
    new_tokens: int = option(DEFAULT_NEW_TOKENS, "--new-tokens", "greedy tokens to compare", kind="count")
    json: str | None = option(None, "--json", "also write the result to this JSON file")


@dataclass(frozen=True)
class ValidateGGUFConfig:
    """``rmexport validate gguf``: a GGUF file in llama.cpp against the checkpoint it came from."""

    gguf_file: str = option(REQUIRED, "GGUF_FILE", "GGUF file to check", positional=True)
    reference: str = option(REQUIRED, "--reference", "HF checkpoint it was written from", metavar="CKPT")
    prompts: int = option(4, "--prompts", "held-out prompts", kind="count")
    tokens: int = option(96, "--tokens", "tokens per prompt incl. BOS", kind="count", minimum=2)
    new_tokens: int = option(32, "--new-tokens", "greedy tokens to compare", kind="count")
    threads: int = option(2, "--threads", "llama.cpp threads", kind="count")
    report_only: bool = option(False, "--report-only", "report, do not fail on tolerances")
    json: str | None = option(None, "--json", "also write the result as JSON", metavar="FILE")


@dataclass(frozen=True)
class BenchONNXConfig:
    """``rmexport bench onnx``: perplexity and speed of two ONNX exports in onnxruntime."""

    original: str = option(REQUIRED, "--original", "ONNX export of the original model")
    pruned: str = option(REQUIRED, "--pruned", "ONNX export of the pruned model")
    eval_tokens: int = option(ONNX_EVAL_TOKENS, "--eval-tokens", "held-out tokens for PPL", kind="count")
    window: int = option(512, "--window", "perplexity window", kind="count")
    json: str | None = option(None, "--json", "write the result to this JSON file")
    protocol: SpeedProtocol = field(default_factory=SpeedProtocol)


@dataclass(frozen=True)
class BenchGGUFConfig:
    """``rmexport bench gguf``: perplexity and speed of two models (GGUF or checkpoint) in llama.cpp."""

    original: str = option(REQUIRED, "--original", "unpruned model: .gguf or HF dir", metavar="FILE_OR_CKPT")
    pruned: str = option(REQUIRED, "--pruned", "pruned model: .gguf or HF dir", metavar="FILE_OR_CKPT")
    # comma-separated GGUF types for checkpoints, as typed (checked in rmexport.inputs)
    types: str = option("f16,q4_k_m", "--types", "GGUF types for checkpoints")
    eval_tokens: int = option(2048, "--eval-tokens", "held-out tokens for perplexity", kind="count")
    window: int = option(512, "--window", "tokens per perplexity window", kind="count")
    torch_reference: bool = option(True, "--no-torch", "skip the PyTorch perplexity reference", negate=True)
    work_dir: str | None = option(
        None, "--work-dir", "keep the exported GGUFs here", shown_default="a temporary folder"
    )
    json: str | None = option(None, "--json", "write the result as JSON", metavar="FILE")
    protocol: SpeedProtocol = field(default_factory=SpeedProtocol)


def ratio_label(ratio: float | None, layers: int | None) -> str:
    """How a run folder names the cut: ``0.25``, or ``8l`` for ``--layers 8``."""
    return f"{ratio:g}" if layers is None else f"{layers}l"
