"""Run ``rmexport run`` (what ``make export`` runs) several times in a row, each into a fresh output
folder, and print how far the speed-ups of the runs are apart and how long each run took.

    python -m bench.repeat_export --runs 3 --out bench-out/repeat-export.json

Each run is a separate process, timed from outside (wall time, and its peak RSS from ``wait4``).
For each speed-up the table gives the runs' medians, their largest deviation from their mean
(marked when over ``--tolerance``) and max/min − 1.
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("extra", nargs="*", help="more arguments for rmexport run (after --)")
    args = parser.parse_args(argv)
    runs = []
    for k in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="rmexport-repeat-") as out_root:
            runs.append(run_once(args.model, args.ratio, Path(out_root), args.extra))
        print(f"run {k + 1}: {runs[-1]['wall_s']:.0f} s, exit {runs[-1]['exit_code']}", flush=True)
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
    write_json(args.out, {"runs": runs, "agreement": table, "tolerance": args.tolerance})
    ok = all(row["within_tolerance"] and not row["below_one"] for row in table.values())
    ok = ok and all(run["exit_code"] == 0 for run in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
