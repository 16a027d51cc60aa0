"""The quality guard on a known cut, without the survey: fit the default map, score it, its blends
with plain removal and plain removal on each source's set-aside text.

For a model whose survey is long (Qwen2.5-Coder-1.5B: most of an hour on 2 cores), this answers
"what would the guard keep?" for a cut an earlier prune chose, in one pass up to the cut's last
block. ``T`` (the prior the hidden map is shrunk toward) comes from the same pass: with
``M = H·W_downᵀ`` its sums are ``W_down·A_H·W_downᵀ`` and ``W_down·B_H``.

    python -m bench.fixed_cut_guard MODEL --cut 10 17 --out out/bench/fixed-cut-guard.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rmexport.atomic import write_json
from rmexport.calib.budget import MemoryBudget
from rmexport.calib.collect import collect_hidden_statistics
from rmexport.calib.engine import Map, cut_plan, original_plan
from rmexport.models import load_tokenizer, resolve
from rmexport.prune import (
    PruneOptions,
    _guard,
    _local_checkpoint,
    calibration_set,
    open_engine,
    set_aside_by_source,
)
from rmexport.replaceme.solve import lstsq_from_gram, ridge_toward

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fixed_cut_guard", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model")
    parser.add_argument("--cut", type=int, nargs=2, required=True, metavar=("START", "END"))
    parser.add_argument("--calib-samples", type=int, default=PruneOptions.calib_samples)
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
        stats, held_stats = collect_hidden_statistics(engine, plan, [calibration, held], cut)
        down = engine.down_proj_weight(plan[cut[0] - 1])  # [d, d_ff]
        output_map = lstsq_from_gram(down @ stats.gram @ down.T, down @ stats.cross)
        choice = ridge_toward(stats, held_stats, down.T @ output_map)
        fitted_s = time.perf_counter() - started
        final = cut_plan(plan, cut, Map(choice.transform, "cut 1"))
        _, guard = _guard(engine, by_source, final)
    finally:
        engine.close()
    result = {
        "model": args.model,
        "cut": list(cut),
        "compute": options.compute().describe(),
        "calibration": calibration.describe(),
        "ridge_toward_T": choice.alpha,
        "set_aside_rel_residual": choice.set_aside_rel_residual,
        "guard": guard,
        "fit_s": round(fitted_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    for source_name, losses in guard["by_source"].items():
        print(source_name, {k: round(v, 4) for k, v in losses.items()})
    share = guard["map_share"]
    print(f"kept {guard['kept']} (share {share:g}); ridge {choice.alpha:g}; {result['wall_s']} s")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
