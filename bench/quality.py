"""The fixed quality benchmark: every selection rule × solver on one model, one calibration set.

Protocol (fixed so numbers compare across versions): calibration on the prune's default text (a mixture
of sources, ``--calib-data``); every source's documents sorted, shuffled with ``random.Random(0)``; the
first 90 % is the calibration pool (its first documents are used), the last 10 % is held out.
Evaluation on the built-in corpus (Wikipedia summaries). Held-out text: the held-out extracts
joined with a blank line, tokenized without special tokens, the first 65,536 tokens in
non-overlapping 512-token windows, each prefixed with BOS; float32; PPL = exp(mean NLL over all
65,536 predicted tokens).

One calibration pass measures every candidate cut; each rule's cut is then fitted, folded into
a copy of the model and evaluated. Rows: original, and per rule its cut with plain removal,
lstsq and cosine, each with the map of the MLP's hidden activations (the default) and of its
output (ReplaceMe's T). ``--blocks`` adds multi-cut rows (each cut chosen on the already pruned model).

    python -m bench.quality --out out/bench
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rmexport.atomic import write_json
from rmexport.calib.budget import MemoryBudget
from rmexport.calib.corpus import load_corpus
from rmexport.calib.engine import Map, cut_plan, original_plan
from rmexport.calib.tokens import heldout_windows, mixture_batches
from rmexport.models import checkpoint_dir, load_tokenizer, resolve
from rmexport.prune import PruneOptions, open_engine
from rmexport.replaceme.checks import perplexities
from rmexport.replaceme.select import choose_start, cut_size, split_cut
from rmexport.replaceme.solve import CosineSettings
from rmexport.replaceme.survey import SelectionScorer, fit_cut, survey_candidates

__all__ = ["main", "run_benchmark"]

RULES = {
    "distance (last token, reference)": ("distance", "last"),
    "distance (all tokens)": ("distance", "all"),
    "fit": ("fit", "last"),
    "loss": ("loss", "last"),
}
STATS_BUDGET = 2**32


def _cosine_summary(details: dict[str, Any]) -> dict[str, Any]:
    keys = ("epochs", "best_epoch", "stopped", "loss_curve", "validation_curve")
    return {"cosine": {k: details[k] for k in keys if k in details}}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    source = resolve(args.model)
    tokenizer = load_tokenizer(source)
    corpus = load_corpus("builtin")
    calibration = mixture_batches(
        args.calib_data,
        tokenizer,
        n_samples=args.calib_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    selection = mixture_batches(
        args.calib_data,
        tokenizer,
        n_samples=64,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        offset=args.calib_samples,
    )
    windows = heldout_windows(corpus, tokenizer, args.eval_tokens)
    engine = open_engine(checkpoint_dir(source), PruneOptions(), MemoryBudget.from_option(None))
    scorer = SelectionScorer(engine, selection)
    n_layers = engine.n_layers
    n = cut_size(n_layers, args.ratio)
    full = original_plan(n_layers)
    plans = {"original": full}
    rows: list[dict[str, Any]] = [
        {"rule": "original", "cut": None, "solver": "-", "plan": "original", "prune_s": 0.0}
    ]

    started = time.perf_counter()
    survey = survey_candidates(engine, full, calibration, n, stats_budget_bytes=STATS_BUDGET)
    survey_s = time.perf_counter() - started
    fitted: dict[tuple[int, str], tuple[str, float, dict[str, Any]]] = {}
    for label, (rule, tokens) in RULES.items():
        scores = survey.scores(tokens)
        rule_started = time.perf_counter()
        if rule == "loss":
            shortlist = sorted(scores.fit, key=lambda s: (scores.fit[s], s))[:5]
            scores.loss = scorer.trial_losses(full, n, survey.maps, shortlist)
        start = choose_start(scores, rule)
        select_s = survey_s + time.perf_counter() - rule_started
        cut = (start, start + n)
        variants = [("removal", None)] + [(solver, m) for solver in args.solvers for m in args.maps]
        for solver, map_space in variants:
            key = (start, solver, map_space)
            if key not in fitted:
                fit_started = time.perf_counter()
                name, new_map, extra = f"{start}-{solver}-{map_space}", None, {}
                if solver != "removal":
                    result = fit_cut(
                        engine,
                        full,
                        calibration,
                        survey,
                        start,
                        solver=solver,
                        map_space=map_space,
                        set_aside=selection,
                        stats_budget_bytes=STATS_BUDGET,
                        cosine=CosineSettings(),
                        validate=scorer.validator(full, cut),
                    )
                    new_map = Map(result.transform, name)
                    extra = {"map": result.details["map"]}
                    extra |= _cosine_summary(result.details) if solver == "cosine" else {}
                    if result.details["map"] == "hidden":
                        extra["ridge_toward_T"] = result.details["ridge_toward_T"]
                plans[name] = cut_plan(full, cut, new_map)
                fitted[key] = (name, time.perf_counter() - fit_started, extra)
            name, fit_s, extra = fitted[key]
            solver_name = "plain removal" if solver == "removal" else f"{solver}, map of the {map_space}"
            rows.append(
                {
                    "rule": label,
                    "cut": list(cut),
                    "solver": solver_name,
                    "plan": name,
                    "prune_s": round(select_s + fit_s, 1),
                }
                | extra
            )
    for blocks in args.blocks:
        if blocks < 2:
            continue
        started = time.perf_counter()
        plan = full
        removed: list[list[int]] = []
        for size in split_cut(n, blocks):
            step_survey = survey_candidates(engine, plan, calibration, size, stats_budget_bytes=STATS_BUDGET)
            start = choose_start(step_survey.scores("last"), "fit")
            result = fit_cut(
                engine,
                plan,
                calibration,
                step_survey,
                start,
                map_space=args.maps[0],
                set_aside=selection,
                stats_budget_bytes=STATS_BUDGET,
            )
            removed.append([s.layer for s in plan[start : start + size]])
            plan = cut_plan(plan, (start, start + size), Map(result.transform))
        name = f"fit-{blocks}-cuts"
        plans[name] = plan
        rows.append(
            {
                "rule": f"fit, {blocks} cuts",
                "cut": [[r[0], r[-1] + 1] for r in removed],
                "solver": f"lstsq, map of the {args.maps[0]}",
                "plan": name,
                "prune_s": round(time.perf_counter() - started, 1),
            }
        )
    scorer.close()
    ppl = perplexities(engine, plans, windows)
    engine.close()
    for row in rows:
        row["ppl"] = round(ppl[row.pop("plan")], 3)
        cut = "-" if row["cut"] is None else str(row["cut"])
        print(
            f"{row['rule']:36s} {cut:10s} {row['solver']:14s} PPL {row['ppl']:9.2f}  ({row['prune_s']:.0f} s)"
        )
    return {
        "model": source.spec,
        "ratio": args.ratio,
        "L": n_layers,
        "n": n,
        "calibration": calibration.describe(),
        "eval_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "survey_s": round(survey_s, 1),
        "rows": rows,
    }


def _markdown(result: dict[str, Any]) -> str:
    lines = ["| rule | cut | solver | held-out PPL | pruning time (s) |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        cut = "–" if row["cut"] is None else str(row["cut"])
        lines.append(f"| {row['rule']} | {cut} | {row['solver']} | {row['ppl']:.2f} | {row['prune_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--calib-data", default=PruneOptions.calib_data)
    parser.add_argument("--calib-samples", type=int, default=PruneOptions.calib_samples)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--solvers", default="lstsq,cosine", type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument(
        "--maps",
        default="hidden,output",
        type=lambda s: [x for x in s.split(",") if x],
        help="what the map reads (the first is also used for the multi-cut rows)",
    )
    parser.add_argument("--blocks", default="2", type=lambda s: [int(x) for x in s.split(",") if x])
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    args = parser.parse_args(argv)
    result = run_benchmark(args)
    write_json(args.out / "quality.json", result)
    (args.out / "quality.md").write_text(_markdown(result))
    print(_markdown(result))
    print(f"wrote {args.out / 'quality.json'} and {args.out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
