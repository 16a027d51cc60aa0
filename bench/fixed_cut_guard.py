"""The quality guard on a known cut, without the survey: the default map, maps of other ridge
strengths toward ``T``, blends with plain removal, and plain removal, each scored on each source's
set-aside text.

A ridge strength α gives ``W = solve(A + α·mean(diag A)·I, B + α·mean(diag A)·W_downᵀ·T)`` (α = inf
is ``T`` itself, folded as a map of the hidden activations). A blend with share s folds
``s·W + (1 − s)·W_downᵀ``: the block adds s of the fitted MLP output and the rest of the unchanged
one. Blends were tried as a rule for the guard and never paid (docs/quality.md).

For a model whose survey is long (Qwen2.5-Coder-1.5B), this answers "what would the guard keep?"
for a cut an earlier prune chose, in one pass up to the cut's last block.

    python -m bench.fixed_cut_guard MODEL --cut 10 17 --ridge 1,10,inf --out out/bench/fixed-cut-guard.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rmexport.atomic import write_json
from rmexport.calib.budget import MemoryBudget
from rmexport.calib.collect import cut_sums
from rmexport.calib.engine import Map, Plan, cut_plan, original_plan
from rmexport.measures import token_nll
from rmexport.models import load_tokenizer, resolve
from rmexport.prune import (
    PruneOptions,
    _local_checkpoint,
    calibration_set,
    open_engine,
    set_aside_by_source,
)
from rmexport.replaceme.checks import plain_removal
from rmexport.replaceme.solve import lstsq_from_gram, ridge_toward
from rmexport.replaceme.survey import SelectionScorer

__all__ = ["main"]


def _losses(engine, by_source, plans: dict[str, Plan], shared: int) -> dict[str, dict[str, float]]:
    losses = {}
    for source, selection in by_source.items():
        scorer = SelectionScorer(engine, selection)
        try:
            losses[source] = scorer.losses(plans, shared=shared)
        finally:
            scorer.close()
    return losses


def _token_classes(ids: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """Per predicted token (position t predicts t + 1): 0 a special token or one of the two after
    one (a chat template's role header), 1 another of the first 32 positions, 2 the rest."""
    near = torch.isin(ids, special)
    for k in (1, 2):
        near[:, k:] |= torch.isin(ids[:, :-k], special)
    classes = torch.full((ids.shape[0], ids.shape[1] - 1), 2)
    classes[:, :32] = 1
    classes[near[:, 1:]] = 0
    return classes


def _losses_by_token_class(engine, selection, plans: dict[str, Plan], special: torch.Tensor) -> dict:
    """Mean next-token loss of each plan (and of the original) on ``selection``, by token class."""
    names = ("template", "first 32", "rest")
    plans = plans | {"original": original_plan(engine.n_layers)}
    embedded = engine.embed("by-token", selection.batches)
    ends = engine.advance("by-token", embedded, plans, desc="By token")
    seen: dict[tuple[str, int], int] = {}
    sums = {p: torch.zeros(3, dtype=torch.float64) for p in plans}
    counts = {p: torch.zeros(3, dtype=torch.float64) for p in plans}

    def on_logits(stream: str, b: int, logits: torch.Tensor) -> None:
        ids, mask = selection.batches[b]
        lo = seen.get((stream, b), 0)
        hi = lo + logits.shape[1]
        seen[(stream, b)] = hi
        hi = min(hi, ids.shape[1] - 1)
        if hi <= lo:
            return
        nll = token_nll(logits[:, : hi - lo], ids[:, lo + 1 : hi + 1])
        counted = mask[:, lo + 1 : hi + 1].bool()
        classes = _token_classes(ids, special)[:, lo:hi]
        for c in range(3):
            chosen = counted & (classes == c)
            sums[stream][c] += nll[chosen].sum()
            counts[stream][c] += chosen.sum()

    def targets(b: int):
        ids, mask = selection.batches[b]
        return ids, mask[:, 1:].bool()

    try:
        engine.head_pass("by-token", ends, targets=targets, on_logits=on_logits)
    finally:
        engine.release(embedded, *ends.values())
        engine.forget("by-token")
    return {
        p: {
            names[c]: [round(float(sums[p][c] / max(counts[p][c], 1)), 4), int(counts[p][c])]
            for c in range(3)
        }
        for p in plans
    }


def _numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fixed_cut_guard", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model")
    parser.add_argument("--cut", type=int, nargs=2, required=True, metavar=("START", "END"))
    parser.add_argument("--calib-samples", type=int, default=PruneOptions.calib_samples)
    parser.add_argument("--ridge", default="", help="more strengths to score, e.g. 1,10,inf")
    parser.add_argument("--shares", default="", help="blends of the default map to score, e.g. 0.75,0.5")
    parser.add_argument(
        "--by-token", default="", help="a source whose set-aside loss is also split by token class"
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench/fixed-cut-guard.json"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    source = resolve(args.model)
    options = PruneOptions(calib_samples=args.calib_samples)
    tokenizer = load_tokenizer(source)
    calibration = calibration_set(tokenizer, options)
    held = calibration_set(tokenizer, options, set_aside=True)
    by_source = set_aside_by_source(tokenizer, options)
    engine = open_engine(_local_checkpoint(source), options, MemoryBudget.from_option(None))
    try:
        plan, cut = original_plan(engine.n_layers), tuple(args.cut)
        sums, held_sums = cut_sums(engine, plan, [calibration, held], cut, hidden=True)
        output_map = lstsq_from_gram(sums.output.gram, sums.output.cross)
        down = engine.down_proj_weight(plan[cut[0] - 1])  # [d, d_ff]
        choice = ridge_toward(sums.hidden, held_sums.hidden, down.T @ output_map)
        fitted_s = time.perf_counter() - started
        prior = down.T @ output_map
        maps = {"fitted": choice.transform}
        residuals = dict(choice.set_aside_rel_residual)
        for alpha in _numbers(args.ridge):
            extra = ridge_toward(sums.hidden, held_sums.hidden, prior, (alpha,))
            maps[f"ridge {alpha:g}"] = extra.transform
            residuals |= extra.set_aside_rel_residual
        unchanged = down.T.to(torch.float64)
        for share in _numbers(args.shares):
            maps[f"share {share:g}"] = share * choice.transform + (1 - share) * unchanged
        plans = {name: cut_plan(plan, cut, Map(m, name)) for name, m in maps.items()}
        plans["plain_removal"] = plain_removal(plans["fitted"])
        losses = _losses(engine, by_source, plans, shared=cut[0] - 1)
        by_token = (
            _losses_by_token_class(
                engine, by_source[args.by_token], plans, torch.tensor(tokenizer.all_special_ids)
            )
            if args.by_token
            else None
        )
    finally:
        engine.close()
    result = {
        "model": args.model,
        "cut": list(cut),
        "compute": options.compute().describe(),
        "calibration": calibration.describe(),
        "ridge_toward_T": choice.alpha,
        "set_aside_rel_residual": residuals,
        "set_aside_loss": losses,
        "by_token_class": by_token and {"source": args.by_token, "loss_and_count": by_token},
        "fit_s": round(fitted_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    for source_name, row in losses.items():
        print(source_name, {k: round(v, 4) for k, v in row.items()})
    for plan_name, row in (by_token or {}).items():
        print(args.by_token, plan_name, row)
    print(f"ridge {choice.alpha:g}; {result['wall_s']} s")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
