"""Sequential closed-form repair of the blocks after a cut, every prefix measured on every held-out source.

The prune's cut and its map of the hidden activations are fitted as ``rmexport prune`` fits them, then
its repair walk (``rmexport.replaceme.repair``) refits up to ``--blocks`` blocks after the cut. Where
the prune's guard judges the stages on set-aside text, this scores each of them (``repair k``: the
first k blocks after the cut repaired) on the held-out windows of every source.

    python -m bench.repair smollm2-135m --cut 12 20 --blocks 6 --out out/bench/repair.json
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from rmexport.atomic import write_json
from rmexport.calib.budget import MemoryBudget
from rmexport.calib.collect import cut_sums
from rmexport.calib.corpus import load_corpus
from rmexport.calib.engine import Map, cut_plan, original_plan
from rmexport.calib.tokens import heldout_windows
from rmexport.models import load_tokenizer, resolve
from rmexport.prune import PruneOptions, _local_checkpoint, calibration_set, open_engine
from rmexport.replaceme.checks import perplexities, plain_removal
from rmexport.replaceme.repair import REPAIR_GRID, repair_after_cut
from rmexport.replaceme.solve import lstsq_from_gram
from rmexport.replaceme.survey import hidden_map

__all__ = ["main"]


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
    grid = tuple(float(x) for x in args.grid.split(",")) if args.grid else REPAIR_GRID
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
        sums, held = cut_sums(engine, full, [calibration, set_aside], cut, hidden=True, keep_ends=True)
        output_map = lstsq_from_gram(sums.output.gram, sums.output.cross)
        cut_map, cut_details = hidden_map(engine, full, cut, sums, held, output_map)
        pruned = cut_plan(full, cut, Map(cut_map, "cut"))
        fitted_s = time.perf_counter() - started
        plans = {"original": full, "plain removal": plain_removal(pruned), "pruned": pruned}
        walked = repair_after_cut(
            engine,
            full,
            pruned,
            cut,
            calibration,
            set_aside,
            args.blocks,
            ends=[sums.ends, held.ends],
            grid=grid,
        )
        repair_s = walked.seconds
        plans |= {f"repair {k + 1}": stage for k, stage in enumerate(walked.stages)}
        rows = [asdict(b) for b in walked.blocks]
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
