"""Run ``rmexport run`` (what ``make export`` runs) several times in a row, each into a fresh output
folder, and print how far the speed-ups of the runs are apart and how long each run took.

    python -m bench.repeat_export --runs 3 --out bench-out/repeat-export.json

Each run is a separate process, timed from outside (wall time, and its peak RSS from ``wait4``).
With ``--share-original`` the runs share one output root: each run's own folder is new, and the
original model's folder (its exports and perplexities, made once per model) is kept from the first
run, as on a machine where ``make export`` ran before; ``--warm-first`` makes that folder first,
untimed, so that every timed run finds it.
For each speed-up the table gives the runs' medians, their largest deviation from their mean
(marked when over ``--tolerance``) and max/min − 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rmexport.atomic import write_json
from rmexport.sysinfo import load_average

TOLERANCE = 0.05


def run_once(model: str, ratio: str, out_root: Path, extra: list[str]) -> dict:
    rmexport = Path(sys.executable).with_name("rmexport")
    command = [str(rmexport), "run", model, "--ratio", ratio, "--out-root", str(out_root), "-q", *extra]
    before = load_average()
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    (run_dir,) = [p for p in out_root.iterdir() if (p / "report.json").is_file()]
    report = json.loads((run_dir / "report.json").read_text())
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "load_average_before": before,
        "stages_s": report["timings_s"],
        "reused_stages": report["reused_stages"],
        "all_checks_passed": report["all_checks_passed"],
        "speed": {_key(row): row for row in report["speed"]},
        "report": report,
    }


def _key(row: dict) -> str:
    return f"{row['runtime']} {row['type']} {row['phase']}"


def agreement(runs: list[dict], tolerance: float) -> dict[str, dict]:
    """Per runtime/type/phase: each run's median speed-up, their spread and whether any is below 1."""
    table = {}
    for key in runs[0]["speed"]:
        medians = [run["speed"][key]["measured"] for run in runs if key in run["speed"]]
        mean = sum(medians) / len(medians)
        deviation = max(abs(m / mean - 1) for m in medians)
        table[key] = {
            "medians": [round(m, 3) for m in medians],
            "ideal": round(runs[0]["speed"][key]["ideal"], 3),
            "spread": round(max(medians) / min(medians) - 1, 4),  # max/min - 1
            "max_deviation_from_mean": round(deviation, 4),
            "within_tolerance": deviation <= tolerance,
            "below_one": any(m < 1 for m in medians),
        }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", default="0.25")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="±, relative (default 0.05)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/repeat-export.json"))
    parser.add_argument(
        "--share-original", action="store_true", help="keep the original model's folder between runs"
    )
    parser.add_argument(
        "--warm-first", action="store_true", help="with --share-original: make that folder first, untimed"
    )
    parser.add_argument("extra", nargs="*", help="more arguments for rmexport run (after --)")
    args = parser.parse_args(argv)
    runs, first = [], None
    with tempfile.TemporaryDirectory(prefix="rmexport-repeat-") as shared:
        if args.warm_first:
            first = run_once(args.model, args.ratio, Path(shared), args.extra)
            print(f"untimed first run (makes the original's folder): {first['wall_s']:.0f} s", flush=True)
        for k in range(args.runs):
            for run_dir in Path(shared).glob(f"*-r{args.ratio}"):  # a fresh output folder for every run
                shutil.rmtree(run_dir)
            with tempfile.TemporaryDirectory(prefix="rmexport-repeat-") as fresh:
                out_root = Path(shared if args.share_original else fresh)
                runs.append(run_once(args.model, args.ratio, out_root, args.extra))
            reused = [s for s in runs[-1]["reused_stages"] if s.startswith("original/")]
            print(
                f"run {k + 1}: {runs[-1]['wall_s']:.0f} s, exit {runs[-1]['exit_code']}"
                + (f", reused {', '.join(reused)}" if reused else ""),
                flush=True,
            )
    table = agreement(runs, args.tolerance)
    print(
        f"\n{'runtime type phase':34} {'ideal':>6}  " + "  ".join(f"run {k + 1:<3}" for k in range(len(runs)))
    )
    for key, row in table.items():
        flags = ("" if row["within_tolerance"] else "  spread!") + ("  below 1!" if row["below_one"] else "")
        medians = "  ".join(f"x{m:<6.2f}" for m in row["medians"])
        spread = f"±{row['max_deviation_from_mean']:.1%}, max/min {row['spread']:+.1%}"
        print(f"{key:34} x{row['ideal']:<5.2f}  {medians}  ({spread}){flags}")
    print("wall s: " + ", ".join(f"{run['wall_s']:.0f}" for run in runs))
    write_json(
        args.out,
        {
            "runs": runs,
            "agreement": table,
            "tolerance": args.tolerance,
            "share_original": args.share_original,
            "first_run": first,
        },
    )
    ok = all(row["within_tolerance"] and not row["below_one"] for row in table.values())
    ok = ok and all(run["exit_code"] == 0 for run in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
