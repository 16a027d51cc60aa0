"""The llama.cpp frontier of a finished run, outside ``rmexport run``: prune, or quantize harder?

For a run folder (``hf/`` and ``prune.json`` of a prune, and for a GGUF source the GGUF-native file of
the source's type in ``gguf/``) and its source model, the same ladders as ``rmexport run --frontier``
(``rmexport.frontier``): every type made for the original and the pruned model, measured on the first
held-out window of every source, timed A B B A type by type; ``--plain`` types are also made and
measured without the importance matrix. Writes the JSON, the report's table and both plots.

    python -m bench.frontier --source out/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --run-dir out/qwen2.5-coder-1.5b-instruct-q4-k-m-r0.25 --plain q4_k_m,q3_k_m \\
        --out bench/results/frontier-qwen2.5-coder-1.5b.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rmexport.calib.corpus import BUILTIN, OUT_OF_DOMAIN
from rmexport.frontier import (
    SPEED_ROUNDS,
    TOKENS_PER_SOURCE,
    FrontierRecord,
    Ladder,
    f32_writer,
    ladder_types,
    make_ladder,
    own_type,
    time_ladder,
)
from rmexport.models import load_config, load_tokenizer, metadata_dir, resolve
from validation.frontier import frontier_windows
from validation.frontier_report import frontier_markdown, frontier_plots, frontier_summary
from validation.gguf_bench import DEFAULT_PROTOCOL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="the original model: alias, HF dir or .gguf")
    parser.add_argument("--run-dir", required=True, type=Path, help="folder of the prune (hf/, prune.json)")
    parser.add_argument("--plain", default="", help="types also measured without the importance matrix")
    parser.add_argument(
        "--work-dir", type=Path, help="where the ladders go (default: RUN_DIR/../bench-frontier)"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON result; the table and plots beside it")
    args = parser.parse_args(argv)

    source = resolve(args.source)
    own = own_type(source, load_config(source))
    types = ladder_types(own)
    plain = tuple(t for t in args.plain.split(",") if t)
    work = args.work_dir or args.run_dir.parent / f"bench-frontier-{args.run_dir.name}"
    record = args.run_dir / "prune.json"
    ratio = json.loads(record.read_text())["ratio"]
    native = args.run_dir / "gguf" / f"{source.slug}-r{ratio:g}-{own}.gguf"
    protocol = DEFAULT_PROTOCOL.with_rounds(SPEED_ROUNDS)
    threads = protocol.resolved_threads()
    tokens = dict.fromkeys([BUILTIN, *OUT_OF_DOMAIN], TOKENS_PER_SOURCE)
    windows = frontier_windows(load_tokenizer(source), tokens, window=TOKENS_PER_SOURCE)
    started = time.perf_counter()
    ladders = {
        "original": Ladder(
            "original",
            work / "original",
            source.slug,
            f32_writer(lambda: Path(source.location), source.is_gguf),
            lambda: Path(metadata_dir(source)),
            own,
            Path(source.location) if source.is_gguf else None,
        ),
        "pruned": Ladder(
            "pruned",
            work / "pruned",
            f"{source.slug}-r{ratio:g}",
            f32_writer(lambda: args.run_dir / "hf", False),
            lambda: args.run_dir / "hf",
            own,
            native if native.is_file() else None,
        ),
    }
    results = {}
    seconds = {}
    for role, ladder in ladders.items():
        begun = time.perf_counter()
        reference = None if role == "original" else results["original"].reference
        results[role] = make_ladder(ladder, types, windows, record, threads, reference, plain=plain)
        seconds[role] = round(time.perf_counter() - begun, 1)
    main_bench = (
        json.loads((args.run_dir / "checks" / "gguf_bench.json").read_text()) if native.is_file() else {}
    )
    main_speed = (main_bench.get(own) or {}).get("types", {}).get(own, {}).get("speed")
    reused = {own: main_speed | {"reused_from": "the main llama.cpp comparison"}} if main_speed else {}
    begun = time.perf_counter()
    files = {role: results[role].files() for role in ladders}
    speeds = time_ladder(types, files, protocol, reused)
    seconds["speed"] = round(time.perf_counter() - begun, 1)
    frontier = FrontierRecord(
        types=types,
        own_type=own,
        tokens_per_source=TOKENS_PER_SOURCE,
        speed_rounds={"warmup": SPEED_ROUNDS.warmup, "rounds": SPEED_ROUNDS.max_rounds},
        original=results["original"],
        pruned=results["pruned"],
        speed=speeds,
        seconds=seconds | {"total": round(time.perf_counter() - started, 1)},
    ).to_json()
    frontier |= frontier_summary(frontier)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plots = frontier_plots(frontier, args.out.parent / args.out.stem)
    args.out.write_text(json.dumps(frontier, indent=2, default=str) + "\n")
    images = {name: path.relative_to(args.out.parent).as_posix() for name, path in plots.items()}
    markdown = "\n".join(frontier_markdown(frontier, images))
    args.out.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    print(f"wrote {args.out} ({frontier['seconds']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
