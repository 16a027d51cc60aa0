"""Does weighting the calibration tokens make the least-squares map travel better?

The first position of every calibration sequence carries a massive activation (the attention
sink): on SmolLM2-135M its stream is ~100× the median norm, and those 0.4 % of the tokens hold
~98 % of the energy the map is fitted to. This benchmark fits the map of one cut under several
token weightings, folds each, and measures held-out perplexity on Wikipedia and on the
out-of-domain sources, every plan in one pass per source:

* ``lstsq``: every real token alike (the default);
* ``drop first token``: the first real token of each sequence left out of the fit;
* ``drop top 0.5 %``: the 0.5 % of tokens with the largest target norm left out;
* ``1/|after|^2``, ``1/|after|``: each token's squared error relative to (the square root of)
  the energy of the stream leaving the cut, what the next block's RMSNorm sees;
* ``1/|before|^2``: relative to the stream entering the cut;
* ``huber``: iteratively reweighted, weight ``min(1, 2·median residual / residual)``.

    python -m bench.token_weighting --out out/bench/token_weighting.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rmexport.atomic import write_json
from rmexport.calib.budget import MemoryBudget
from rmexport.calib.collect import CutActivations, collect_activations
from rmexport.calib.corpus import BUILTIN, OUT_OF_DOMAIN, load_corpus
from rmexport.calib.engine import Map, cut_plan, original_plan
from rmexport.calib.tokens import CalibrationSet, heldout_windows
from rmexport.models import checkpoint_dir, load_tokenizer, resolve
from rmexport.prune import PruneOptions, calibration_set, open_engine
from rmexport.replaceme.checks import perplexities
from rmexport.replaceme.solve import lstsq_from_gram

__all__ = ["VARIANTS", "main"]


def _first_real(calibration: CalibrationSet) -> torch.Tensor:
    """For every real token in ``collect_activations`` order: is it its sequence's first?"""
    return torch.cat([(mask.cumsum(1) == 1)[mask.bool()] for _ids, mask in calibration.batches])


def _weighted_fit(mlp: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    weighted = mlp * weights[:, None]
    return lstsq_from_gram(weighted.T @ mlp, weighted.T @ target)


def _huber(mlp: torch.Tensor, target: torch.Tensor, iterations: int = 3, c: float = 2.0) -> torch.Tensor:
    weights = torch.ones(mlp.shape[0], dtype=torch.float64)
    for _ in range(iterations):
        residual = (target - mlp @ _weighted_fit(mlp, target, weights)).norm(dim=1)
        weights = torch.clamp(c * residual.median() / residual.clamp_min(1e-30), max=1.0)
    return _weighted_fit(mlp, target, weights)


Variant = Callable[[torch.Tensor, torch.Tensor, CutActivations, torch.Tensor], torch.Tensor]

VARIANTS: dict[str, Variant] = {
    "lstsq": lambda m, t, a, first: _weighted_fit(m, t, torch.ones(m.shape[0], dtype=torch.float64)),
    "drop first token": lambda m, t, a, first: _weighted_fit(m, t, (~first).double()),
    "drop top 0.5 %": lambda m, t, a, first: _weighted_fit(
        m, t, (t.norm(dim=1) <= torch.quantile(t.norm(dim=1), 0.995)).double()
    ),
    "1/|after|^2": lambda m, t, a, first: _weighted_fit(m, t, a.after.double().pow(2).sum(1).reciprocal()),
    "1/|after|": lambda m, t, a, first: _weighted_fit(m, t, a.after.double().norm(dim=1).reciprocal()),
    "1/|before|^2": lambda m, t, a, first: _weighted_fit(
        m, t, (a.bypass + a.mlp).double().pow(2).sum(1).reciprocal()
    ),
    "huber": lambda m, t, a, first: _huber(m, t),
}


def _energy_profile(activations: CutActivations, first: torch.Tensor) -> dict[str, float]:
    energy = activations.target.double().pow(2).sum(1)
    ordered = energy.sort(descending=True).values
    norms = energy.sqrt()
    return {
        "tokens": int(energy.numel()),
        "first_tokens": int(first.sum()),
        "first_tokens_energy_share": float(energy[first].sum() / energy.sum()),
        "top_1pct_energy_share": float(ordered[: max(1, len(ordered) // 100)].sum() / energy.sum()),
        "target_norm_median": float(norms.median()),
        "target_norm_max": float(norms.max()),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = resolve(args.model)
    tokenizer = load_tokenizer(source)
    options = PruneOptions(calib_samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size)
    engine = open_engine(checkpoint_dir(source), options, MemoryBudget.from_option(None))
    try:
        calibration = calibration_set(tokenizer, options)
        full = original_plan(engine.n_layers)
        activations = collect_activations(engine, full, calibration, args.cut)
        first = _first_real(calibration)
        profile = _energy_profile(activations, first)
        mlp, target = activations.mlp.double(), activations.target.double()
        plans = {"original": full, "plain removal": cut_plan(full, args.cut)}
        for name in args.variants:
            transform = VARIANTS[name](mlp, target, activations, first)
            plans[name] = cut_plan(full, args.cut, Map(transform.float(), name))
        del activations, mlp, target
        sources = {BUILTIN: args.eval_tokens} | dict.fromkeys(OUT_OF_DOMAIN, args.ood_tokens)
        ppl = {
            spec: perplexities(engine, plans, heldout_windows(load_corpus(spec), tokenizer, tokens))
            for spec, tokens in sources.items()
        }
    finally:
        engine.close()
    print(
        f"cut {list(args.cut)}, {profile['tokens']} calibration tokens; the first token of each sequence "
        f"holds {profile['first_tokens_energy_share']:.1%} of the target energy"
    )
    print(f"{'':18s}" + "".join(f"{spec:>24s}" for spec in sources))
    for name in plans:
        cells = []
        for spec in sources:
            change = ppl[spec][name] / ppl[spec]["plain removal"] - 1
            cells.append(f"{ppl[spec][name]:12.2f} ({change:+7.1%})")
        print(f"{name:18s}" + "".join(f"{c:>24s}" for c in cells))
    return {
        "model": source.spec,
        "cut": list(args.cut),
        "calibration": calibration.describe(),
        "seq_len": args.seq_len,
        "eval_tokens": sources,
        "energy": profile,
        "ppl": {name: {spec: round(ppl[spec][name], 3) for spec in sources} for name in plans},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--cut",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=(12, 20),
        help="START,END of the removed blocks (default 12,20: the default prune's cut on SmolLM2-135M)",
    )
    parser.add_argument("--calib-samples", type=int, default=PruneOptions.calib_samples)
    parser.add_argument("--seq-len", type=int, default=PruneOptions.seq_len)
    parser.add_argument("--batch-size", type=int, default=PruneOptions.batch_size)
    parser.add_argument(
        "--eval-tokens", type=int, default=65536, help="Wikipedia tokens (make bench's protocol)"
    )
    parser.add_argument("--ood-tokens", type=int, default=PruneOptions.ood_tokens)
    parser.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=list(VARIANTS),
        help="comma-separated, from: " + ", ".join(VARIANTS),
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench/token_weighting.json"))
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    write_json(args.out, run(args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
