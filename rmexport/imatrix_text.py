"""What ``--imatrix auto`` computes the importance matrix from: the calibration text of the prune.

A pruned checkpoint (``<run>/hf``) has its prune's record beside it (``<run>/prune.json``); the
calibration documents are drawn again exactly as the prune drew them (mixture, samples, sequence
length, seed) and their token sequences decoded back to text, special tokens included, for
``llama-imatrix --parse-special``. A checkpoint without a record (an original model) gets the text
a default prune would calibrate on, so an original and its pruned model are quantized alike.

The text is capped at ``IMATRIX_CHUNKS`` sequences, evenly spread over the calibration sequences so that
every source of a mixture keeps its share: llama-imatrix costs about one forward pass over its text
per model, and on the default model a matrix from the capped text quantizes as well as one from all of
it (docs/gguf.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

from converters.gguf_export import GGUF_TYPES
from converters.imatrix import CalibrationText

from .calib.tokens import mixture_batches
from .errors import ConfigError
from .log import get_logger
from .prune import PruneOptions
from .records import JsonObject

__all__ = [
    "IMATRIX_CHOICES",
    "IMATRIX_CHUNKS",
    "CalibrationRecipe",
    "ImatrixRecipe",
    "calibration_recipe",
    "calibration_text",
    "default_imatrix_recipe",
    "resolve_imatrix",
]

log = get_logger(__name__)

IMATRIX_CHOICES = ("auto", "none")
IMATRIX_CHUNKS = 16
_SEPARATOR = "\n\n"


class CalibrationRecipe(TypedDict):
    """How a prune drew its calibration text, as ``prune.json``'s ``calibration`` records it."""

    source: str  # the mixture, e.g. "builtin" or "builtin:3,docs:1"
    documents: int
    seq_len: int
    seed: int


class ImatrixRecipe(CalibrationRecipe):
    """What a default importance matrix is computed from: a GGUF export stage's key."""

    chunks: int  # at most this many of the calibration sequences (llama-imatrix --chunks)


def _prune_record(record: Path) -> JsonObject | None:
    """``prune.json`` as written (any version of it: only its calibration section is read), or None."""
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("%s is unreadable: the importance matrix uses the default calibration text", record)
        return None


def calibration_recipe(prune_record: str | Path) -> CalibrationRecipe:
    """How the prune recorded in ``prune_record`` drew its calibration text (a default prune's
    where there is no record): source mixture, documents, sequence length, seed."""
    defaults = PruneOptions()
    recipe = CalibrationRecipe(
        source=defaults.calib_data,
        documents=defaults.calib_samples,
        seq_len=defaults.seq_len,
        seed=defaults.seed,
    )
    calibration = (_prune_record(Path(prune_record)) or {}).get("calibration") or {}
    return CalibrationRecipe(**{k: calibration.get(k, v) for k, v in recipe.items()})


def _evenly_spread(items: list[Any], limit: int | None) -> list[Any]:
    if limit is None or len(items) <= limit:
        return items
    return [items[k * len(items) // limit] for k in range(limit)]


def calibration_text(
    checkpoint: str | Path, prune_record: str | Path | None = None, max_chunks: int | None = IMATRIX_CHUNKS
) -> CalibrationText:
    """``converters.imatrix.CalibrationText`` of the prune recorded in ``prune_record`` (default: the
    ``prune.json`` beside ``checkpoint``; none there: a default prune's), tokenized as ``checkpoint``
    tokenizes: at most ``max_chunks`` of its sequences (None: all). An original model is given its
    pruned model's record, so both see the same text."""
    from transformers import AutoTokenizer

    checkpoint = Path(checkpoint)
    record_file = Path(prune_record) if prune_record is not None else checkpoint.parent / "prune.json"
    recipe = calibration_recipe(record_file)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    calibration = mixture_batches(
        recipe["source"],
        tokenizer,
        n_samples=int(recipe["documents"]),
        seq_len=int(recipe["seq_len"]),
        batch_size=8,
        seed=int(recipe["seed"]),
    )
    sequences = [
        ids[mask.bool()]
        for batch_ids, batch_mask in calibration.batches
        for ids, mask in zip(batch_ids, batch_mask, strict=True)
    ]
    chosen = _evenly_spread(sequences, max_chunks)
    texts = [tokenizer.decode(ids.tolist(), skip_special_tokens=False) for ids in chosen]
    log.info(
        "importance matrix text: %d of the %d sequences of %s",
        len(chosen),
        len(sequences),
        calibration.summary(),
    )
    return CalibrationText(
        _SEPARATOR.join(texts), chunk_tokens=int(recipe["seq_len"]), max_chunks=len(chosen)
    )


def default_imatrix_recipe(type_name: str, prune_record: str | Path) -> ImatrixRecipe | None:
    """What the default ``--imatrix`` of ``type_name`` computes its matrix from (the calibration
    recipe), or None where the default is no matrix: a pipeline stage's key."""
    if not GGUF_TYPES[type_name].imatrix_by_default:
        return None
    return ImatrixRecipe(**calibration_recipe(prune_record), chunks=IMATRIX_CHUNKS)


def resolve_imatrix(
    choice: str | None, type_name: str, checkpoint: str | Path, prune_record: str | Path | None = None
) -> Any:
    """What ``--imatrix CHOICE`` means for ``type_name``: calibration text (``auto``), a file, or None.

    No choice: ``auto`` for the types at or below 4 bits that use a matrix, ``none`` above. ``auto``
    on a type that ignores a matrix is handed on, so the converter warns about it."""
    gtype = GGUF_TYPES.get(type_name)
    if gtype is None:
        return None  # the converter reports the unknown type
    if choice is None:
        choice = "auto" if gtype.imatrix_by_default else "none"
    if choice == "none":
        return None
    if choice == "auto":
        if not gtype.uses_imatrix:
            return "auto"  # not computed; the converter warns that it is not used
        return calibration_text(checkpoint, prune_record)
    path = Path(choice)
    if not path.is_file():
        raise ConfigError(
            f"--imatrix {choice}: no such file", hint="give an importance matrix file, auto or none"
        )
    return path
