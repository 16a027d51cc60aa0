"""llama.cpp perplexity of K-quants with and without an importance matrix, original and pruned side by side.

For each model (the original and a pruned checkpoint whose ``prune.json`` sits beside it) and each
type, the GGUF is made by ``rmexport``'s exporter without a matrix, and with one that
``llama-imatrix`` computes from the prune's calibration text (the original's from the same text,
on the original), capped at each of ``--chunks`` sequences (``all``: the whole text). All are
measured in llama.cpp on the same held-out windows of every text source.

    python -m bench.imatrix_quality --pruned out/smollm2-135m-r0.25/hf \\
        --out bench/results/imatrix-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from converters.gguf_export import export_gguf, requantize_gguf
from converters.imatrix import imatrix_path_for
from rmexport.calib.corpus import BUILTIN, OUT_OF_DOMAIN, load_corpus
from rmexport.calib.tokens import heldout_windows
from rmexport.imatrix_text import IMATRIX_CHUNKS, calibration_recipe, calibration_text
from rmexport.llamacpp import open_model
from rmexport.models import DEFAULT_MODEL, checkpoint_dir, resolve
from rmexport.sysinfo import usable_cores
from validation.gguf_bench import llama_cpp_forward
from validation.perplexity import perplexity


def _windows(checkpoint: Path, eval_tokens: dict[str, int]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return {s: heldout_windows(load_corpus(s), tokenizer, n) for s, n in eval_tokens.items()}


def _perplexities(path: Path, windows: dict[str, torch.Tensor], threads: int) -> dict[str, float]:
    width = next(iter(windows.values())).shape[1]
    with open_model(path, n_ctx=width, n_threads=threads, logits_all=True) as model:
        return {
            source: round(
                perplexity(llama_cpp_forward(model), w, batch_size=1, desc=f"{path.name} {source}").ppl, 3
            )
            for source, w in windows.items()
        }


def measure_model(
    role: str,
    model: Path,
    tokenizer_dir: Path,
    record: Path,
    types: list[str],
    work: Path,
    windows,
    threads: int,
    caps: list[int | None],
) -> list[dict[str, Any]]:
    """``model`` is an HF checkpoint (exported) or a GGUF file (requantized through f32). ``caps``:
    the matrices to try, by their text's sequence cap (None: all of the text)."""
    export = requantize_gguf if model.suffix == ".gguf" else export_gguf
    rows = []
    matrices: dict[int | None, Path] = {}
    for gguf_type in types:
        for variant in ["none", *caps]:
            label = "" if variant == "none" else f"-imatrix{variant or 'all'}"
            out = work / f"{role}-{gguf_type}{label}.gguf"
            source: Any = None
            if variant != "none":
                # The matrix does not depend on the type: computed once per model and cap, then reused.
                source = matrices.get(variant) or calibration_text(tokenizer_dir, record, max_chunks=variant)
            start = time.perf_counter()
            export(model, out, gguf_type, imatrix_source=source)
            seconds = time.perf_counter() - start
            if variant != "none" and variant not in matrices:
                matrices[variant] = imatrix_path_for(out)
            row = {
                "model": role,
                "type": gguf_type,
                "imatrix": variant != "none",
                "imatrix_chunks": None if variant == "none" else (variant or "all"),
                "size_mib": round(out.stat().st_size / 2**20, 2),
                "export_s": round(seconds, 1),
                "ppl": _perplexities(out, windows, threads),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _matrix_rank(row: dict[str, Any]) -> float:
    """No matrix first, then by the cap on its text, the whole text last (rows from before caps: all)."""
    if not row["imatrix"]:
        return -1
    chunks = row.get("imatrix_chunks", "all")
    return float("inf") if chunks == "all" else chunks


def _table(rows: list[dict[str, Any]]) -> str:
    sources = list(rows[0]["ppl"])
    lines = [
        "| model | type | matrix | size MiB | " + " | ".join(sources) + " |",
        "|---|---|---|---|" + "---|" * len(sources),
    ]
    plain: dict[str, Any] = {}
    for row in rows:
        if not row["imatrix"]:
            plain = row
        cells = []
        for s in sources:
            a, b = plain["ppl"][s], row["ppl"][s]
            cells.append(f"{b:.2f}" + (f" ({100 * (b - a) / a:+.1f} %)" if row["imatrix"] else ""))
        matrix = f"{row.get('imatrix_chunks', 'all')} chunks" if row["imatrix"] else "none"
        lines.append(
            f"| {row['model']} | {row['type']} | {matrix} | {row['size_mib']:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pruned", required=True, type=Path, help="pruned HF checkpoint, prune.json beside it"
    )
    parser.add_argument("--original", default=DEFAULT_MODEL, help="original model: alias, HF dir or .gguf")
    parser.add_argument("--types", default="q4_k_m,q3_k_m")
    parser.add_argument("--models", default="original,pruned", type=lambda v: v.split(","))
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out Wikipedia tokens")
    parser.add_argument(
        "--ood-tokens", type=int, default=4096, help="held-out tokens of docs and dialogue (0: none)"
    )
    parser.add_argument(
        "--chunks",
        default=str(IMATRIX_CHUNKS),
        type=lambda v: [None if c == "all" else int(c) for c in v.split(",")],
        help="comma-separated caps on the matrix's text, in sequences; 'all' for the whole text",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("out/bench/imatrix"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/imatrix-smollm2-135m.json"))
    args = parser.parse_args(argv)

    source = resolve(args.original)
    original = Path(source.location) if source.is_gguf else Path(checkpoint_dir(source))
    original_tokenizer = Path(checkpoint_dir(source))
    record = args.pruned.parent / "prune.json"
    types = args.types.split(",")
    threads = usable_cores()
    ood = dict.fromkeys(OUT_OF_DOMAIN, args.ood_tokens) if args.ood_tokens else {}
    windows = _windows(original_tokenizer, {BUILTIN: args.eval_tokens} | ood)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    models = {"original": (original, original_tokenizer), "pruned": (args.pruned, args.pruned)}
    # Rows measured earlier for the models not asked for now are kept (one model at a time suits a
    # shared machine better).
    earlier = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    rows = [r for r in earlier if r["model"] not in args.models]
    for role in args.models:
        model, tokenizer_dir = models[role]
        rows += measure_model(
            role, model, tokenizer_dir, record, types, args.work_dir, windows, threads, args.chunks
        )
    rows.sort(key=lambda r: (list(models).index(r["model"]), types.index(r["type"]), _matrix_rank(r)))
    result = {
        "original": str(original),
        "pruned": str(args.pruned),
        "calibration": calibration_recipe(record),
        "eval_tokens": {s: int(w.shape[0] * (w.shape[1] - 1)) for s, w in windows.items()},
        "threads": threads,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
