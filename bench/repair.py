"""Sequential closed-form repair of the blocks after a cut, measured on every held-out source.

The prune's cut and its map of the hidden activations are fitted as ``rmexport prune`` fits them.
Then the blocks after the cut are walked in order with the original model and the pruned model
side by side: block ``j``'s ``down_proj`` is refitted so that, fed the pruned model's residual
stream, the block's output matches the original model's residual stream after block ``j``
(ridge least squares toward the block's own weights, the strength chosen by the residual error
on the set-aside documents, as for the map at the cut). The next block then sees the repaired
stream, so errors are corrected in sequence rather than compounded. Each repaired block is a
map of its hidden activations (``W_down ← Wᵀ``): only weights change.

One pass gives every prefix: ``repair k`` is the pruned model with the first k blocks after the
cut repaired. Every plan is scored on the held-out windows of every source.

    python -m bench.repair smollm2-135m --cut 12 20 --blocks 6 --out out/bench/repair.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from rmexport.atomic import write_json
from rmexport.calib.budget import MemoryBudget
from rmexport.calib.collect import _accumulate, _empty_stats, cut_sums
from rmexport.calib.corpus import load_corpus
from rmexport.calib.engine import Engine, Map, Plan, Step, Stream, cut_plan, original_plan
from rmexport.calib.tokens import heldout_windows
from rmexport.models import load_tokenizer, resolve
from rmexport.prune import PruneOptions, _local_checkpoint, calibration_set, open_engine
from rmexport.replaceme.checks import perplexities, plain_removal
from rmexport.replaceme.solve import RIDGE_GRID, lstsq_from_gram, ridge_toward
from rmexport.replaceme.survey import hidden_map

__all__ = ["main"]


def _copy(engine: Engine, name: str, stream: Stream) -> Stream:
    return engine.stream(name, {b: engine.store.get(k) for b, k in stream.keys.items()}, stream.done)


def _advance(engine: Engine, name: str, stream: Stream, plan: Plan) -> Stream:
    moved = engine.advance(name, stream, {"p": plan}, desc=f"{name}: forward")["p"]
    engine.release(stream)
    return moved


class _Pair:
    """One set's original and pruned streams, kept at the same block."""

    def __init__(self, engine: Engine, name: str, batches, full: Plan, pruned: Plan, start: int, end: int):
        self.engine, self.name = engine, name
        embedded = engine.embed(name, batches)
        both = engine.advance(
            name, embedded, {"o": full[:end], "p": pruned[:start]}, desc=f"{name}: to the cut"
        )
        engine.release(embedded)
        self.original, self.pruned = both["o"], both["p"]

    def block_sums(self, full: Plan, pruned: Plan, j: int, position: int, features: int):
        """Sums of block ``j`` fed the pruned stream, toward the original stream after block ``j``."""
        engine = self.engine
        self.original = _advance(engine, self.name, self.original, full[: j + 1])
        stats = _empty_stats([j], 1, engine.config.hidden_size, features)[j]

        def on_block(_position: int, b: int, after: torch.Tensor, mlp, hidden) -> None:
            real = engine.batches[self.name][b][1].to(after.device).bool()
            target = engine.store.get(self.original.keys[b])
            _accumulate(stats, mlp[real], after[real], target[real], features=hidden[real])

        engine.walk(
            self.name,
            _copy(engine, self.name, self.pruned),
            pruned,
            until=position,
            mlp_at={position},
            hidden_at={position},
            on_block=on_block,
            desc=f"{self.name}: block {j}",
        )
        return stats

    def step(self, pruned: Plan, position: int) -> None:
        self.pruned = _advance(self.engine, self.name, self.pruned, pruned[: position + 1])

    def close(self) -> None:
        self.engine.release(self.original, self.pruned)
        self.engine.forget(self.name)


