"""Calibration throughput and memory: our pipeline against a straightforward two-pass baseline.

Variants, each run in its own child process (so peak memory is its own), on the same
calibration set of the default model:

* ``baseline``: the two-pass design of the reference implementation, re-created here: the whole
  model in memory; pass 1 runs the full forward with ``output_hidden_states=True`` and the LM head
  for every batch, keeps every hidden state of every batch, and takes the cut with the smallest
  last-token angular distance from them; pass 2 runs the full forward again to accumulate the
  float64 least-squares sums of the chosen cut, then solves.
* ``prune``: the whole ``rmexport prune`` (rule ``--select``, default ``fit``) on the same documents
  (``--calib-data builtin``):
  calibration, fit, the quality guard on 64 set-aside documents, and every check (fold parity,
  held-out perplexity of the original, plain removal and pruned model over ``--eval-tokens``),
  then the save. Its time includes loading and saving.
* ``engine``: the block engine with resident weights: ``survey_candidates`` (one pass: distances
  and sums of every candidate, stopping after the deepest block needed) + ``fit_cut``.
* ``streamed``: the same with every block read from disk for every pass (a budget below the model).
* ``engine_distance``: the baseline's own rule (smallest last-token distance): one pass keeps the
  activations the sums need and accumulates the chosen cut's only.

The baseline selects by distance; ``engine`` and ``streamed`` use ``--select`` (default ``fit``,
which needs every candidate's sums: more work than the baseline's rule).

Throughput is calibration tokens / wall time of calibration + fit (model loading is reported
separately), and the same per CPU-second of the process (``time.process_time``), which other
jobs on a shared machine disturb much less than wall time. Peak memory: the child's peak RSS
(sampled, and ``ru_maxrss``), and CUDA ``max_memory_allocated`` on GPUs. Repeats alternate
the order, since the machine may be shared.

The 8B-shaped end-to-end run is ``python -m bench.run_8b`` (``make bench-8b``).

    python -m bench.pipeline --out out/bench/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from rmexport.atomic import write_json
from rmexport.measures import angular_distance

__all__ = ["VARIANTS", "main", "two_pass_baseline"]

VARIANTS = ("baseline", "prune", "engine", "streamed", "engine_distance")


class _RssSampler:
    """Peak resident memory of this process, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


# --- the baseline ------------------------------------------------------------------------------
def two_pass_baseline(model: Any, adapter: Any, calibration: Any, n: int, alpha: float) -> dict[str, Any]:
    """The reference's two passes: every hidden state kept, then a second full pass for the sums."""
    device = next(model.parameters()).device
    timings: dict[str, float] = {}
    start_time = time.perf_counter()
    kept_states: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for ids, mask in calibration.batches:
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                output_hidden_states=True,
                use_cache=False,
            )
            kept_states.append([h.detach().cpu() for h in out.hidden_states])
            del out
    timings["pass1_forward"] = time.perf_counter() - start_time

    start_time = time.perf_counter()
    n_layers = len(adapter.blocks(model))
    distances = {}
    for s in range(1, n_layers - n + 1):
        total, count = 0.0, 0
        for (_ids, mask), states in zip(calibration.batches, kept_states, strict=True):
            last = mask.sum(dim=1) - 1
            rows = torch.arange(mask.shape[0])
            total += float(angular_distance(states[s][rows, last], states[s + n][rows, last]).sum())
            count += int(mask.shape[0])
        distances[s] = total / count
    chosen = min(distances, key=lambda s: (distances[s], s))
    del kept_states
    timings["distances"] = time.perf_counter() - start_time

    start_time = time.perf_counter()
    d = model.config.hidden_size
    gram = torch.zeros(d, d, dtype=torch.float64)
    cross = torch.zeros(d, d, dtype=torch.float64)
    captured: dict[str, torch.Tensor] = {}
    block = adapter.block(model, chosen - 1)
    handle = adapter.mlp_output_module(block).register_forward_hook(
        lambda _m, _i, output: captured.__setitem__("mlp", output.detach())
    )
    try:
        with torch.inference_mode():
            for ids, mask in calibration.batches:
                out = model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    output_hidden_states=True,
                    use_cache=False,
                )
                real = mask.bool().to(device)
                m = captured.pop("mlp")[real].double()
                before = out.hidden_states[chosen][real].double()
                after = out.hidden_states[chosen + n][real].double()
                gram += (m.T @ m).cpu()
                cross += (m.T @ (after - before + m)).cpu()
                del out
    finally:
        handle.remove()
    timings["pass2_forward_sums"] = time.perf_counter() - start_time
    start_time = time.perf_counter()
    transform = torch.linalg.solve(gram + alpha * torch.eye(d, dtype=torch.float64), cross)
    timings["solve"] = time.perf_counter() - start_time
    return {"cut": [chosen, chosen + n], "timings_s": timings, "transform_norm": float(transform.norm())}


