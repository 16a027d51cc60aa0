"""One parity framework: a runtime's logits and greedy decoding against PyTorch on held-out prompts.

Two back ends use it: ``validation/onnx_parity.py`` (onnxruntime) and ``validation/gguf_parity.py``
(llama.cpp). A back end only says how its runtime gives logits and a greedy decode, and which
tolerances apply to each precision. Everything else is here:

- ``Tolerance``: the limits of one precision (``None``: reported, not checked);
- ``heldout_prompts``: BOS + the first tokens of the builtin corpus's held-out documents (never
  calibration text);
- the PyTorch reference: ``EngineReference`` (the block engine, which streams a model bigger than
  memory from disk), run once along the runtime's greedy decode;
- the metrics: ``compare_logits`` for one prompt, ``summarize`` over prompts, ``matching_prefix``
  for greedy decodes;
- ``Measured``: what a back end measured, and ``check``: which limits it breaks;
- the table: ``format_table`` (plain text) and ``print_table`` (rich).

A top-1 disagreement or a decode divergence is a *near tie* where the reference's top-1 beats its
runner-up by at most ``Tolerance.tie_margin`` (twice the logit tolerance): the tolerance allows
either choice there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rmexport.calib.budget import MemoryBudget
from rmexport.calib.corpus import load_corpus
from rmexport.calib.engine import Engine, original_plan
from rmexport.errors import ConfigError
from rmexport.measures import kl_rows

__all__ = [
    "MIN_PROMPT_TOKENS",
    "EngineReference",
    "LogitStats",
    "LogitSummary",
    "Measured",
    "Tolerance",
    "check",
    "compare_logits",
    "format_table",
    "heldout_prompts",
    "margin",
    "matching_prefix",
    "print_table",
    "summarize",
]

MIN_PROMPT_TOKENS = 8


@dataclass(frozen=True)
class Tolerance:
    """Limits one runtime precision must meet. ``None`` (or ``False``): reported, not checked."""

    min_top1_agreement: float | None = None
    max_abs_diff: float | None = None  # prefill logits, and decode logits where the back end has them
    max_mean_kl: float | None = None
    min_decode_match: float | None = None  # fraction of greedy tokens identical before the first miss
    exact_decode: bool = False  # every prompt decodes identically; a divergence at a near tie excepted

    @property
    def tie_margin(self) -> float:
        return 2 * (self.max_abs_diff or 0.0)


# --- prompts ---------------------------------------------------------------------------------
def heldout_prompts(
    tokenizer: Any,
    n_prompts: int,
    max_tokens: int,
    *,
    min_tokens: int = MIN_PROMPT_TOKENS,
    need_all: bool = True,
) -> list[list[int]]:
    """The first ``n_prompts`` held-out documents of at least ``min_tokens`` tokens, each as BOS +
    up to ``max_tokens - 1`` tokens. Fewer than ``n_prompts`` is an error when ``need_all``, and
    none always is."""
    if n_prompts < 1 or max_tokens < min_tokens:
        raise ConfigError(f"need at least 1 prompt of at least {min_tokens} tokens")
    bos = tokenizer.bos_token_id
    prompts = []
    for doc in load_corpus("builtin").heldout:
        text = doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        body = ids[: max_tokens - (bos is not None)]
        if len(body) < min_tokens:
            continue
        prompts.append(([bos] if bos is not None else []) + body)
        if len(prompts) == n_prompts:
            return prompts
    if not prompts or need_all:
        raise ConfigError(f"the held-out text has only {len(prompts)} documents of >= {min_tokens} tokens")
    return prompts


# --- the PyTorch reference -------------------------------------------------------------------
class EngineReference:
    """The reference checkpoint run by the block engine: a model bigger than memory streams from
    disk as in a prune. Open with ``EngineReference.open(checkpoint)``."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.plan = original_plan(engine.n_layers)

    @classmethod
    @contextmanager
    def open(cls, checkpoint: str | Path) -> Iterator[EngineReference]:
        engine = Engine.open(checkpoint, MemoryBudget.from_option(None))
        try:
            yield cls(engine)
        finally:
            engine.close()

    def logits(self, prompts: list[list[int]], desc: str = "PyTorch logits") -> list[np.ndarray]:
        """Every position's float32 logits ``[T, V]`` of each prompt."""
        return [r.numpy() for r in self.engine.logits(self.plan, prompts, desc=desc)]

    def choices_along(self, prompt: list[int], decoded: list[int], desc: str = "PyTorch decode") -> list[int]:
        """PyTorch's greedy choice at every step of ``prompt`` followed by ``decoded``: up to the
        first difference from ``decoded``, this is PyTorch's own greedy decode."""
        forced = self.engine.logits(self.plan, [prompt + decoded[:-1]], desc=desc)[0]
        return forced[len(prompt) - 1 :].argmax(-1).tolist()