def repair(
    engine: Engine,
    calibration,
    set_aside,
    pruned: Plan,
    cut: tuple[int, int],
    blocks: int,
    grid,
) -> tuple[dict[str, Plan], list[dict[str, Any]]]:
    start, end = cut
    full = original_plan(engine.n_layers)
    pairs = [
        _Pair(engine, name, s.batches, full, pruned, start, end)
        for name, s in (("fit", calibration), ("aside", set_aside))
    ]
    plans: dict[str, Plan] = {}
    rows = []
    try:
        for k in range(blocks):
            j, position = end + k, start + k
            step_started = time.perf_counter()
            fit, aside = (
                p.block_sums(full, pruned, j, position, engine.config.intermediate_size) for p in pairs
            )
            prior = engine.down_proj_weight(pruned[position]).T
            choice = ridge_toward(fit, aside, prior, grid)
            pruned = (
                pruned[:position]
                + (Step(j, (Map(choice.transform, f"repair {j}"),)),)
                + pruned[position + 1 :]
            )
            for p in pairs:
                p.step(pruned, position)
            plans[f"repair {k + 1}"] = pruned
            row = {
                "block": j,
                "ridge": choice.alpha,
                "set_aside_rel_residual": choice.set_aside_rel_residual,
                "s": round(time.perf_counter() - step_started, 1),
            }
            rows.append(row)
            print(
                f"block {j}: ridge {choice.alpha:g}, set-aside residual "
                f"{choice.set_aside_rel_residual[str(choice.alpha)]:.5f} "
                f"(unrepaired {choice.set_aside_rel_residual['inf']:.5f}), {row['s']} s",
                flush=True,
            )
    finally:
        for p in pairs:
            p.close()
    return plans, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.repair", description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--cut", type=int, nargs=2, required=True, metavar=("START", "END"))
    parser.add_argument("--blocks", type=int, default=4, help="blocks after the cut to repair")
    parser.add_argument("--grid", default="", help="ridge strengths to choose from (default the prune's)")
    parser.add_argument("--calib-samples", type=int, default=PruneOptions.calib_samples)
    parser.add_argument("--eval-tokens", type=int, default=PruneOptions.eval_tokens)
    parser.add_argument("--ood-tokens", type=int, default=PruneOptions.ood_tokens)
    parser.add_argument("--out", type=Path, default=Path("out/bench/repair.json"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    source = resolve(args.model)
    options = PruneOptions(calib_samples=args.calib_samples)
    tokenizer = load_tokenizer(source)
    calibration = calibration_set(tokenizer, options)
    set_aside = calibration_set(tokenizer, options, set_aside=True)
    grid = tuple(float(x) for x in args.grid.split(",")) if args.grid else RIDGE_GRID
    if float("inf") not in grid:
        grid = (*grid, float("inf"))
    windows = {
        options.eval_data: heldout_windows(load_corpus(options.eval_data), tokenizer, args.eval_tokens)
    }
    for name in options.ood_data:
        windows[name] = heldout_windows(load_corpus(name), tokenizer, args.ood_tokens)
    engine = open_engine(_local_checkpoint(source), options, MemoryBudget.from_option(None))
    try:
        full, cut = original_plan(engine.n_layers), tuple(args.cut)
        sums, held = cut_sums(engine, full, [calibration, set_aside], cut, hidden=True)
        output_map = lstsq_from_gram(sums.output.gram, sums.output.cross)
        cut_map, cut_details = hidden_map(engine, full, cut, sums, held, output_map)
        pruned = cut_plan(full, cut, Map(cut_map, "cut"))
        fitted_s = time.perf_counter() - started
        plans = {"original": full, "plain removal": plain_removal(pruned), "pruned": pruned}
        began = time.perf_counter()
        repaired, rows = repair(engine, calibration, set_aside, pruned, cut, args.blocks, grid)
        repair_s = round(time.perf_counter() - began, 1)
        plans |= repaired
        ppl = {name: perplexities(engine, plans, w) for name, w in windows.items()}
    finally:
        engine.close()
    print(f"{'plan':24s}" + "".join(f"{s:>12s}" for s in windows))
    for plan_name in plans:
        print(f"{plan_name:24s}" + "".join(f"{ppl[s][plan_name]:12.2f}" for s in windows))
    result = {
        "model": args.model,
        "cut": list(cut),
        "compute": options.compute().describe(),
        "calibration": calibration.describe(),
        "grid": [str(g) for g in grid],
        "cut_ridge": cut_details["ridge_toward_T"],
        "blocks": rows,
        "ppl": {s: {p: round(v, 3) for p, v in row.items()} for s, row in ppl.items()},
        "fit_s": round(fitted_s, 1),
        "repair_s": repair_s,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json(args.out, result)
    print(f"fit {result['fit_s']} s, repair {repair_s} s, all {result['wall_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
