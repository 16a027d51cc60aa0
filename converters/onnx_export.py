"""HF checkpoint (original or pruned) -> one ONNX decoder graph with past key/values.

Two flavors write the same graph interface (``input_ids``, ``attention_mask``,
``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value``):

- ``optimum`` (default): optimum-onnx's exporter, task ``text-generation-with-past``. Standard
  ONNX ops; loads in ``optimum.onnxruntime.ORTModelForCausalLM`` and in a plain
  ``onnxruntime.InferenceSession``. fp32 or fp16.
- ``genai``: onnxruntime-genai's model builder (see converters/onnx_genai.py). Fused
  onnxruntime contrib ops (GroupQueryAttention, MatMulNBits), fp32/fp16 or int4 weights;
  loads in ``onnxruntime_genai.Model`` and in a plain InferenceSession.

A pruned checkpoint is an ordinary checkpoint with fewer blocks, so nothing here knows about
pruning; the export is checked to have one past key/value pair per ``num_hidden_layers``.
The export is written into a temporary folder beside ``out_dir`` and moved into place only
when complete, with config, generation config, tokenizer and provenance copied beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rmexport.arch import ADAPTERS, adapter_for
from rmexport.atomic import staged_dir
from rmexport.errors import ConfigError, ExportError, ModelLoadError, ToolchainError
from rmexport.records import JsonObject, from_jsonable
from rmexport.sysinfo import package_versions

from .onnx_genai import build_genai

__all__ = [
    "DTYPES",
    "FLAVORS",
    "PRECISIONS",
    "EXPORT_INFO_FILE",
    "OPTIMUM_RUNTIME_GAPS",
    "GraphFacts",
    "OnnxExportInfo",
    "export_onnx",
    "read_export_info",
]

log = logging.getLogger(__name__)

FLAVORS = ("optimum", "genai")
DTYPES = ("fp32", "fp16")
PRECISIONS = ("fp32", "int4")
EXPORT_INFO_FILE = "rmexport_onnx.json"
ONNX_TASK = "text-generation-with-past"
# Checkpoint files that are weights (the export replaces them) rather than metadata to carry over.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# model_type -> why optimum's ORTModelForCausalLM cannot generate() with an export of it, although
# the graph itself is right (plain InferenceSession parity passes): the adapters' declarations.
# Checked by tests/test_onnx.py.
OPTIMUM_RUNTIME_GAPS = {
    a.model_type: a.optimum_runtime_gap for a in ADAPTERS.values() if a.optimum_runtime_gap
}


def read_export_info(onnx_dir: str | Path) -> JsonObject:
    """What ``export_onnx`` recorded about an export folder (``OnnxExportInfo``'s JSON, as written by the
    version that made the export; {} for folders it did not write)."""
    path = Path(onnx_dir) / EXPORT_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_checkpoint(checkpoint: str | Path) -> tuple[str, Any]:
    """A local HF directory's path and config; reject what cannot export."""
    from transformers import AutoConfig

    directory = Path(checkpoint).expanduser().resolve()
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{checkpoint} is not an HF checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read config of {directory}: {e}") from e
    adapter_for(config)
    n_layers = int(config.num_hidden_layers)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != n_layers:
        raise ExportError(
            f"config has num_hidden_layers={n_layers} but {len(layer_types)} layer_types",
            hint="a pruned config must slice layer_types together with the blocks",
        )
    return str(directory), config


