"""The prune's checks, streamed through the block engine in one pass over the held-out windows.

From the final plan (kept blocks, maps folded) follow three more plans over the same blocks:
* ``original``: every block, no map;
* ``plain_removal``: the same blocks removed, no map: the baseline the fit has to beat;
* ``explicit``: the original weights with each map applied after its block's MLP: the reference
  for fold parity (folding must not change what the model computes), on the first windows.
All four share the blocks before the first cut, which therefore run once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calib.engine import Engine, Plan, Step, explicit, original_plan
from ..measures import perplexity

__all__ = [
    "FOLD_PARITY_RTOL",
    "CheckResults",
    "fold_parity_rtol",
    "perplexities",
    "plain_removal",
    "run_checks",
    "source_perplexities",
]

# Fold parity: the folded model against the explicit map, in the compute dtype. In float32 the fold
# only reorders float64 products before a float32 cast, so differences are rounding: ~1e-6 relative
# to the logits (SmolLM2-135M: 1.2e-4 against logits up to 39, i.e. 3e-6). 2e-4 of the largest logit
# leaves a wide margin and still catches any real error (a wrong transpose moves logits by O(1)).
FOLD_PARITY_RTOL = 2e-4
# In a 16-bit dtype the folded weights are rounded to it and the rounding compounds over the blocks
# after the fold: SmolLM2-135M in bfloat16 differs by 2.2 % of the largest logit, while a fold that
# is missing differs by 74 % and a map scaled by 1.1 by 15 %. Eight units of the dtype's epsilon
# (6.3 % in bfloat16, 0.8 % in float16) lie between the two.
FOLD_PARITY_EPSILONS = 8


def fold_parity_rtol(dtype: torch.dtype) -> float:
    """Fold parity's tolerance, relative to the largest logit, for forwards in ``dtype``."""
    return max(FOLD_PARITY_RTOL, FOLD_PARITY_EPSILONS * torch.finfo(dtype).eps)


EVAL_BATCH_WINDOWS = 4


def plain_removal(plan: Plan) -> Plan:
    return tuple(Step(s.layer) for s in plan)


@dataclass
class CheckResults:
    ppl_original: float
    ppl_plain_removal: float
    ppl_pruned: float
    tokens: int
    parity_max_abs_logit_diff: float
    parity_max_abs_logit: float
    parity_tokens: int
    parity_rtol: float = FOLD_PARITY_RTOL

    @property
    def parity_atol(self) -> float:
        return self.parity_rtol * max(self.parity_max_abs_logit, 1.0)

    @property
    def parity_passed(self) -> bool:
        return self.parity_max_abs_logit_diff <= self.parity_atol


def _window_batches(windows: torch.Tensor, parity_windows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The parity windows first (batch 0), then the rest in batches of ``EVAL_BATCH_WINDOWS``."""
    cuts = [
        0,
        parity_windows,
        *range(parity_windows + EVAL_BATCH_WINDOWS, windows.shape[0], EVAL_BATCH_WINDOWS),
    ]
    cuts.append(windows.shape[0])
    bounds = sorted(set(c for c in cuts if 0 <= c <= windows.shape[0]))
    return [
        (windows[a:b], torch.ones_like(windows[a:b]))
        for a, b in zip(bounds, bounds[1:], strict=False)
        if b > a
    ]


def _window_targets(batches):
    return lambda b: (batches[b][0], torch.ones_like(batches[b][0][:, 1:], dtype=torch.bool))


def perplexities(engine: Engine, plans: dict[str, Plan], windows: torch.Tensor) -> dict[str, float]:
    """Held-out perplexity of each plan, in one pass that shares common prefixes."""
    batches = _window_batches(windows, min(EVAL_BATCH_WINDOWS, windows.shape[0]))
    stream = engine.embed("heldout", batches)
    ends = {}
    try:
        ends = engine.advance("heldout", stream, plans, desc="Perplexity")
        sums, _ = engine.head_pass(
            "heldout", ends, targets=_window_targets(batches), desc="Perplexity: LM head"
        )
    finally:
        engine.release(stream, *ends.values())
        engine.forget("heldout")
    return {name: perplexity(total, count) for name, (total, count) in sums.items()}


def source_perplexities(
    engine: Engine, final: Plan, windows: dict[str, torch.Tensor], known_original: dict[str, float | None]
) -> dict[str, dict[str, float]]:
    """Per text source: perplexity of the original (unless ``known_original`` has it), plain removal
    and the pruned model."""
    results = {}
    for source, w in windows.items():
        plans = {"plain_removal": plain_removal(final), "pruned": final}
        if known_original.get(source) is None:
            plans = {"original": original_plan(engine.n_layers)} | plans
        results[source] = {"original": known_original.get(source)} | perplexities(engine, plans, w)
    return results


def run_checks(
    engine: Engine,
    final: Plan,
    windows: torch.Tensor,
    parity_windows: int,
    known_original: float | None = None,
) -> CheckResults:
    """Perplexity of the original (unless ``known_original``), plain removal and pruned model on
    ``windows``, and fold parity on the first ``parity_windows`` of them."""
    parity_windows = max(1, min(parity_windows, windows.shape[0]))
    batches = _window_batches(windows, parity_windows)
    plans = {
        "plain_removal": plain_removal(final),
        "pruned": final,
        "explicit": explicit(final),
    }
    if known_original is None:
        plans = {"original": original_plan(engine.n_layers)} | plans
    stream = engine.embed("heldout", batches)
    ends = {}
    try:
        ends = engine.advance("heldout", stream, plans, only={"explicit": {0}}, desc="Checks")
        sums, diffs = engine.head_pass(
            "heldout",
            ends,
            targets=_window_targets(batches),
            compare=[("pruned", "explicit")],
            desc="Checks: LM head",
        )
    finally:
        engine.release(stream, *ends.values())
        engine.forget("heldout")

    def ppl(name: str) -> float:
        total, count = sums[name]
        return perplexity(total, count)

    parity = diffs[("pruned", "explicit")]
    return CheckResults(
        ppl_original=ppl("original") if known_original is None else known_original,
        ppl_plain_removal=ppl("plain_removal"),
        ppl_pruned=ppl("pruned"),
        tokens=sums["pruned"][1],
        parity_max_abs_logit_diff=parity.max_abs_difference,
        parity_max_abs_logit=parity.max_abs_reference,
        parity_tokens=int(batches[0][0].numel()),
        parity_rtol=fold_parity_rtol(engine.skeleton.compute_dtype),
    )