# --- metrics ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogitStats:
    """One prompt's runtime logits against the reference's (``compare_logits``)."""

    max_abs_diff: float
    mean_abs_diff: float
    top1_agree: int  # positions where both pick the same token
    positions: int
    decisive_disagreements: int | None = None  # top-1 disagreements that are not near ties; None: not counted
    kl: np.ndarray | None = None  # KL(reference ‖ runtime) at each position; None: not computed


@dataclass(frozen=True)
class LogitSummary:
    """The prompts' ``LogitStats`` together (``summarize``); None: not measured on every prompt."""

    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    positions: int
    top1_decisive_disagreements: int | None = None
    mean_kl: float | None = None


def margin(logits: np.ndarray) -> np.ndarray:
    """top-1 minus top-2 logit along the last axis."""
    top2 = np.partition(logits, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def compare_logits(
    ref: np.ndarray, got: np.ndarray, tie_margin: float | None = None, kl: bool = False
) -> LogitStats:
    """One prompt's runtime logits ``got`` against the reference's, both ``[T, V]``: max and mean
    |Δlogit|, top-1 agreement, and (``tie_margin`` given) the top-1 disagreements that are not near
    ties; with ``kl``, the per-position KL(reference ‖ runtime)."""
    diff = np.abs(got - ref)
    agree = got.argmax(-1) == ref.argmax(-1)
    return LogitStats(
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        top1_agree=int(agree.sum()),
        positions=int(agree.size),
        decisive_disagreements=(
            None if tie_margin is None else int((~agree & (margin(ref) > tie_margin)).sum())
        ),
        kl=kl_rows(ref, got) if kl else None,
    )


def summarize(per_prompt: list[LogitStats]) -> LogitSummary:
    """The prompts' ``compare_logits`` together: max |Δ|, mean of the mean |Δ|, top-1 agreement over
    all positions, and (where measured) the decisive disagreements and the mean KL over all positions."""
    positions = sum(p.positions for p in per_prompt)
    decisive = [p.decisive_disagreements for p in per_prompt]
    kl = [p.kl for p in per_prompt]
    return LogitSummary(
        max_abs_diff=max(p.max_abs_diff for p in per_prompt),
        mean_abs_diff=float(np.mean([p.mean_abs_diff for p in per_prompt])),
        top1_agreement=sum(p.top1_agree for p in per_prompt) / positions,
        positions=positions,
        top1_decisive_disagreements=None if None in decisive else sum(decisive),
        mean_kl=None if any(k is None for k in kl) else float(np.concatenate(kl).mean()),
    )


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two decodes share before the first difference."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# --- the check ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """What ``check`` and the table read of one back end's result. ``None``: the back end does not
    measure it, and is not held to it."""

    max_abs_diff: float  # prefill
    top1_agreement: float
    positions: int
    decode_match: float
    decode_tokens: int  # new tokens of each greedy decode
    mean_abs_diff: float | None = None
    mean_kl: float | None = None
    top1_decisive_disagreements: int | None = None
    decode_max_abs_diff: float | None = None
    # One decode compared token by token: the tokens identical before the first miss. None: one decode
    # per prompt, each compared whole (``decode_match`` is then the share of prompts decoded alike).
    decode_matching_tokens: int | None = None
    decisive_divergences: int | None = None  # prompts whose decode diverged away from a near tie
    tokenization_probes: int | None = None
    tokenization_mismatches: int = 0


def check(measured: Measured, tol: Tolerance) -> dict[str, str]:
    """``{failed check: message}`` for every limit of ``tol`` that ``measured`` breaks. A limit applies
    to the numbers the back end has: one that does not measure something is not held to it."""

    def over(value: float | None, limit: float | None) -> bool:
        return limit is not None and value is not None and value > limit

    def under(value: float | None, limit: float | None) -> bool:
        return limit is not None and value is not None and value < limit

    m = measured
    failures = {}
    if under(m.top1_agreement, tol.min_top1_agreement):
        failures["top1_agreement"] = f"top-1 agreement {m.top1_agreement:.4f} < {tol.min_top1_agreement}"
    if over(m.mean_kl, tol.max_mean_kl):
        failures["mean_kl"] = f"mean KL {m.mean_kl:.3g} > {tol.max_mean_kl}"
    if over(m.max_abs_diff, tol.max_abs_diff):
        failures["max_abs_diff"] = f"max |Δ| {m.max_abs_diff:.3g} > {tol.max_abs_diff}"
    if tol.max_abs_diff is not None and m.top1_decisive_disagreements:
        failures["top1_decisive_disagreements"] = (
            f"{m.top1_decisive_disagreements} top-1 disagreements that are not near ties"
        )
    if over(m.decode_max_abs_diff, tol.max_abs_diff):
        failures["decode_max_abs_diff"] = f"decode max |Δ| {m.decode_max_abs_diff:.3g} > {tol.max_abs_diff}"
    if under(m.decode_match, tol.min_decode_match):
        failures["decode_match"] = f"greedy decode matched {m.decode_match:.2f} < {tol.min_decode_match}"
    if tol.exact_decode and m.decisive_divergences:
        failures["decode_match"] = "greedy decode diverged away from a near tie"
    return failures


# --- the table -------------------------------------------------------------------------------
def _rows(m: Measured, tol: Tolerance) -> list[tuple[str, str, str, str]]:
    """check, value, tolerance, ok/FAIL/- for what ``m`` measured."""
    bad = set(check(m, tol)) | ({"tokenization"} if m.tokenization_mismatches else set())
    rows: list[tuple[str, str, str, str]] = []

    def add(label: str, value: str, name: str | None = None, limit: str | None = None) -> None:
        """A row; ``name``: the check it shows (None: informative), ``limit`` None: not checked."""
        if name is None:
            rows.append((label, value, "", ""))
        else:
            status = "-" if limit is None else ("FAIL" if name in bad else "ok")
            rows.append((label, value, limit or "not checked", status))

    def limit(op: str, value: float | None, spec: str = "") -> str | None:
        return None if value is None else f"{op} {value:{spec}}"

    atol = limit("<=", tol.max_abs_diff, ".1e")
    add("prefill max |Δlogit|", f"{m.max_abs_diff:.3e}", "max_abs_diff", atol)
    if m.mean_abs_diff is not None:
        add("prefill mean |Δlogit|", f"{m.mean_abs_diff:.3e}")
    if m.mean_kl is not None:
        add("prefill mean KL", f"{m.mean_kl:.3e}", "mean_kl", limit("<=", tol.max_mean_kl, ".1e"))
    top1 = f"{m.top1_agreement:.4f} ({m.positions} positions)"
    add("prefill top-1 agreement", top1, "top1_agreement", limit(">=", tol.min_top1_agreement))
    if m.top1_decisive_disagreements is not None:
        decisive = str(m.top1_decisive_disagreements)
        add("top-1 disagreements, not ties", decisive, "top1_decisive_disagreements", atol and "0")
    n = m.decode_tokens
    if m.decode_matching_tokens is not None:
        least = limit(">=", tol.min_decode_match, ".2f")
        value = f"{m.decode_matching_tokens}/{n} before the first miss"
        add(f"decode {n} tokens identical", value, "decode_match", least and f"{least} of them")
    else:
        exact = "all (ties excepted)" if tol.exact_decode else None
        add(f"decode {n} tokens identical", f"{m.decode_match:.2f} of prompts", "decode_match", exact)
    if m.decode_max_abs_diff is not None:
        add("decode max |Δlogit|", f"{m.decode_max_abs_diff:.3e}", "decode_max_abs_diff", atol)
    if m.tokenization_probes is not None:
        probes = m.tokenization_probes
        value = f"{probes - m.tokenization_mismatches}/{probes} texts"
        add("tokenizer splits sample text alike", value, "tokenization", "all")
    return rows


def format_table(measured: Measured, tol: Tolerance, title: str) -> str:
    """What was measured, against ``tol``, as a plain-text table under ``title`` (also used in
    ToleranceError messages)."""
    rows = [("check", "value", "tolerance", ""), *_rows(measured, tol)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [title]
    for r in rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())
    return "\n".join(lines)


def print_table(measured: Measured, tol: Tolerance, title: str) -> None:
    """What was measured, against ``tol``, as a rich table on the terminal."""
    table = Table(title=escape(title))
    for column in ("check", "value", "tolerance", ""):
        table.add_column(column)
    for row in _rows(measured, tol):
        table.add_row(*row, style="red" if row[3] == "FAIL" else None)
    Console().print(table)
