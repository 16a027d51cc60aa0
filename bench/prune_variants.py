"""Whole ``rmexport prune`` runs of one model, variants side by side: time, CPU time, cut, perplexities.

Each variant is a set of ``prune`` options, optionally run from another checkout of this project
(``NAME@TREE=OPTIONS``: the child runs with ``TREE`` as its working directory, so ``python -m
rmexport.cli`` imports that tree's code). Rounds alternate the order (A B, then B A) because the
machine drifts. With ``--cold`` the stored perplexities of the original model are deleted before
every run, so each run measures them as a first prune of the model does.

    python -m bench.prune_variants --variant float32="--compute-dtype float32" \\
        --variant auto="--compute-dtype auto" --rounds 2 --out out/bench/compute-dtype.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmexport.atomic import write_json
from rmexport.models import cache_dir
from rmexport.sysinfo import load_average, machine_info

__all__ = ["Variant", "main"]


@dataclass(frozen=True)
class Variant:
    name: str
    options: list[str]
    tree: Path | None = None

    @classmethod
    def parse(cls, text: str) -> Variant:
        head, sep, options = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{text!r}: write NAME=OPTIONS or NAME@TREE=OPTIONS")
        name, _, tree = head.partition("@")
        return cls(name, shlex.split(options), Path(tree).resolve() if tree else None)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(variant: Variant, model: str, out: Path, cold: bool) -> dict[str, Any]:
    if cold:
        shutil.rmtree(cache_dir() / "original-perplexity", ignore_errors=True)
    command = [sys.executable, "-m", "rmexport.cli", "prune", model, "--out", str(out), *variant.options]
    env = os.environ | {"RMEXPORT_NO_PROGRESS": "1"}
    load_before, cpu_before, started = load_average(), _children_cpu_s(), time.perf_counter()
    done = subprocess.run(command, cwd=variant.tree, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, _children_cpu_s() - cpu_before
    if done.returncode != 0:
        raise SystemExit(f"{variant.name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads((out / "prune.json").read_text())
    quality = record["quality"]
    return {
        "variant": variant.name,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_before": load_before,
        "load_after": load_average(),
        "stages_s": record["timings_s"],
        "compute": record.get("compute"),
        "cut": [c["cut"] for c in record["cuts"]],
        "kept": record["guard"].get("kept"),
        "original_reused": quality.get("original_reused", False),
        "perplexity": {
            "builtin": [quality["ppl_original"], quality["ppl_plain_removal"], quality["ppl_pruned"]],
            **{
                q["source"]: [q["ppl_original"], q["ppl_plain_removal"], q["ppl_pruned"]]
                for q in quality["out_of_domain"]
            },
        },
        "guard_by_source": record["guard"].get("by_source"),
    }


def _summary(runs: list[dict[str, Any]], variants: list[Variant]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v.name]
        summary[v.name] = {
            "wall_s_median": statistics.median(r["wall_s"] for r in mine),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in mine),
            "walls_s": [r["wall_s"] for r in mine],
        }
    base = summary[variants[0].name]
    for v in variants[1:]:
        row = summary[v.name]
        row["speedup_wall_vs_" + variants[0].name] = round(base["wall_s_median"] / row["wall_s_median"], 3)
        row["speedup_cpu_vs_" + variants[0].name] = round(base["cpu_s_median"] / row["cpu_s_median"], 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.prune_variants", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variant", type=Variant.parse, action="append", required=True)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every variant, order alternating")
    parser.add_argument("--cold", action="store_true", help="measure the original's perplexities every run")
    parser.add_argument("--out", type=Path, default=Path("out/bench/prune-variants.json"))
    args = parser.parse_args(argv)

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prune-variants-") as scratch:
        for k in range(args.rounds):
            order = args.variant if k % 2 == 0 else args.variant[::-1]
            for variant in order:
                run = _run(variant, args.model, Path(scratch) / f"{variant.name}-{k}", args.cold)
                runs.append(run)
                print(
                    f"{variant.name:>12}: {run['wall_s']:7.1f} s wall, {run['cpu_s']:7.1f} s CPU, "
                    f"cut {run['cut']} ({run['kept']}), perplexity {run['perplexity']}, {run['stages_s']}",
                    flush=True,
                )
    summary = _summary(runs, args.variant)
    for name, row in summary.items():
        print(f"{name:>12}: {row}")
    write_json(
        args.out,
        {
            "model": args.model,
            "variants": [
                {"name": v.name, "options": v.options, "tree": str(v.tree) if v.tree else None}
                for v in args.variant
            ],
            "cold": args.cold,
            "machine": machine_info("torch", "transformers"),
            "runs": runs,
            "summary": summary,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
