"""Does the fitted map travel? Each fitting/selection idea against text unlike the calibration data.

One model, one ratio. For each calibration mix (Wikipedia only, the default; or a mix of offline
sources), one pass measures every candidate cut on the calibration documents and a second on the
documents set aside after them. Then each idea picks a cut and a map:

* ``fit``: the cut with the smallest in-sample fit error, the plain least-squares map (the default
  before out-of-domain checks existed);
* ``fit, cv``: the cut with the smallest fit error on the set-aside documents;
* ``ridge``: ``solve(A + αI, B)``, α chosen on the set-aside documents;
* ``shrink``: ``I + λ(T − I)`` (toward plain removal), λ chosen on the set-aside documents;
* ``ridge→I``: ``solve(A + αI, B + αI)`` (a ridge that pulls toward plain removal), α on set-aside;
* ``hidden``: at the ``fit`` cut, the map of the MLP's hidden activations (the least-squares
  ``down_proj``, d_ff×d) shrunk toward the ``fit`` map by the ridge strength the set-aside
  documents choose: what ``rmexport prune`` does by default; ``hidden, α=0`` without the ridge.

Every plan (original, plain removal of each cut, each idea) is evaluated in one pass per source on
the held-out part of Wikipedia and of each out-of-domain source.

    python -m bench.generalization --out out/bench/generalization.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from rmexport.atomic import write_json
from rmexport.calib.budget import MemoryBudget
from rmexport.calib.collect import collect, cut_sums
from rmexport.calib.corpus import BUILTIN, OUT_OF_DOMAIN, load_corpus
from rmexport.calib.engine import Map, cut_plan, original_plan
from rmexport.calib.tokens import heldout_windows, mixture_batches
from rmexport.models import checkpoint_dir, load_tokenizer, resolve
from rmexport.prune import PruneOptions, open_engine
from rmexport.replaceme.checks import perplexities
from rmexport.replaceme.select import candidate_starts, cut_size
from rmexport.replaceme.solve import lstsq_from_gram, residual_energy
from rmexport.replaceme.survey import hidden_map

__all__ = ["main"]

ALPHAS = [0.0] + [10.0**k for k in range(-4, 3)]


def _rel(stats, transform) -> float:
    return residual_energy(stats, transform) / stats.stream_energy


def _ridge_to_identity(stats, alpha: float) -> torch.Tensor:
    eye = torch.eye(stats.gram.shape[0], dtype=torch.float64)
    return lstsq_from_gram(stats.gram, stats.cross + alpha * eye * _scale(stats), alpha * _scale(stats))


def _scale(stats) -> float:
    """α is relative to the mean diagonal of A, so one grid suits every block."""
    return float(torch.diagonal(stats.gram).mean())


def _ideas(fit_stats, held_stats, starts) -> dict[str, tuple[int, torch.Tensor, dict[str, Any]]]:
    d = fit_stats[starts[0]].gram.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    maps = {s: lstsq_from_gram(fit_stats[s].gram, fit_stats[s].cross) for s in starts}
    in_sample = {s: _rel(fit_stats[s], maps[s]) for s in starts}
    held = {s: _rel(held_stats[s], maps[s]) for s in starts}
    fit_start = min(starts, key=lambda s: (in_sample[s], s))
    cv_start = min(starts, key=lambda s: (held[s], s))
    ideas: dict[str, tuple[int, torch.Tensor, dict[str, Any]]] = {
        "fit": (fit_start, maps[fit_start], {}),
        "fit, cv": (cv_start, maps[cv_start], {}),
    }
    for start in sorted({fit_start, cv_start}):
        a, h = fit_stats[start], held_stats[start]
        suffix = "" if start == fit_start else " (cv cut)"
        ridge = {alpha: lstsq_from_gram(a.gram, a.cross, alpha * _scale(a)) for alpha in ALPHAS}
        best = min(ALPHAS, key=lambda al: _rel(h, ridge[al]))
        ideas["ridge" + suffix] = (start, ridge[best], {"alpha": best})
        to_eye = {alpha: _ridge_to_identity(a, alpha) for alpha in ALPHAS}
        best = min(ALPHAS, key=lambda al: _rel(h, to_eye[al]))
        ideas["ridge→I" + suffix] = (start, to_eye[best], {"alpha": best})
        delta = maps[start] - eye
        num = float((delta * h.cross).sum()) - float((delta * (h.gram @ eye)).sum())
        den = float((delta * (h.gram @ delta)).sum())
        lam = min(max(num / den, 0.0), 1.0) if den > 0 else 1.0
        ideas["shrink" + suffix] = (start, eye + lam * delta, {"lambda": lam})
    return ideas


def _hidden_ideas(engine, full, calibration, set_aside, start, output_map, n):
    """The map of the MLP's hidden activations at ``start``: ridge toward ``output_map``, strength
    chosen on ``set_aside`` (what the prune does), and the unregularised one."""
    cut = (start, start + n)
    sums, held = cut_sums(engine, full, [calibration, set_aside], cut, hidden=True)
    chosen, details = hidden_map(engine, full, cut, sums, held, output_map)
    exact, _ = hidden_map(engine, full, cut, sums, held, output_map, grid=(0.0,))
    return {
        "hidden": (start, chosen, {"alpha": details["ridge_toward_T"]}),
        "hidden, α=0": (start, exact, {}),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = resolve(args.model)
    tokenizer = load_tokenizer(source)
    engine = open_engine(checkpoint_dir(source), PruneOptions(), MemoryBudget.from_option(None))
    n = cut_size(engine.n_layers, args.ratio)
    full = original_plan(engine.n_layers)
    starts = candidate_starts(engine.n_layers, n)
    eval_sources = [BUILTIN, *OUT_OF_DOMAIN]
    windows = {name: heldout_windows(load_corpus(name), tokenizer, args.eval_tokens) for name in eval_sources}
    plans: dict[str, Any] = {"original": full}
    rows: list[dict[str, Any]] = []
    for mix in args.mixes:
        started = time.perf_counter()
        spec = "+".join(f"{source}*{count}" for source, count in mix)
        total = sum(count for _, count in mix)
        calibration, set_aside = (
            mixture_batches(spec, tokenizer, n_samples=n_samples, seq_len=256, batch_size=8, offset=offset)
            for n_samples, offset in ((total, 0), (max(1, total * args.selection // 512), total))
        )
        _, fit_stats = collect(engine, full, calibration, n=n, starts=starts, stats_for=starts, desc="calib")
        _, held_stats = collect(engine, full, set_aside, n=n, starts=starts, stats_for=starts, desc="aside")
        label = "+".join(f"{spec}×{count}" for spec, count in mix)
        ideas = _ideas(fit_stats, held_stats, starts)
        if not args.ideas or {"hidden", "hidden, α=0"} & set(args.ideas):
            ideas |= _hidden_ideas(engine, full, calibration, set_aside, *ideas["fit"][:2], n)
        for idea, (start, transform, extra) in ideas.items():
            if args.ideas and idea not in args.ideas:
                continue
            name = f"{label}: {idea}"
            plans[name] = cut_plan(full, (start, start + n), Map(transform, name))
            plans.setdefault(f"removal {start}", cut_plan(full, (start, start + n)))
            rows.append({"calibration": label, "idea": idea, "cut": [start, start + n], **extra})
        print(f"{label}: statistics in {time.perf_counter() - started:.0f} s", flush=True)
    ppl = {name: perplexities(engine, plans, w) for name, w in windows.items()}
    engine.close()
    header = f"{'calibration':28s} {'idea':18s} {'cut':9s} " + " ".join(f"{s:>22s}" for s in eval_sources)
    print(header)
    print(
        f"{'':28s} {'original':18s} {'':9s} " + " ".join(f"{ppl[s]['original']:22.2f}" for s in eval_sources)
    )
    for row in rows:
        name = f"{row['calibration']}: {row['idea']}"
        removal = f"removal {row['cut'][0]}"
        row["ppl"] = {s: round(ppl[s][name], 3) for s in eval_sources}
        row["ppl_plain_removal"] = {s: round(ppl[s][removal], 3) for s in eval_sources}
        cells = " ".join(f"{ppl[s][name]:9.2f} (rem {ppl[s][removal]:7.2f})" for s in eval_sources)
        print(f"{row['calibration']:28s} {row['idea']:18s} {str(row['cut']):9s} {cells}")
    return {
        "model": source.spec,
        "eval_tokens": args.eval_tokens,
        "original": {s: round(ppl[s]["original"], 3) for s in eval_sources},
        "rows": rows,
    }


def _mix(text: str) -> list[tuple[str, int]]:
    return [(part.split(":")[0], int(part.split(":")[1])) for part in text.split("+")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument(
        "--selection", type=int, default=64, help="set-aside documents per 512 calibration ones"
    )
    parser.add_argument(
        "--mixes",
        type=lambda s: [_mix(m) for m in s.split(",")],
        default=[_mix("builtin:512")],
        help="comma-separated mixes, each SOURCE:DOCS+SOURCE:DOCS (default builtin:512)",
    )
    parser.add_argument("--ideas", type=lambda s: s.split(","), default=None, help="only these ideas")
    parser.add_argument("--out", type=Path, default=Path("out/bench/generalization.json"))
    args = parser.parse_args(argv)
    write_json(args.out, run(args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
