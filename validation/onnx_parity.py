"""onnxruntime vs PyTorch on held-out prompts: prefill logits and greedy decoding via the KV cache.

The ONNX graph runs in a plain ``onnxruntime.InferenceSession`` fed by hand
(validation/ort_decoder.py), decoding through its KV cache; the reference is the checkpoint in
PyTorch, float32 (the block engine, as for llama.cpp), run once along onnxruntime's decode: up to the
first difference, its choices there are its own greedy decode. Prompts are the first held-out
documents of the builtin corpus (never calibration text), tokenized, BOS-prefixed and truncated.

Checks, per precision (tolerances below):
- prefill: max |Δlogit| over every position and vocabulary entry; top-1 agreement over every
  position. A top-1 disagreement counts against the export only where the reference's top-1
  beats its runner-up by more than twice the logit tolerance (otherwise it is a tie the
  tolerance allows either way).
- decode: ``new_tokens`` greedy tokens through the cache must be identical for fp32/fp16; a
  divergence is allowed only at such a near-tie, and is reported.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from converters.onnx_export import read_export_info
from rmexport.errors import ConfigError, ShapeMismatchError, ToleranceError
from rmexport.models import checkpoint_dir, load_tokenizer, resolve
from rmexport.records import JsonObject, from_jsonable

from . import parity
from .ort_decoder import OrtDecoder
from .parity import Tolerance, heldout_prompts

__all__ = [
    "TOLERANCES",
    "OnnxParity",
    "PromptParity",
    "Tolerance",
    "compare_onnx",
    "format_table",
    "heldout_prompts",
    "print_table",
]

log = logging.getLogger(__name__)

# Where these come from (measured 2026-11-29: onnxruntime 1.32 CPU EP vs torch 2.13 CPU, 4 held-out
# prompts of up to 96 tokens = 269 positions, 32 greedy tokens each):
# - fp32, SmolLM2-135M with 8 blocks removed (22 blocks; logits span about +-30): prefill max |Δlogit|
#   4.1e-4 (optimum flavor) and 5.0e-4 (genai flavor), decode max 2.2e-4, all tokens identical.
#   Tiny random models of every family: <= 2.4e-6. Tolerance 5e-3 = 10x the largest measured value,
#   still far below what a wrong graph produces (the genai Gemma 2 graph with a misplaced sliding
#   window, measured: 0.83, top-1 agreement 0.30).
# - fp16 (optimum, CPU EP), same model: max |Δlogit| 0.103, top-1 agreement 1.0 -> 0.5 (about 5x);
#   greedy tokens may legitimately differ after a near-tie, so decode is not required to match.
# - int4 (genai, MatMulNBits block 32, symmetric RTN): logits move by ~2 on average by design, so only
#   top-1 agreement is checked. Measured on SmolLM2-135M: 0.66 for the original 30 blocks, 0.23-0.32
#   for the 22-block plain cut. 0.5 = "agrees on at least half the next-token choices"; below that
#   the int4 file is not the same model, and the check says so.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_diff=5e-3, min_top1_agreement=0.99, exact_decode=True),
    "fp16": Tolerance(max_abs_diff=0.5, min_top1_agreement=0.95),
    "int4": Tolerance(min_top1_agreement=0.5),
}
DEFAULT_PROMPTS = 4
DEFAULT_PROMPT_TOKENS = 96
DEFAULT_NEW_TOKENS = 32


@dataclass(frozen=True)
class PromptParity:
    """One prompt: prefill logits (``parity.LogitStats``'s numbers) and greedy decode through the cache."""

    prompt_tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agree: int
    positions: int
    decisive_disagreements: int
    decode_identical: bool
    decode_first_divergence: int | None  # the first step the decodes differ; None: identical
    decode_divergence_near_tie: bool
    decode_max_abs_diff: float  # over the steps up to and including the first divergence
    reference_tokens: list[int]  # PyTorch's greedy tokens, up to and including the first divergence
    onnx_tokens: list[int]

    def logit_stats(self) -> parity.LogitStats:
        return parity.LogitStats(
            max_abs_diff=self.max_abs_diff,
            mean_abs_diff=self.mean_abs_diff,
            top1_agree=self.top1_agree,
            positions=self.positions,
            decisive_disagreements=self.decisive_disagreements,
        )


@dataclass(frozen=True)
class OnnxParity:
    """``compare_onnx``'s result; ``to_json()`` is ``checks/onnx_parity.json``."""

    onnx_dir: str
    reference: str
    flavor: str
    precision: str
    providers: list[str]
    prompts: int
    new_tokens: int
    tolerance: Tolerance
    max_abs_diff: float  # the prefill's, over every prompt (so are the next four)
    mean_abs_diff: float
    top1_agreement: float
    positions: int
    top1_decisive_disagreements: int
    decode_match: float  # share of prompts decoded identically
    decode_max_abs_diff: float
    per_prompt: list[PromptParity]
    failures: list[str]  # the checks that failed, by name
    passed: bool

    def measured(self) -> parity.Measured:
        return parity.Measured(
            max_abs_diff=self.max_abs_diff,
            top1_agreement=self.top1_agreement,
            positions=self.positions,
            decode_match=self.decode_match,
            decode_tokens=self.new_tokens,
            mean_abs_diff=self.mean_abs_diff,
            top1_decisive_disagreements=self.top1_decisive_disagreements,
            decode_max_abs_diff=self.decode_max_abs_diff,
            decisive_divergences=sum(
                not p.decode_identical and not p.decode_divergence_near_tie for p in self.per_prompt
            ),
        )

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> OnnxParity:
        return from_jsonable(cls, data)


def _precision_of(onnx_dir: Path, decoder: Any) -> str:
    precision = read_export_info(onnx_dir).get("precision")
    if precision:
        return precision
    return "fp16" if decoder.kv_dtype == np.float16 else "fp32"


def _compare_prompt(
    ort_decoder: Any, reference: parity.EngineReference, prompt: list[int], new_tokens: int, tie_margin: float
) -> PromptParity:
    ort_tokens, ort_steps = ort_decoder.greedy(prompt, new_tokens, keep_logits=True)
    (along,) = reference.logits([prompt + ort_tokens[:-1]], desc="PyTorch along onnxruntime's decode")
    ref_prefill, ref_steps = along[: len(prompt)], along[len(prompt) - 1 :]
    stats = parity.compare_logits(ref_prefill, ort_decoder.forward(np.array([prompt]))[0], tie_margin)
    ref_choices = ref_steps.argmax(-1).tolist()
    same = parity.matching_prefix(ref_choices, ort_tokens)
    diverged = None if same == len(ort_tokens) else same
    same_steps = len(ort_tokens) if diverged is None else diverged + 1
    ref_tokens = ref_choices[:same_steps]
    step_diff = max(float(np.abs(ort_steps[i] - ref_steps[i]).max()) for i in range(same_steps))
    near_tie = diverged is not None and float(parity.margin(ref_steps[diverged])) <= tie_margin
    return PromptParity(
        prompt_tokens=len(prompt),
        max_abs_diff=stats.max_abs_diff,
        mean_abs_diff=stats.mean_abs_diff,
        top1_agree=stats.top1_agree,
        positions=stats.positions,
        decisive_disagreements=stats.decisive_disagreements,
        decode_identical=diverged is None,
        decode_first_divergence=diverged,
        decode_divergence_near_tie=near_tie,
        decode_max_abs_diff=step_diff,
        reference_tokens=ref_tokens,
        onnx_tokens=ort_tokens,
    )


def format_table(r: OnnxParity) -> str:
    """The result as a plain-text table (also used in the ToleranceError message)."""
    title = f"onnx parity [{r.flavor}, {r.precision}]: {r.onnx_dir} vs {r.reference}"
    return parity.format_table(r.measured(), r.tolerance, title)


def print_table(r: OnnxParity) -> None:
    parity.print_table(r.measured(), r.tolerance, f"ONNX parity [{r.flavor}, {r.precision}]  {r.onnx_dir}")


def compare_onnx(
    onnx_dir: str | Path,
    reference_ckpt: str | Path,
    *,
    n_prompts: int = DEFAULT_PROMPTS,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    raise_on_failure: bool = True,
) -> OnnxParity:
    """Compare the ONNX export in ``onnx_dir`` with ``reference_ckpt`` in PyTorch (fp32).

    Raises ToleranceError (after computing everything) when a check fails and ``raise_on_failure``.
    """
    if new_tokens < 1:
        raise ConfigError("--new-tokens must be >= 1")
    onnx_dir = Path(onnx_dir)
    decoder = OrtDecoder(onnx_dir, spinning=False)
    source = resolve(str(reference_ckpt))
    tokenizer = load_tokenizer(source)
    precision = _precision_of(onnx_dir, decoder)
    tol = TOLERANCES[precision]
    prompts = heldout_prompts(tokenizer, n_prompts, prompt_tokens)
    with parity.EngineReference.open(checkpoint_dir(source)) as reference:
        if reference.engine.n_layers != decoder.num_layers:
            raise ShapeMismatchError(
                f"the ONNX graph has {decoder.num_layers} blocks, the reference {reference.engine.n_layers}",
                hint="validate against the checkpoint the export was made from",
            )
        per_prompt = [_compare_prompt(decoder, reference, p, new_tokens, tol.tie_margin) for p in prompts]
    summary = parity.summarize([p.logit_stats() for p in per_prompt])
    unchecked = OnnxParity(
        onnx_dir=str(onnx_dir),
        reference=str(reference_ckpt),
        flavor=read_export_info(onnx_dir).get("flavor", "unknown"),
        precision=precision,
        providers=decoder.session.get_providers(),
        prompts=len(prompts),
        new_tokens=new_tokens,
        tolerance=tol,
        max_abs_diff=summary.max_abs_diff,
        mean_abs_diff=summary.mean_abs_diff,
        top1_agreement=summary.top1_agreement,
        positions=summary.positions,
        top1_decisive_disagreements=summary.top1_decisive_disagreements,
        decode_match=sum(p.decode_identical for p in per_prompt) / len(per_prompt),
        decode_max_abs_diff=max(p.decode_max_abs_diff for p in per_prompt),
        per_prompt=per_prompt,
        failures=[],
        passed=True,
    )
    failures = list(parity.check(unchecked.measured(), tol))
    result = replace(unchecked, failures=failures, passed=not failures)
    log.info(
        "onnx parity: max|Δ|=%.2e top1=%.4f decode_match=%.2f -> %s",
        result.max_abs_diff,
        result.top1_agreement,
        result.decode_match,
        "ok" if result.passed else "FAIL " + ",".join(result.failures),
    )
    if raise_on_failure and not result.passed:
        raise ToleranceError(
            "ONNX export out of tolerance: " + ", ".join(result.failures) + "\n" + format_table(result),
            hint="see the table; re-export, or compare against the checkpoint the export came from",
        )
    return result
