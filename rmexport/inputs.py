"""Every check of what a user typed, for every subcommand, before any heavy work and before any
folder is created.

Each ``check_*`` raises an RMExportError (exit 2: one line and a hint) or returns what it
learnt. They read headers only: a config.json, the JSON header of each safetensors shard, the
key/value and tensor-info part of a GGUF, an ONNX graph without its external data, a text file.

- model sources: alias, hub id (config only), HF directory (config.json, supported family, block
  count matching the weights, safetensors headers consistent with the file sizes), GGUF file
  (magic, version, header, file size against the end of the tensor data);
- numbers: counts are >= 1 (no value means "everything"), ratios and ridge terms are finite;
- text sources: readable, UTF-8, mostly letters, enough real documents for what is asked;
- output paths: the parent is, or can be made, a writable folder; a file is not where a folder is
  expected nor the reverse; an existing folder is replaced only if an earlier run wrote it.

``check_<command>_args(config)`` bundles them per subcommand, on the typed config of the command
(``rmexport.config``; the export checks take the checkpoint and the output path); ``rmexport.cli``
builds the config from its arguments and calls the check before running the command.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from google.protobuf.message import DecodeError

from converters.gguf_export import GGUF_TYPES

from .arch import ADAPTERS, adapter_for, supported_architectures
from .atomic import STAGING_PREFIX, existing_ancestor
from .calib.budget import BlockShape, MemoryBudget, check_budget_fits
from .calib.corpus import HUB_DATASETS, OFFLINE_SOURCES, load_corpus, parse_mixture
from .calib.tokens import shares
from .errors import ConfigError, ModelLoadError, UnsupportedArchitectureError
from .fileio import GGUF_MAGIC, GGUFHeaderError, read_gguf_header
from .hub import require_hub
from .lock import LOCK_NAME, check_not_held
from .models import ModelSource, resolve
from .options import check_bounds, check_count, check_number
from .pipeline import run_dir_for
from .records import JsonObject
from .replaceme.select import SelectionRule, cut_size, split_cut
from .replaceme.solvers import solver_named

if TYPE_CHECKING:
    from .config import (
        BenchGGUFConfig,
        BenchONNXConfig,
        PruneConfig,
        RunConfig,
        ValidateGGUFConfig,
        ValidateONNXConfig,
    )
    from .prune import PruneOptions

__all__ = [
    "CheckedSource",
    "CheckpointFacts",
    "GGUFFacts",
    "MIN_LETTER_SHARE",
    "OnnxFacts",
    "check_bench_gguf_args",
    "check_bench_onnx_args",
    "check_checkpoint_dir",
    "check_count",
    "check_cut",
    "check_device",
    "check_export_gguf_args",
    "check_export_onnx_args",
    "check_gguf_file",
    "check_memory_budget",
    "check_model_source",
    "check_number",
    "check_onnx_dir",
    "check_output_path",
    "check_prune_args",
    "check_run_args",
    "check_safetensors",
    "check_same_model",
    "check_text_source",
    "check_validate_gguf_args",
    "check_validate_onnx_args",
    "is_gguf_file",
]

# Folders an earlier run wrote, recognised by what they contain (so they may be replaced).
PRUNE_MARKERS = ("prune.json", "hf")
RUN_MARKERS = (".stages", "prune.json", "report.json", "hf")
ONNX_MARKERS = ("model.onnx", "rmexport_onnx.json")

# Text sources: a "real" document has this many words, mostly letters, words of sane length.
MIN_LETTER_SHARE = 0.5
MIN_WORDS = 4
MAX_MEAN_WORD_CHARS = 20
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# --- model sources --------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointFacts:
    path: Path
    n_layers: int
    family: str
    gguf_arch: str
    has_safetensors: bool


@dataclass(frozen=True)
class GGUFFacts:
    path: Path
    version: int
    architecture: str | None
    block_count: int | None
    tensor_count: int
    data_end: int
    size: int


@dataclass(frozen=True)
class OnnxFacts:
    path: Path
    n_layers: int


@dataclass(frozen=True)
class CheckedSource(ModelSource):
    """A ModelSource whose header-level checks passed, with what they found."""

    n_layers: int | None = None
    family: str | None = None
    gguf_arch: str | None = None


def _families_hint() -> str:
    return "supported families: " + ", ".join(ADAPTERS) + " (" + ", ".join(supported_architectures()) + ")"


def _family(config: JsonObject, where: str) -> tuple[str, str]:
    """(family, GGUF architecture) of a raw config dict, or UnsupportedArchitectureError."""
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    try:
        adapter = adapter_for(SimpleNamespace(architectures=architectures, model_type=model_type))
    except UnsupportedArchitectureError:
        found = ", ".join(map(str, architectures)) or "no architectures"
        raise UnsupportedArchitectureError(
            f"{where}: model_type {model_type!r} ({found}) is not supported", hint=_families_hint()
        ) from None
    return adapter.family, adapter.gguf_arch


def _n_layers(config: JsonObject, where: str) -> int:
    value = config.get("num_hidden_layers")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("num_hidden_layers")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelLoadError(f"{where}: config.json has no valid num_hidden_layers ({value!r})")
    return value


def _read_config(path: Path, where: str) -> JsonObject:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{where} {path} is a folder but has no config.json",
            hint="pass a Hugging Face checkpoint directory (config.json + *.safetensors)",
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{where}: cannot read {config_file} ({type(e).__name__})") from e
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"{where}: {config_file} is not valid JSON (line {e.lineno}: {e.msg})",
            hint="re-save the checkpoint with save_pretrained",
        ) from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{where}: {config_file} does not hold a JSON object")
    return config


_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def check_safetensors(path: Path | str, where: str = "weights") -> dict[str, list[int]]:
    """The shape of every tensor of a safetensors file, by name, after checking that its header parses
    and that the tensors it declares exactly fill the rest of the file."""
    path = Path(path)

    def corrupt(detail: str) -> ModelLoadError:
        return ModelLoadError(
            f"{where}: {path.name} is corrupt or truncated ({detail})",
            hint="re-download the checkpoint or save it again",
        )

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise corrupt(f"header length {n} exceeds the file")
            raw = f.read(n)
    except OSError as e:
        raise ModelLoadError(f"{where}: cannot read {path} ({e.strerror})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt("the header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    spans = []
    shapes: dict[str, list[int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = shapes[name] = [int(d) for d in entry["shape"]]
            itemsize = _SAFETENSORS_ITEMSIZE.get(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for {name!r}") from None
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise corrupt(f"tensor {name!r} has {end - begin} bytes for shape {shape}")
        spans.append((begin, end))
    spans.sort()
    buffer = size - 8 - n
    position = 0
    for begin, end in spans:
        if begin != position or end < begin:
            raise corrupt("tensor data overlaps or leaves holes")
        position = end
    if position != buffer:
        if position > buffer:
            raise corrupt(f"the header promises {position} bytes of tensor data, the file holds {buffer}")
        raise corrupt(f"{buffer - position} bytes after the last tensor")
    return shapes


def check_checkpoint_dir(
    path: Path | str, where: str = "checkpoint", *, need_safetensors: bool = False
) -> CheckpointFacts:
    """An HF checkpoint folder that loads: config.json of a supported family, tokenizer files,
    weights whose headers parse, fit their files and hold the blocks the config announces."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{where} {path} not found")
    if not path.is_dir():
        raise ModelLoadError(
            f"{where} {path} is a file, not a checkpoint folder",
            hint="pass the folder that holds config.json and the *.safetensors files",
        )
    config = _read_config(path, where)
    family, gguf_arch = _family(config, where)
    n_layers = _n_layers(config, where)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{where} {path} has no tokenizer files", hint="save the tokenizer beside the model"
        )
    shards = _safetensors_shards(path, where)
    if not shards:
        if need_safetensors or not any(path.glob("pytorch_model*.bin")):
            raise ModelLoadError(
                f"{where} {path} has no *.safetensors weights",
                hint="save the model with save_pretrained(safe_serialization=True)",
            )
        return CheckpointFacts(path, n_layers, family, gguf_arch, False)
    names: set[str] = set()
    for shard in shards:
        names.update(check_safetensors(shard, where))
    _check_index_names(path, names, where)

    layer_index = re.compile(rf"(?:^|\.){re.escape(ADAPTERS[family].layers_path)}\.(\d+)\.")
    blocks = {int(m.group(1)) for name in names if (m := layer_index.search(name))}
    if blocks and blocks != set(range(n_layers)):
        raise ModelLoadError(
            f"{where}: config.json says {n_layers} blocks but the weights hold {len(blocks)} "
            f"(indices {min(blocks)}..{max(blocks)})",
            hint="the checkpoint was edited or copied only in part; save it again",
        )
    return CheckpointFacts(path, n_layers, family, gguf_arch, True)


