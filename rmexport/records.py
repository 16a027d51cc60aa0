"""The typed record of a prune, written as ``prune.json``: one schema for every model size."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "CutRecord",
    "Evaluation",
    "FoldParity",
    "GuardRecord",
    "JsonObject",
    "ModelInfo",
    "PruneRecord",
    "Quality",
    "RepairRecord",
    "RepairedBlock",
    "SourceQuality",
    "TensorRefit",
    "from_jsonable",
    "jsonable",
]

# A JSON object as parsed or about to be written: a record's ``to_json()``, or a file whose keys are not
# ours (a model's config.json, tokenizer.json, a GGUF's metadata).
JsonObject = dict[str, Any]


@dataclass
class ModelInfo:
    spec: str
    kind: str
    location: str
    architecture: str
    family: str
    hidden_size: int


@dataclass
class CutRecord:
    cut: list[int]  # [start, end) in the model as it was when this cut was chosen
    removed_layers: list[int]  # original indices
    fit: JsonObject  # {"solver": name, **that solver's own details}
    scores: dict[str, Any]


@dataclass
class Evaluation:
    source: str
    tokens: int
    window: int


@dataclass
class FoldParity:
    max_abs_logit_diff: float
    max_abs_logit: float
    atol: float
    tokens: int
    passed: bool


@dataclass
class SourceQuality:
    """Held-out perplexities on one more text source, of another kind than the evaluation text."""

    source: str
    tokens: int
    ppl_original: float
    ppl_plain_removal: float
    ppl_pruned: float


@dataclass
class Quality:
    ppl_original: float
    ppl_plain_removal: float
    ppl_pruned: float
    out_of_domain: list[SourceQuality] = field(default_factory=list)
    original_reused: bool = False  # the original's perplexities came from an earlier prune of the model


@dataclass
class TensorRefit:
    """One weight of a repaired block refitted in closed form."""

    tensor: str  # the checkpoint's tensor
    ridge: float | None  # strength toward its own weights, chosen on set-aside text (None: ∞, unchanged)
    set_aside_rel_residual: float  # of the chosen strength
    set_aside_rel_residual_unrepaired: float


@dataclass
class RepairedBlock:
    """One block after the cut whose ``down_proj`` was refitted, and before it the attention's
    output projection (see ``rmexport.replaceme.repair``)."""

    block: int  # original index
    tensor: str  # the checkpoint's tensor that changed
    ridge: float | None  # strength toward the block's own weights, chosen on set-aside text (None: ∞)
    set_aside_rel_residual: float  # of the chosen strength
    set_aside_rel_residual_unrepaired: float
    attention: TensorRefit | None = None


@dataclass
class RepairRecord:
    """The repair walk after the last cut: every block it refitted, in order (the guard keeps a prefix)."""

    blocks: list[RepairedBlock]
    kept_blocks: int  # how many of ``blocks`` the saved model has: the quality guard's choice
    seconds: float
    note: str | None = None  # why no block was repaired, where none was


@dataclass
class GuardRecord:
    """The quality guard's judgement on the set-aside text of each source of the calibration mixture:
    each stage of the prune's mean KL divergence from the original model's next-token distribution
    (what it is judged on) and its mean next-token loss, and the stage kept."""

    judged_on: str | None  # None: the guard was off (``--no-quality-guard``)
    kept: str  # "fitted", "repair K" or "plain_removal"
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)  # source -> stage -> loss
    selection_loss: dict[str, float] = field(default_factory=dict)  # stage -> mean over the sources
    kl_by_source: dict[str, dict[str, float]] = field(default_factory=dict)  # source -> stage -> KL
    mean_kl: dict[str, float] = field(default_factory=dict)  # stage -> mean over the sources


@dataclass
class PruneRecord:
    model: ModelInfo
    L: int
    n: int
    N: int
    ratio: float | None
    kept_layers: list[int]
    cuts: list[CutRecord]
    selection: dict[str, Any]
    solver: dict[str, Any]
    calibration: dict[str, Any]
    evaluation: Evaluation
    fold_parity: FoldParity
    quality: Quality
    guard: GuardRecord
    tokenizer_parity: JsonObject  # the verdict saved beside a GGUF's conversion, as it is on disk
    memory: dict[str, Any]
    saved_dtype: str
    versions: dict[str, str]
    compute: dict[str, str] = field(default_factory=dict)  # device, forward dtype and why
    timings_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    peak_rss_mib_after_stage: dict[str, float] = field(default_factory=dict)
    repair: RepairRecord | None = None

    @property
    def kept_words(self) -> str:
        """What the pruned model is, as the guard kept it: the solver's map, the map and the blocks
        repaired after it, or plain removal (the map lost on set-aside text)."""
        kept = self.guard.kept
        if kept == "plain_removal":
            return "plain removal: the map lost on set-aside text"
        if kept.startswith("repair"):
            return f"{self.solver['name']} + {kept.removeprefix('repair ')} block(s) repaired"
        return str(self.solver["name"])

    def to_json(self) -> JsonObject:
        return jsonable(asdict(self))

    @classmethod
    def from_json(cls, data: JsonObject) -> PruneRecord:
        """The record ``to_json`` wrote (``prune.json`` read back)."""
        return from_jsonable(cls, data)


def jsonable(value: Any) -> Any:
    """``value`` with string keys and floats rounded to 6 significant decimals, for JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


def from_jsonable(kind: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as ``kind``: a record dataclass, a list, dict or union of them, or a plain
    value. The inverse of ``jsonable(asdict(record))`` for the records of this module."""
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        unknown = sorted(set(value) - set(hints))
        if unknown:
            raise TypeError(f"{kind.__name__} has no field {unknown[0]!r}")
        return kind(**{k: from_jsonable(hints[k], v) for k, v in value.items()})
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return from_jsonable(next(a for a in args if a is not type(None)), value)
    if origin is list:
        return [from_jsonable(args[0], v) for v in value]
    if origin is dict:
        return {k: from_jsonable(args[1], v) for k, v in value.items()}
    return value
