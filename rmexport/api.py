"""The Python API beside the CLI: ``from rmexport import prune, export_gguf, export_onnx, run``.

Each call takes the same typed configuration the CLI builds from its arguments and returns a typed
result; the CLI is a thin layer over these functions. A model is named as on the command line: an
alias, a hub id, a local HF directory or a ``.gguf`` file.

    from rmexport import ExportGGUFConfig, PruneOptions, export_gguf, prune

    pruned = prune("smollm2-135m", "out/p", PruneOptions(ratio=0.25))
    gguf = export_gguf(pruned.checkpoint, "out/p.gguf", ExportGGUFConfig(type="q8_0"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from converters.gguf_export import describe_gguf
from converters.gguf_export import export_gguf as write_gguf
from converters.onnx_export import export_onnx as write_onnx
from converters.onnx_export import read_export_info

from .config import ExportGGUFConfig, ExportONNXConfig, RunConfig
from .errors import ModelLoadError
from .imatrix_text import resolve_imatrix
from .models import checkpoint_dir, resolve
from .pipeline import run_pipeline
from .prune import PruneOptions
from .prune import prune as prune_model
from .records import JsonObject, PruneRecord

__all__ = [
    "GGUFExport",
    "ONNXExport",
    "PruneResult",
    "RunResult",
    "export_gguf",
    "export_onnx",
    "prune",
    "run",
]


@dataclass(frozen=True)
class PruneResult:
    out_dir: Path
    checkpoint: Path  # the pruned HF checkpoint, out_dir/hf
    record: PruneRecord  # prune.json is its to_json()


@dataclass(frozen=True)
class GGUFExport:
    path: Path
    info: JsonObject  # size, architecture, block count, tensor-type counts


@dataclass(frozen=True)
class ONNXExport:
    path: Path
    info: JsonObject  # what rmexport_onnx.json holds


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    report: JsonObject  # what report.json holds

    @property
    def passed(self) -> bool:
        return bool(self.report.get("all_checks_passed", False))


def _local_checkpoint(model: str | Path) -> Path:
    """Converters take a local HF directory: an alias, hub id or .gguf becomes one (a GGUF source's
    cached conversion, a hub model's downloaded snapshot)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    source = resolve(str(model))
    if source.kind != "hub":
        return Path(checkpoint_dir(source))
    from huggingface_hub import snapshot_download  # ~0.2 s (requests, the hub client): only for a hub id

    try:
        return Path(snapshot_download(source.location))
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not download {source.location} ({type(e).__name__})",
            hint="check the network, or pass a local checkpoint directory",
        ) from e


def prune(model: str | Path, out_dir: str | Path, options: PruneOptions | None = None) -> PruneResult:
    """Prune ``model`` into ``out_dir`` (``hf/`` and ``prune.json``, all or nothing)."""
    options = options or PruneOptions()
    options.validate()
    out = Path(out_dir)
    record = prune_model(resolve(str(model)), options, out)
    return PruneResult(out_dir=out, checkpoint=out / "hf", record=record)


def export_gguf(
    checkpoint: str | Path, out_file: str | Path, config: ExportGGUFConfig | None = None
) -> GGUFExport:
    """Write ``checkpoint`` as a GGUF file that llama.cpp loads."""
    config = config or ExportGGUFConfig()
    local = _local_checkpoint(checkpoint)
    imatrix_source = resolve_imatrix(config.imatrix, config.type, local)
    path = write_gguf(local, out_file, type=config.type, imatrix_source=imatrix_source)
    return GGUFExport(path=path, info=describe_gguf(path))


def export_onnx(
    checkpoint: str | Path, out_dir: str | Path, config: ExportONNXConfig | None = None
) -> ONNXExport:
    """Export ``checkpoint`` as an ONNX decoder with KV cache into ``out_dir``."""
    config = config or ExportONNXConfig()
    path = write_onnx(
        _local_checkpoint(checkpoint),
        out_dir,
        dtype=config.dtype,
        flavor=config.flavor,
        precision=config.precision,
    )
    return ONNXExport(path=path, info=read_export_info(path))


def run(config: RunConfig | None = None) -> RunResult:
    """Everything ``rmexport run`` does: prune, export, validate, benchmark, report."""
    config = config or RunConfig()
    config.prune.validate()
    run_dir, report = run_pipeline(config)
    return RunResult(run_dir=run_dir, report=report)