def _safetensors_shards(path: Path, where: str) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(path.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ModelLoadError(
            f"{where}: {index.name} is not a valid shard index", hint="save the checkpoint again"
        ) from None
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise ModelLoadError(
            f"{where}: shard {missing[0]} listed in {index.name} is missing "
            f"({len(missing)} of {len(shards)} missing)",
            hint="download or copy every shard",
        )
    return [path / s for s in shards]


def _check_index_names(path: Path, names: set[str], where: str) -> None:
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    listed = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    absent = sorted(listed - names)
    if absent:
        raise ModelLoadError(
            f"{where}: {index.name} lists {len(absent)} tensor(s) no shard holds, e.g. {absent[0]!r}",
            hint="download or copy every shard",
        )


# --- GGUF -----------------------------------------------------------------------------------
def check_gguf_file(path: Path | str, where: str = "GGUF file") -> GGUFFacts:
    """A GGUF file whose header parses (magic, a version llama.cpp reads, key/values, tensor
    infos) and whose size covers every tensor the header declares."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{where} {path} not found")
    if path.is_dir():
        raise ModelLoadError(f"{where} {path} is a folder, not a GGUF file")

    def fail(detail: str) -> ModelLoadError:
        return ModelLoadError(
            f"{where} {path} is not a readable GGUF file: {detail}",
            hint="export it again (rmexport export gguf) or download it again",
        )

    try:
        header = read_gguf_header(path)
    except GGUFHeaderError as e:
        raise fail(str(e)) from None
    except (OSError, ValueError) as e:  # ValueError: mmap of a special file
        raise ModelLoadError(f"{where}: cannot read {path} ({e})") from e
    arch = header.metadata.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    blocks = header.metadata.get(f"{arch}.block_count") if arch else None
    return GGUFFacts(
        path=path,
        version=header.version,
        architecture=arch,
        block_count=blocks if isinstance(blocks, int) else None,
        tensor_count=len(header.tensors),
        data_end=header.data_end,
        size=header.size,
    )


def is_gguf_file(path: Path) -> bool:
    try:
        with Path(path).open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _gguf_family(facts: GGUFFacts, where: str) -> str:
    for adapter in ADAPTERS.values():
        if adapter.gguf_arch == facts.architecture:
            return adapter.family
    raise UnsupportedArchitectureError(
        f"{where}: GGUF architecture {facts.architecture!r} is not supported", hint=_families_hint()
    )


def check_model_source(
    spec: str, where: str = "MODEL", *, need_local: bool = False, need_safetensors: bool = False
) -> CheckedSource:
    """Resolve ``spec`` (alias, hub id, folder, .gguf) and check it as far as headers allow."""
    if not str(spec).strip():
        raise ConfigError(f"{where} is empty", hint="give an alias, a hub id, a folder or a .gguf file")
    path = Path(str(spec)).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_dir():
        raise ModelLoadError(f"{where} {spec} is a folder, not a GGUF file")
    source = resolve(str(spec))
    base = {k: getattr(source, k) for k in ("spec", "kind", "location", "slug")}
    if source.kind == "local":
        facts = check_checkpoint_dir(source.location, where, need_safetensors=need_safetensors)
        return CheckedSource(**base, n_layers=facts.n_layers, family=facts.family, gguf_arch=facts.gguf_arch)
    if source.kind == "gguf":
        gguf_facts = check_gguf_file(source.location, where)
        family = _gguf_family(gguf_facts, where)
        return CheckedSource(
            **base, n_layers=gguf_facts.block_count, family=family, gguf_arch=gguf_facts.architecture
        )
    if need_local:
        raise ConfigError(
            f"{where} {spec} is a hub id; this command needs a local checkpoint folder",
            hint=f"download it first, e.g. huggingface-cli download {source.location} --local-dir DIR",
        )
    config = _hub_config(source, where)
    family, gguf_arch = _family(config, where)
    return CheckedSource(**base, n_layers=_n_layers(config, where), family=family, gguf_arch=gguf_arch)


def _hub_config(source: ModelSource, where: str) -> JsonObject:
    from transformers import PretrainedConfig

    require_hub(source.location)
    try:
        config, _ = PretrainedConfig.get_config_dict(source.location)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load {source.location!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})",
            hint="check the network and your HF token, or download the model and pass its local directory",
        ) from e
    return config


# --- ONNX -----------------------------------------------------------------------------------
def check_onnx_dir(path: Path | str, where: str = "ONNX folder") -> OnnxFacts:
    """A folder written by ``rmexport export onnx``: a decoder graph with past key/values whose
    external data is all there, plus config and tokenizer."""
    import onnx

    path = Path(path).expanduser()
    hint = "create it with: rmexport export onnx CKPT --out DIR"
    if not path.exists():
        raise ModelLoadError(f"no model.onnx in {where} {path}: folder not found", hint=hint)
    if not path.is_dir():
        raise ModelLoadError(f"{where} {path} is a file; give the folder of an ONNX export", hint=hint)
    model_file = path / "model.onnx"
    if not model_file.is_file():
        raise ModelLoadError(f"no model.onnx in {where} {path}", hint=hint)
    if model_file.stat().st_size == 0:
        raise ModelLoadError(f"{where}: {model_file} is empty", hint=hint)
    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as e:
        raise ModelLoadError(
            f"{where}: {model_file} is not a readable ONNX model ({type(e).__name__})", hint=hint
        ) from e
    past = [i.name for i in model.graph.input if i.name.startswith("past_key_values.")]
    if not past or len(past) % 2:
        raise ModelLoadError(
            f"{where}: {model_file} is not a decoder with a KV cache ({len(past)} past key/value inputs)",
            hint=hint,
        )
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        data_file = path / info.get("location", "")
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if not data_file.is_file():
            raise ModelLoadError(
                f"{where}: external data file {info.get('location')!r} is missing", hint=hint
            )
        if data_file.stat().st_size < end:
            raise ModelLoadError(f"{where}: external data file {data_file.name} is truncated", hint=hint)
    if not (path / "config.json").is_file() or not any((path / n).is_file() for n in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{where} {path} has no config.json or tokenizer files beside model.onnx", hint=hint
        )
    return OnnxFacts(path, len(past) // 2)


# --- numbers --------------------------------------------------------------------------------
def check_cut(n_layers: int, ratio: float | None, layers: int | None, blocks: int = 1) -> list[int]:
    """Sizes of the cuts ``--ratio``/``--layers``/``--blocks`` ask of a model of ``n_layers``."""
    if n_layers < 3:
        raise ConfigError(f"the model has only {n_layers} blocks; at least 2 must remain, so none can go")
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be at least 1 (got {layers})", hint=f"use 1..{n_layers - 2}")
        if layers >= n_layers:
            raise ConfigError(
                f"--layers {layers}: the model has only {n_layers} blocks",
                hint=f"remove 1..{n_layers - 2} blocks (at least 2 must remain)",
            )
        if n_layers - layers < 2:
            raise ConfigError(
                f"--layers {layers} would leave {n_layers - layers} of {n_layers} blocks; "
                "at least 2 must remain",
                hint=f"use --layers 1..{n_layers - 2}",
            )
    elif ratio is not None:
        check_number(ratio, "--ratio")
    check_count(blocks, "--blocks")
    return split_cut(cut_size(n_layers, ratio, layers), blocks)


# --- memory budget --------------------------------------------------------------------------
def _text_config(config: JsonObject) -> JsonObject:
    nested = config.get("text_config")
    return nested if "hidden_size" not in config and isinstance(nested, dict) else config


def _largest_module(shapes: Iterable[tuple[str, Iterable[int]]], block: re.Pattern) -> int:
    """Elements of the largest module: a decoder block (names ``block`` matches), or any other
    module (the embedding, the LM head), grouped as ``calib.weights.largest_module_bytes`` does."""
    elements: dict[str, int] = {}
    for name, shape in shapes:
        match = block.match(name)
        module = match.group(0) if match else name.rpartition(".")[0]
        elements[module] = elements.get(module, 0) + math.prod(shape)
    return max(elements.values(), default=0)


def _estimated_largest_module(config: JsonObject) -> int:
    """From a config alone (a hub model, or weights in pickles): a block's projections and norms,
    or the embedding if larger."""
    d, ff = int(config["hidden_size"]), int(config.get("intermediate_size") or 4 * config["hidden_size"])
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or d // heads)
    kv = int(config.get("num_key_value_heads") or heads)
    block = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * ff + 2 * d
    return max(block, int(config.get("vocab_size") or 0) * d)


def _hidden_and_largest_module(source: CheckedSource) -> tuple[int, int]:
    """(hidden size, elements of the largest module) from headers only."""
    if source.kind == "gguf":
        header = read_gguf_header(source.location)
        shapes = ((t.name, t.shape) for t in header.tensors)
        hidden = int(header.metadata[f"{source.gguf_arch}.embedding_length"])
        return hidden, _largest_module(shapes, re.compile(r"^blk\.\d+\."))
    if source.kind == "local":
        config = _text_config(_read_config(Path(source.location), "MODEL"))
        shards = _safetensors_shards(Path(source.location), "MODEL")
        layers = ADAPTERS[source.family].layers_path
        shapes = (item for shard in shards for item in check_safetensors(shard, "MODEL").items())
        largest = _largest_module(shapes, re.compile(rf"^{re.escape(layers)}\.\d+\.")) if shards else 0
    else:
        config = _text_config(_hub_config(source, "MODEL"))
        largest = 0
    return int(config["hidden_size"]), largest or _estimated_largest_module(config)


def check_memory_budget(source: CheckedSource, options: PruneOptions) -> None:
    """The memory budget parses and is at least what the smallest streamed prune holds at once
    (ConfigError naming that minimum otherwise): refused before any weights are read."""
    budget = MemoryBudget.from_option(options.memory_budget)
    if options.memory_budget:
        option = "--memory-budget"
    elif os.environ.get("RMEXPORT_MEMORY_BUDGET"):
        option = "RMEXPORT_MEMORY_BUDGET"
    else:
        option = "the default memory budget (half of RAM)"
    # An automatic compute dtype may resolve to float32: its size gives a minimum that always works.
    element_bytes = 2 if options.compute_dtype in ("bfloat16", "float16") else 4
    hidden, largest = _hidden_and_largest_module(source)
    shape = BlockShape(hidden=hidden, largest_module_elements=largest, element_bytes=element_bytes)
    check_budget_fits(budget.total_bytes, shape, option)


def check_device(device: str, option: str = "--device") -> None:
    if device == "auto":  # resolved by rmexport.compute to what torch sees
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(
            f"{option} {device!r} is not a torch device", hint="use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{option} {device}: no CUDA device is available", hint="use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{option} {device}: there are only {count} CUDA device(s)")
        return
    if dev.type == "mps" and torch.backends.mps.is_available():
        return
    raise ConfigError(f"{option} {device}: not available here", hint="use cpu or cuda")


# --- text sources ---------------------------------------------------------------------------
def _document_text(doc: Any) -> str:
    return doc if isinstance(doc, str) else "\n".join(str(m.get("content", "")) for m in doc)


def _letter_share(text: str) -> float:
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in visible) / len(visible) if visible else 0.0


def _is_real(text: str) -> bool:
    words = text.split()
    if len(words) < MIN_WORDS:
        return False
    return (
        sum(map(len, words)) / len(words) <= MAX_MEAN_WORD_CHARS and _letter_share(text) >= MIN_LETTER_SHARE
    )


def check_text_source(
    spec: str, option: str, *, pool_documents: int = 0, heldout_documents: int = 0, count_option: str = ""
) -> None:
    """A text file that is UTF-8 natural language with at least ``pool_documents`` real documents
    in its calibration pool and ``heldout_documents`` in its held-out part. ``builtin`` and hub
    datasets are not read here (the first is known good, the second needs the network)."""
    if spec in OFFLINE_SOURCES or spec in HUB_DATASETS or spec.startswith("hf:"):
        return
    path = Path(spec).expanduser()
    hint = "give plain text (documents separated by a blank line) or JSON lines with a 'text' field"
    if not path.exists():
        raise ConfigError(
            f"{option}: text source not found: {spec}",
            hint="use a .txt or .jsonl file, or one of: " + ", ".join(OFFLINE_SOURCES + tuple(HUB_DATASETS)),
        )
    if not path.is_file():
        raise ConfigError(f"{option} {spec} is a folder, not a text file", hint=hint)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{option}: cannot read {spec} ({e.strerror})") from e
    if not raw.strip():
        raise ConfigError(f"{option} {spec} is empty", hint=hint)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{option} {spec} is not UTF-8 text (undecodable byte at offset {e.start})", hint=hint
        ) from e
    if b"\x00" in raw:
        raise ConfigError(f"{option} {spec} contains NUL bytes; it is not a text file", hint=hint)
    corpus = load_corpus(spec)
    texts = [_document_text(d) for d in (*corpus.pool, *corpus.heldout)]
    share = _letter_share("".join(texts))
    if share < MIN_LETTER_SHARE:
        raise ConfigError(
            f"{option} {spec} does not look like natural-language text: {share:.0%} of its characters "
            f"are letters (need {MIN_LETTER_SHARE:.0%})",
            hint=hint,
        )
    total = len(texts)
    pool_real = sum(_is_real(_document_text(d)) for d in corpus.pool)
    if pool_real < pool_documents:
        raise ConfigError(
            f"{option} {spec} has {pool_real} usable calibration documents (of {total}, 10% held out); "
            f"{count_option or 'the calibration'} asks for {pool_documents}",
            hint="give more text (documents separated by a blank line) or ask for fewer documents",
        )
    heldout_real = sum(_is_real(_document_text(d)) for d in corpus.heldout)
    if heldout_real < heldout_documents:
        raise ConfigError(
            f"{option} {spec} leaves {heldout_real} usable held-out documents (of {total}); "
            f"need {heldout_documents}",
            hint="give more text (documents separated by a blank line)",
        )


# --- output paths ---------------------------------------------------------------------------
def _writable(folder: Path, option: str, target: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {option} {target}: no write permission in {folder}")


def check_output_path(
    path: Path | str,
    option: str,
    kind: str = "dir",
    *,
    markers: Iterable[str] | None = (),
    replace_file: Callable[[Path], bool] | None = None,
    file_kind: str = "an output of rmexport",
) -> Path:
    """The absolute path of an output that can be written, without creating anything.

    ``kind="dir"``: an existing file there is refused; an existing non-empty folder is replaced
    only if it holds one of ``markers`` (an earlier run's output); ``markers=None`` accepts any
    folder (a root others write into). ``kind="file"``: an existing folder is refused; an existing
    file is replaced only if ``replace_file(path)`` says so (when given). The nearest existing
    parent must be a writable folder."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', not {kind!r}")
    if not str(path).strip():
        raise ConfigError(f"{option} is empty")
    target = Path(path).expanduser().absolute()
    if target.exists():
        if kind == "dir":
            if not target.is_dir():
                raise ConfigError(
                    f"cannot write {option} {target}: it is a file, not a folder",
                    hint="give a new folder or an earlier output folder",
                )
            entries = [
                e for e in target.iterdir() if not e.name.startswith(STAGING_PREFIX) and e.name != LOCK_NAME
            ]
            if markers is not None and entries and not any((target / m).exists() for m in markers):
                raise ConfigError(
                    f"{option} {target} is a folder rmexport did not write; refusing to replace its contents",
                    hint="choose a new or empty folder",
                )
            _writable(target, option, target)
        else:
            if target.is_dir():
                raise ConfigError(
                    f"{option} {target} is a folder; give a file name", hint=f"e.g. {target}/NAME"
                )
            if replace_file is not None and not replace_file(target):
                raise ConfigError(
                    f"{option} {target} exists and is not {file_kind}; refusing to overwrite it",
                    hint="choose another file name or remove the file",
                )
    ancestor = existing_ancestor(target.parent)
    if not ancestor.is_dir():
        raise ConfigError(f"cannot write {option} {target}: {ancestor} is a file, not a folder")
    _writable(ancestor, option, target)
    return target


def _check_apart(output: Path, inputs: Iterable[str | Path | None], option: str) -> None:
    """An output must not be, or contain, one of the inputs it is made from."""
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        output = Path(output).resolve()
        if output == source or output in source.parents:
            raise ConfigError(
                f"{option} {output} would overwrite the input {source}", hint="choose another path"
            )


def check_same_model(what: str, n_layers: int | None, reference_layers: int | None, where: str) -> None:
    if n_layers is not None and reference_layers is not None and n_layers != reference_layers:
        raise ConfigError(
            f"{what} has {n_layers} blocks and {where} has {reference_layers}: they are different models",
            hint=f"compare against the checkpoint {what} was made from",
        )


def _json_output(path: str | None) -> None:
    if path:
        check_output_path(path, "--json", "file")


# --- per subcommand -------------------------------------------------------------------------
def _selection_documents(options: PruneOptions) -> int:
    """Documents after the calibration ones that --select loss / a solver judged on them set aside."""
    if options.select != SelectionRule.LOSS and not solver_named(options.solver).judged_on_set_aside:
        return 0
    return int(options.selection_samples)


def _check_texts(options: PruneOptions) -> None:
    parts = parse_mixture(options.calib_data)
    weights = [w for _, w in parts]
    needed = shares(options.calib_samples, weights)
    guard = shares(_selection_documents(options), weights)
    for (spec, _), count, extra in zip(parts, needed, guard, strict=True):
        check_text_source(spec, "--calib-data", pool_documents=count + extra, count_option="--calib-samples")
    check_text_source(options.eval_data, "--eval-data", heldout_documents=1)
    for spec in options.ood_data:
        check_text_source(spec, "--ood-data", heldout_documents=1)


def _check_prune_options(model: str, options: PruneOptions) -> CheckedSource:
    """The prune options and the model they apply to, the part ``prune`` and ``run`` share."""
    options.validate()  # each value within its declared bounds
    source = check_model_source(model, "MODEL")
    if source.n_layers is not None:
        check_cut(source.n_layers, options.ratio, options.layers, options.blocks)
    check_memory_budget(source, options)
    return source


def check_prune_args(config: PruneConfig) -> CheckedSource:
    """Everything ``rmexport prune`` can check before loading weights; creates nothing."""
    source = _check_prune_options(config.model, config.prune)
    check_device(config.prune.device)
    out = check_output_path(config.out, "--out", "dir", markers=PRUNE_MARKERS)
    check_not_held(out, "--out")
    _check_apart(out, [source.location if source.kind != "hub" else None], "--out")
    _check_texts(config.prune)
    return source


def check_run_args(config: RunConfig) -> CheckedSource:
    """Everything ``rmexport run`` can check before loading weights; creates nothing."""
    source = _check_prune_options(config.model, config.prune)
    if not config.skip_gguf and config.gguf_type not in GGUF_TYPES:
        raise ConfigError(
            f"--gguf-type {config.gguf_type!r} is not supported", hint="use one of " + ", ".join(GGUF_TYPES)
        )
    check_device(config.prune.device)
    root = check_output_path(config.out_root, "--out-root", "dir", markers=None)
    run_dir = check_output_path(
        run_dir_for(root, source, config.ratio_label), "--out-root", "dir", markers=RUN_MARKERS
    )
    base_dir = check_output_path(root / f"{source.slug}-original", "--out-root", "dir", markers=RUN_MARKERS)
    check_not_held(run_dir, "--out-root")
    check_not_held(base_dir, "--out-root")
    _check_apart(run_dir, [source.location if source.kind != "hub" else None], "--out-root")
    _check_texts(config.prune)
    return source


def check_export_gguf_args(checkpoint: str, out: str | Path) -> tuple[CheckedSource, Path]:
    """``rmexport export gguf CKPT --out FILE``."""
    source = check_model_source(checkpoint, "CKPT", need_local=True, need_safetensors=True)
    out = check_output_path(out, "--out", "file", replace_file=is_gguf_file, file_kind="a GGUF file")
    _check_apart(out, [source.location], "--out")
    return source, out


def check_export_onnx_args(checkpoint: str, out: str | Path) -> tuple[CheckedSource, Path]:
    """``rmexport export onnx CHECKPOINT --out DIR``."""
    source = check_model_source(checkpoint, "CHECKPOINT")
    out = check_output_path(out, "--out", "dir", markers=ONNX_MARKERS)
    _check_apart(out, [source.location if source.kind != "hub" else None], "--out")
    return source, out


def check_validate_gguf_args(config: ValidateGGUFConfig) -> tuple[GGUFFacts, CheckpointFacts]:
    check_bounds(config)
    facts = check_gguf_file(config.gguf_file, "GGUF_FILE")
    reference = check_checkpoint_dir(config.reference, "--reference")
    if facts.architecture != reference.gguf_arch:
        raise ConfigError(
            f"GGUF_FILE is a {facts.architecture!r} model and --reference a {reference.family!r} one: "
            "they are different models",
            hint="validate against the checkpoint the GGUF was written from",
        )
    check_same_model("GGUF_FILE", facts.block_count, reference.n_layers, "--reference")
    _json_output(config.json)
    return facts, reference


def check_validate_onnx_args(config: ValidateONNXConfig) -> tuple[OnnxFacts, CheckedSource]:
    check_bounds(config)
    facts = check_onnx_dir(config.onnx_dir, "ONNX_DIR")
    reference = check_model_source(config.reference, "--reference")
    check_same_model("ONNX_DIR", facts.n_layers, reference.n_layers, "--reference")
    _json_output(config.json)
    return facts, reference


def check_bench_onnx_args(config: BenchONNXConfig) -> tuple[OnnxFacts, OnnxFacts]:
    """``bench onnx``; its speed protocol checked itself when the CLI built it."""
    check_bounds(config)
    check_count(config.eval_tokens, "--eval-tokens", config.window)
    original = check_onnx_dir(config.original, "--original")
    pruned = check_onnx_dir(config.pruned, "--pruned")
    _json_output(config.json)
    return original, pruned


def check_bench_gguf_args(config: BenchGGUFConfig) -> tuple[str, ...]:
    """Checks of ``bench gguf`` (its speed protocol checked itself when the CLI built it); returns
    the GGUF types asked for."""
    types = tuple(t.strip() for t in str(config.types).split(",") if t.strip())
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown or not types:
        raise ConfigError(
            f"--types {config.types!r}: unknown GGUF type(s) {unknown}",
            hint="choose from " + ", ".join(GGUF_TYPES),
        )
    check_bounds(config)
    check_count(config.eval_tokens, "--eval-tokens", config.window)
    for role in ("original", "pruned"):
        spec = getattr(config, role)
        if str(spec).lower().endswith(".gguf"):
            check_gguf_file(spec, f"--{role}")
        else:
            check_checkpoint_dir(spec, f"--{role}", need_safetensors=True)
    if config.work_dir:
        check_output_path(config.work_dir, "--work-dir", "dir", markers=None)
    _json_output(config.json)
    return types
