"""The fixed quality benchmark: every selection rule × solver on one model, one calibration set.

Protocol (fixed so numbers compare across versions): built-in corpus, titles sorted, shuffled
with ``random.Random(0)``; the first 90 % is the calibration pool (its first documents are used),
the last 10 % is held out. Held-out text: the held-out extracts joined with a blank line,
tokenized without special tokens, the first 65,536 tokens in non-overlapping 512-token windows,
each prefixed with BOS; float32; PPL = exp(mean NLL over all 65,536 predicted tokens).

One calibration pass measures every candidate cut; each rule's cut is then fitted, folded into
a copy of the model and evaluated. Rows: original, and per rule its cut with plain removal,
lstsq and cosine. ``--blocks`` adds multi-cut rows (each cut chosen on the already pruned model).

    python -m validation.bench_quality --out out/bench
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch

from rmexport.arch import adapter_for
from rmexport.atomic import write_json
from rmexport.calib.corpus import load_corpus
from rmexport.calib.tokens import calibration_batches, heldout_windows
from rmexport.models import load_model, load_tokenizer, resolve
from rmexport.replaceme.apply import remove_blocks
from rmexport.replaceme.checks import apply_fold
from rmexport.replaceme.select import choose_start, cut_size, split_cut
from rmexport.replaceme.solve import CosineSettings
from rmexport.replaceme.survey import (
    WholeModel,
    fit_cut,
    selection_loss,
    selection_validator,
    survey_candidates,
)

from .perplexity import perplexity, torch_forward

__all__ = ["main", "run_benchmark"]

RULES = {
    "distance (last token, reference)": ("distance", "last"),
    "distance (all tokens)": ("distance", "all"),
    "fit": ("fit", "last"),
    "loss": ("loss", "last"),
}


def _ppl(model: Any, windows: torch.Tensor) -> float:
    return perplexity(torch_forward(model), windows).ppl


def _pruned_copy(model: Any, adapter: Any, start: int, n: int, transform: torch.Tensor | None) -> Any:
    pruned = copy.deepcopy(model)
    if transform is not None:
        apply_fold(adapter, adapter.block(pruned, start - 1), transform)
    remove_blocks(pruned, adapter, (start, start + n))
    return pruned


def _cosine_summary(details: dict[str, Any]) -> dict[str, Any]:
    keys = ("epochs", "best_epoch", "stopped", "loss_curve", "validation_curve")
    return {"cosine": {k: details[k] for k in keys if k in details}}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    source = resolve(args.model)
    tokenizer = load_tokenizer(source)
    corpus = load_corpus("builtin")
    calibration = calibration_batches(
        corpus, tokenizer, n_samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size
    )
    selection = calibration_batches(
        corpus,
        tokenizer,
        n_samples=64,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        offset=args.calib_samples,
    )
    windows = heldout_windows(corpus, tokenizer, args.eval_tokens)
    model = load_model(source, dtype=torch.float32)
    adapter = adapter_for(model.config)
    n_layers = model.config.num_hidden_layers
    n = cut_size(n_layers, args.ratio)
    rows: list[dict[str, Any]] = []

    def add(rule: str, cut: Any, solver: str, ppl: float, seconds: float, **extra: Any) -> None:
        row = {"rule": rule, "cut": cut, "solver": solver, "ppl": round(ppl, 3), "prune_s": round(seconds, 1)}
        rows.append(row | extra)
        print(f"{rule:36s} {str(cut):10s} {solver:14s} PPL {ppl:9.2f}  ({seconds:.0f} s)", flush=True)

    add("original", None, "-", _ppl(model, windows), 0.0)
    started = time.perf_counter()
    survey = survey_candidates(WholeModel(model, adapter), calibration, n)
    survey_s = time.perf_counter() - started
    evaluated: dict[tuple[int, str], float] = {}
    for label, (rule, tokens) in RULES.items():
        scores = survey.scores(tokens)
        rule_started = time.perf_counter()
        if rule == "loss":
            shortlist = sorted(scores.fit, key=lambda s: (scores.fit[s], s))[:5]
            scores.loss = selection_loss(model, adapter, survey, shortlist, selection)
        start = choose_start(scores, rule)
        select_s = survey_s + time.perf_counter() - rule_started
        cut = [start, start + n]
        for solver in ["removal", *args.solvers]:
            if (start, solver) not in evaluated:
                fit_started = time.perf_counter()
                transform, extra = None, {}
                if solver != "removal":
                    result = fit_cut(
                        WholeModel(model, adapter),
                        calibration,
                        survey,
                        start,
                        solver=solver,
                        cosine=CosineSettings(),
                        validate=selection_validator(model, adapter, survey, start, selection),
                    )
                    transform = result.transform
                    extra = _cosine_summary(result.details) if solver == "cosine" else {}
                fit_s = time.perf_counter() - fit_started
                pruned = _pruned_copy(model, adapter, start, n, transform)
                evaluated[(start, solver)] = (_ppl(pruned, windows), fit_s, extra)
                del pruned
            ppl, fit_s, extra = evaluated[(start, solver)]
            solver_name = "plain removal" if solver == "removal" else solver
            add(label, cut, solver_name, ppl, select_s + fit_s, **extra)
    for blocks in args.blocks:
        if blocks < 2:
            continue
        started = time.perf_counter()
        pruned = copy.deepcopy(model)
        kept = list(range(n_layers))
        removed: list[list[int]] = []
        for size in split_cut(n, blocks):
            pruned_source = WholeModel(pruned, adapter)
            step_survey = survey_candidates(pruned_source, calibration, size)
            start = choose_start(step_survey.scores("last"), "fit")
            result = fit_cut(pruned_source, calibration, step_survey, start)
            apply_fold(adapter, adapter.block(pruned, start - 1), result.transform)
            kept_now = remove_blocks(pruned, adapter, (start, start + size))
            removed.append(kept[start : start + size])
            kept = [kept[i] for i in kept_now]
        seconds = time.perf_counter() - started
        add(
            f"fit, {blocks} cuts",
            [[r[0], r[-1] + 1] for r in removed],
            "lstsq",
            _ppl(pruned, windows),
            seconds,
        )
        del pruned
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
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--solvers", default="lstsq,cosine", type=lambda s: [x for x in s.split(",") if x])
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