# Log lines the export provokes in its libraries that say nothing about the user's model: the
# exporter itself passes the deprecated ``torch_dtype``, and optimum lists the tied embedding's
# duplicate initializers before it deduplicates them. (logger, message pattern)
_EXPORT_NOISE = (
    ("transformers.modeling_utils", re.compile(r"`torch_dtype` is deprecated")),
    ("transformers.configuration_utils", re.compile(r"`torch_dtype` is deprecated")),
    ("optimum", re.compile(r"Found different candidate ONNX initializers|\t\S+: \{.*\}")),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence what tracing a model to ONNX says about the tracer, not about the model.

    Tracing turns every data-dependent Python branch of transformers into a ``TracerWarning``
    (dozens per export); the TorchScript exporter adds a ``UserWarning`` per advanced-indexing op
    and ``DeprecationWarning``s about itself, and optimum one about using it. The graph is checked
    against PyTorch by ``validate onnx`` instead. Only these categories and modules are silenced,
    only inside the export; filters and loggers are restored on exit.
    """
    filters = [(logging.getLogger(name), _DropMatching(pattern)) for name, pattern in _EXPORT_NOISE]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"optimum\.exporters\.onnx\.")
        for logger, drop in filters:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger, drop in filters:
                logger.removeFilter(drop)


def _export_optimum(ckpt: str, tmp: Path, dtype: str) -> None:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise ToolchainError(
            "optimum-onnx is not installed", hint="pip install 'optimum-onnx>=0.1,<0.2'"
        ) from e
    try:
        with _quiet_tracing():
            main_export(
                ckpt,
                output=tmp,
                task=ONNX_TASK,
                dtype=dtype,
                device="cpu",
                do_validation=False,  # validation/onnx_parity.py checks the graph against PyTorch
                local_files_only=True,
            )
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise ExportError(
            f"optimum could not export {ckpt} ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from e


def _copy_metadata(ckpt: str, tmp: Path) -> None:
    """Make the export self-contained: config, generation config, tokenizer, provenance."""
    for src in Path(ckpt).iterdir():
        if not src.is_file() or src.name.endswith(_WEIGHT_SUFFIXES) or src.name in _WEIGHT_INDEXES:
            continue
        if not (tmp / src.name).exists():
            shutil.copy2(src, tmp / src.name)


@dataclass(frozen=True)
class GraphFacts:
    """What the exported graph declares beyond its KV cache."""

    inputs: list[str]  # graph inputs other than past_key_values.*
    external_data: list[str]  # files holding the weights beside model.onnx
    opsets: dict[str, int]  # domain -> version


@dataclass(frozen=True)
class OnnxExportInfo:
    """What ``export_onnx`` records beside the graph, as ``EXPORT_INFO_FILE``."""

    flavor: str
    dtype: str
    precision: str
    task: str
    source_checkpoint: str
    architecture: str
    num_hidden_layers: int
    inputs: list[str]  # the GraphFacts
    external_data: list[str]
    opsets: dict[str, int]
    optimum_runtime_gap: str | None  # why optimum's ORTModelForCausalLM cannot generate() with it
    export_s: float
    versions: dict[str, str | None]

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> OnnxExportInfo:
        return from_jsonable(cls, data)


def _check_graph(tmp: Path, n_layers: int) -> GraphFacts:
    import onnx

    model_path = tmp / "model.onnx"
    if not model_path.is_file():
        produced = sorted(p.name for p in tmp.iterdir())
        raise ExportError(f"the exporter wrote no model.onnx (it wrote {produced})")
    model = onnx.load(str(model_path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    past = [name for name in inputs if name.startswith("past_key_values.")]
    if len(past) != 2 * n_layers:
        raise ExportError(
            f"exported graph has {len(past)} past key/value inputs; expected 2 x {n_layers} layers",
        )
    external = sorted(p.name for p in tmp.glob("model.onnx?*"))
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    other_inputs = [name for name in inputs if name not in past]
    return GraphFacts(inputs=other_inputs, external_data=external, opsets=opsets)


def _check_target(out: Path) -> None:
    """``out`` may be new, empty, or an earlier export (which is replaced); nothing else."""
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not (out / "model.onnx").exists() and not (out / EXPORT_INFO_FILE).exists():
            raise ExportError(
                f"{out} is not empty and is not an ONNX export; refusing to overwrite it",
                hint="choose another --out or remove the folder",
            )


def export_onnx(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    flavor: str = "optimum",
    precision: str | None = None,
) -> Path:
    """Export ``checkpoint`` into ``out_dir`` (model.onnx + config + tokenizer); returns out_dir.

    ``precision`` is the weight precision of the genai flavor (``int4`` for on-device use);
    None means the same as ``dtype``.
    """
    if flavor not in FLAVORS:
        raise ConfigError(f"unknown ONNX flavor {flavor!r}", hint="choose one of " + ", ".join(FLAVORS))
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", hint="choose one of " + ", ".join(DTYPES))
    precision = precision or dtype
    if precision not in (*PRECISIONS, *DTYPES):
        raise ConfigError(f"unknown precision {precision!r}", hint="choose fp32 or int4")
    if precision == "int4" and flavor != "genai":
        raise ConfigError("int4 weights need --flavor genai", hint="add --flavor genai")
    if precision not in ("int4", dtype):
        raise ConfigError(f"--precision {precision} contradicts --dtype {dtype}")

    ckpt, config = _check_checkpoint(checkpoint)
    out = Path(out_dir).expanduser().resolve()
    _check_target(out)
    n_layers = int(config.num_hidden_layers)
    log.info("export onnx: %s (%d blocks) -> %s [%s, %s, %s]", ckpt, n_layers, out, flavor, dtype, precision)
    started = time.perf_counter()
    # Staged beside ``out`` as .rmexport-staging-<pid>-<name>.*, moved into place when complete.
    with staged_dir(out) as tmp:
        if flavor == "optimum":
            _export_optimum(ckpt, tmp, dtype)
        else:
            build_genai(ckpt, tmp, config, precision=precision)
        graph = _check_graph(tmp, n_layers)
        optimum_gap = adapter_for(config).optimum_runtime_gap if flavor == "optimum" else None
        if optimum_gap and config.num_key_value_heads != config.num_attention_heads:
            log.warning("export onnx: %s", optimum_gap)
        else:
            optimum_gap = None
        _copy_metadata(ckpt, tmp)
        info = OnnxExportInfo(
            flavor=flavor,
            dtype=dtype,
            precision=precision,
            task=ONNX_TASK,
            source_checkpoint=str(ckpt),
            architecture=(getattr(config, "architectures", None) or [config.model_type])[0],
            num_hidden_layers=n_layers,
            inputs=graph.inputs,
            external_data=graph.external_data,
            opsets=graph.opsets,
            optimum_runtime_gap=optimum_gap,
            export_s=round(time.perf_counter() - started, 2),
            versions=_versions(flavor),
        )
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n")
    log.info("export onnx: done in %.1f s (%s)", info.export_s, out)
    return out


def _versions(flavor: str) -> dict[str, str | None]:
    names = ["onnx", "onnxruntime", "optimum-onnx", "transformers", "torch"]
    if flavor == "genai":
        names.append("onnxruntime-genai")
    return package_versions(*names)