# --- one variant in a child process ---------------------------------------------------------------
def _calibration(args: argparse.Namespace, tokenizer: Any) -> Any:
    from rmexport.calib.corpus import load_corpus
    from rmexport.calib.tokens import calibration_batches

    return calibration_batches(
        load_corpus("builtin"),
        tokenizer,
        n_samples=args.documents,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )


def _run_variant(args: argparse.Namespace) -> dict[str, Any]:
    from rmexport.arch import adapter_for
    from rmexport.models import checkpoint_dir, load_model, load_tokenizer, resolve
    from rmexport.replaceme.select import choose_start, cut_size

    torch.set_grad_enabled(False)
    source = resolve(args.model)
    result: dict[str, Any] = {"variant": args.variant}
    with _RssSampler() as sampler:
        tokenizer = load_tokenizer(source)
        calibration = _calibration(args, tokenizer)
        result["calibration_tokens"] = calibration.n_tokens
        t0 = time.perf_counter()
        if args.variant == "prune":
            return result | _run_prune(args, source, calibration.n_tokens, sampler)
        if args.variant == "baseline":
            model = load_model(source, dtype=args.dtype, device=args.device)
            adapter, n_layers = adapter_for(model.config), model.config.num_hidden_layers
        else:
            from rmexport.calib.budget import MemoryBudget
            from rmexport.prune import PruneOptions, open_engine

            budget = "64KiB" if args.variant == "streamed" else None
            options = PruneOptions(device=args.device, compute_dtype=str(args.dtype).removeprefix("torch."))
            engine = open_engine(checkpoint_dir(source), options, MemoryBudget.from_option(budget))
            adapter, n_layers = engine.adapter, engine.n_layers
        load_s = time.perf_counter() - t0
        n = cut_size(n_layers, args.ratio)
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        if args.variant == "baseline":
            out = two_pass_baseline(model, adapter, calibration, n, args.alpha)
            result |= {"cut": out["cut"], "stages_s": out["timings_s"]}
        else:
            from rmexport.calib.engine import original_plan
            from rmexport.replaceme.survey import fit_cut, survey_candidates

            select = "distance" if args.variant == "engine_distance" else args.select
            plan = original_plan(n_layers)
            survey = survey_candidates(
                engine,
                plan,
                calibration,
                n,
                stats_budget_bytes=2**32,
                alpha=args.alpha,
                shortlist_only=select == "distance",
            )
            t1 = time.perf_counter()
            start = choose_start(survey.scores("last"), select)
            fit_cut(engine, plan, calibration, survey, start, alpha=args.alpha)
            engine.close()
            result |= {
                "cut": [start, start + n],
                "stages_s": {"survey": t1 - t0, "fit": time.perf_counter() - t1},
            }
        calibrate_s = time.perf_counter() - t0
        calibrate_cpu_s = time.process_time() - cpu0
    result |= {
        "load_s": round(load_s, 2),
        "calibrate_s": round(calibrate_s, 2),
        "tokens_per_s": round(calibration.n_tokens / calibrate_s, 1),
        "calibrate_cpu_s": round(calibrate_cpu_s, 2),
        "tokens_per_cpu_s": round(calibration.n_tokens / calibrate_cpu_s, 2),
        "stages_s": {k: round(v, 2) for k, v in result["stages_s"].items()},
        "peak_rss_mib": _mib(sampler.peak),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if torch.cuda.is_available() and str(args.device).startswith("cuda"):
        result["cuda_max_memory_allocated_mib"] = _mib(torch.cuda.max_memory_allocated())
    return result


def _run_prune(args: argparse.Namespace, source: Any, tokens: int, sampler: _RssSampler) -> dict[str, Any]:
    import tempfile

    from rmexport.prune import PruneOptions, prune

    options = PruneOptions(
        ratio=args.ratio,
        calib_data="builtin",  # the baseline's documents, not the default mixture
        calib_samples=args.documents,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        alpha=args.alpha,
        select=args.select,
        eval_tokens=args.eval_tokens,
        device=args.device,
        compute_dtype=str(args.dtype).removeprefix("torch."),
    )
    with tempfile.TemporaryDirectory(dir=args.work) as out:
        t0, cpu0 = time.perf_counter(), time.process_time()
        record = prune(source, options, Path(out))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "cut": record.cuts[0].cut,
        "load_s": record.timings_s.get("load", 0.0),
        "calibrate_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "calibrate_cpu_s": round(cpu, 2),
        "tokens_per_cpu_s": round(tokens / cpu, 2),
        "stages_s": record.timings_s,
        "quality": record.to_json()["quality"],
        "peak_rss_mib": _mib(sampler.peak),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# --- driver ---------------------------------------------------------------------------------------
def _child(variant: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    out = Path(args.work) / f"{variant}-{time.monotonic_ns()}.json"
    command = [
        sys.executable,
        "-m",
        "bench.pipeline",
        "--child",
        variant,
        "--child-json",
        str(out),
    ]
    command += extra
    env = os.environ | {"RMEXPORT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text())


def _passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--model", args.model, "--documents", str(args.documents), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--ratio", str(args.ratio), "--alpha", str(args.alpha),
        "--select", args.select, "--device", args.device, "--dtype", str(args.dtype).removeprefix("torch."),
        "--threads", str(args.threads), "--eval-tokens", str(args.eval_tokens), "--work", args.work,
    ]  # fmt: skip


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run)
    summary: dict[str, Any] = {}
    for variant, items in by_variant.items():
        rates = sorted(r["tokens_per_s"] for r in items)
        cpu_rates = sorted(r["tokens_per_cpu_s"] for r in items)
        summary[variant] = {
            "tokens_per_s_median": rates[len(rates) // 2],
            "tokens_per_s_best": rates[-1],
            "tokens_per_cpu_s_median": cpu_rates[len(cpu_rates) // 2],
            "calibrate_s": [r["calibrate_s"] for r in items],
            "peak_rss_mib_max": max(r["peak_rss_mib"] for r in items),
            "cut": items[0]["cut"],
        }
    base = summary.get("baseline")
    if base:
        for variant in VARIANTS[1:]:
            if variant in summary:
                row = summary[variant]
                row["throughput_vs_baseline"] = round(
                    row["tokens_per_s_median"] / base["tokens_per_s_median"], 2
                )
                row["cpu_throughput_vs_baseline"] = round(
                    row["tokens_per_cpu_s_median"] / base["tokens_per_cpu_s_median"], 2
                )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--select", default="fit", choices=("distance", "fit"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="model/compute dtype of the small-model runs")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, order alternating")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per run (0: torch's default); 1 on a busy machine",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("out/bench-pipeline.json"))
    parser.add_argument(
        "--work", default=None, help="folder for the children's JSON (default: next to --out)"
    )
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens of the prune variant")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)

    if args.child:
        args.variant = args.child
        if args.threads:
            torch.set_num_threads(args.threads)
        result = _run_variant(args)
        Path(args.child_json).write_text(json.dumps(result, indent=2) + "\n")
        return 0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.work = args.work or str(args.out.parent / ".bench-pipeline")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    extra = _passthrough(args)
    report: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    variants = [v for v in args.variants.split(",") if v]
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else variants[::-1]
        for variant in order:
            run = _child(variant, args, extra)
            report["runs"].append(run)
            print(
                f"{variant:>10}: {run['tokens_per_s']:8.1f} tok/s "
                f"({run['tokens_per_cpu_s']:.2f} tok/CPU-s), "
                f"calibrate {run['calibrate_s']:6.1f} s "
                f"{run['stages_s']}, load {run['load_s']} s, peak RSS {run['peak_rss_mib']:.0f} MiB, "
                f"cut {run['cut']}",
                flush=True,
            )
    report["summary"] = _summary(report["runs"])
    for variant, row in report["summary"].items():
        ratio = row.get("throughput_vs_baseline")
        print(
            f"{variant:>10}: median {row['tokens_per_s_median']:.1f} tok/s"
            + (f", {ratio:.2f}x baseline" if ratio else "")
            + f"; {row['tokens_per_cpu_s_median']:.2f} tok/CPU-s"
            + (f", {row['cpu_throughput_vs_baseline']:.2f}x baseline" if ratio else "")
            + f", peak RSS {row['peak_rss_mib_max']:.0f} MiB"
        )
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
