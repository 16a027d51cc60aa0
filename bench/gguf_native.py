"""GGUF in, GGUF out, against the alternatives: llama.cpp perplexity, size, time and memory of each route.

From a finished prune of a GGUF source (``rmexport prune model.gguf --out DIR`` or a ``run`` folder),
on the same held-out windows in llama.cpp:

* ``original``: the source GGUF;
* ``plain removal``: the same blocks dropped, every other tensor copied byte for byte, no map;
* ``llama-quantize --prune-layers`` (with ``--llama-quantize``): llama.cpp's own tool on the same
  blocks, which also requantizes every tensor to the source's type (``--allow-requantize``);
* ``dequantize → requantize``: the pruned HF checkpoint (dequantized float32, map folded) written as
  f32 GGUF and quantized to the source's type by llama.cpp's quantizer (every weight quantized twice);
* ``GGUF-native``: ``converters.gguf_prune``: untouched tensors copied, only the folded ``ffn_down``
  requantized (to its own type, or Q8_0 where that type has fewer bits; see ``gguf_prune.folded_type``).

Each route runs in its own child process, so its wall time and peak RSS are its own (the child's
RSS includes the Python interpreter and its imports). The times cover producing the pruned GGUF
from the finished prune (``prune.json``, ``maps.safetensors``, ``hf/``), not the calibration.

    python -m bench.gguf_native --run-dir out/qwen-r0.25 [--eval-tokens 4096] [--llama-quantize [PATH]]
        [--rows "llama-quantize --prune-layers"]    # compute only these rows, keep the others' from --out
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from converters import llama_cpp as llama_cpp_tools
from rmexport.atomic import write_json
from rmexport.models import ModelSource, resolve

__all__ = ["ROWS", "main"]

ORIGINAL = "original"
REMOVAL = "plain removal"
LLAMA_QUANTIZE = "llama-quantize --prune-layers"
ROUTE = "dequantize → requantize"
NATIVE = "GGUF-native"
ROWS = (ORIGINAL, REMOVAL, LLAMA_QUANTIZE, ROUTE, NATIVE)
LIBLLAMA = "libllama"  # --llama-quantize libllama: the same call through llama-cpp-python, no binary
_FILES = {
    REMOVAL: "removal.gguf",
    LLAMA_QUANTIZE: "llama-quantize.gguf",
    ROUTE: "route.gguf",
    NATIVE: "native.gguf",
}


def _source(run_dir: Path) -> tuple[dict[str, Any], ModelSource]:
    record = json.loads((run_dir / "prune.json").read_text())
    source = resolve(record["model"]["location"])
    if not source.is_gguf:
        raise SystemExit(f"{run_dir} was not pruned from a GGUF")
    return record, source


def _removal(run_dir: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    from converters.gguf_prune import write_pruned_gguf

    record, source = _source(run_dir)
    write_pruned_gguf(source.location, dst, record["kept_layers"], {}, dense_fold=True)
    return {}


def _native(run_dir: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    from rmexport.pipeline import prune_gguf_natively

    _, source = _source(run_dir)
    native = prune_gguf_natively(source, run_dir, dst)
    return {
        "tensors_copied": native.copied,
        "tensors_requantized": native.requantized,
        "type_changed": native.type_changed,
    }


def _route(run_dir: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    from converters.gguf_export import export_gguf
    from validation.gguf_parity import gguf_type_of

    _, source = _source(run_dir)
    f32 = dst.with_name("route-f32.gguf")
    export_gguf(run_dir / "hf", f32, "f32")
    llama_cpp_tools.quantize(f32, dst, gguf_type_of(source.location), n_threads=args.threads)
    f32.unlink()
    return {}


def _llama_quantize(run_dir: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    from bench import llama_quantize
    from validation.gguf_parity import gguf_type_of

    record, source = _source(run_dir)
    removed = sorted(set(range(record["L"])) - set(record["kept_layers"]))
    type_name = gguf_type_of(source.location)
    extra: dict[str, Any] = {"pruned_layers_arg": ",".join(map(str, removed))}
    if args.llama_quantize_path == LIBLLAMA:
        llama_quantize.prune_layers_libllama(
            Path(source.location), dst, removed, type_name, threads=args.threads
        )
        return extra | {"tool": "libllama llama_model_quantize (prune_layers), in-process"}
    tool = llama_quantize.find_or_build(args.llama_quantize_path)
    _, rss = llama_quantize.prune_layers(
        tool, Path(source.location), dst, removed, type_name, threads=args.threads
    )
    return extra | {"tool": str(tool), "tool_peak_rss_mib": round(rss, 1)}


_MAKERS: dict[str, Callable[[Path, Path, argparse.Namespace], dict[str, Any]]] = {
    REMOVAL: _removal,
    LLAMA_QUANTIZE: _llama_quantize,
    ROUTE: _route,
    NATIVE: _native,
}


def _peak_rss_mib() -> float:
    """This process's own peak RSS since it started (VmHWM).

    Not ``ru_maxrss``: Linux carries the forking parent's RSS into a child's ``ru_maxrss`` across
    ``execve``, so a child of a big parent would report the parent's size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace) -> int:
    """One route, in this (child) process: writes ``DST.json`` with its own seconds and extras."""
    dst = Path(args.child_out)
    baseline = _peak_rss_mib()
    start = time.perf_counter()
    extra = _MAKERS[args.child](args.run_dir, dst, args)
    extra["seconds"] = round(time.perf_counter() - start, 1)
    extra["rss_before_route_mib"] = round(baseline, 1)  # interpreter + this module's imports
    extra["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    Path(str(dst) + ".json").write_text(json.dumps(extra))
    return 0


def _make(name: str, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run route ``name`` in a child process; its extras, seconds and own peak RSS (MiB)."""
    cmd = [
        sys.executable,
        "-m",
        "bench.gguf_native",
        "--run-dir",
        str(args.run_dir),
        "--threads",
        str(args.threads),
    ]
    cmd += ["--child", name, "--child-out", str(dst)]
    if args.llama_quantize_path:
        cmd += ["--llama-quantize", str(args.llama_quantize_path)]
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise SystemExit(f"route {name!r} failed (exit {done.returncode})")
    return json.loads(Path(str(dst) + ".json").read_text())


def _previous(out: Path, kept: list[int], eval_tokens: int) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run on the same cut and token count (empty if none or different)."""
    if not out.is_file():
        return {}
    old = json.loads(out.read_text())
    if old.get("kept_layers") != kept or old.get("eval_tokens") != eval_tokens:
        return {}
    return old["rows"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gguf_native", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a prune of a GGUF source")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=llama_cpp_tools.default_threads())
    parser.add_argument(
        "--llama-quantize",
        dest="llama_quantize_path",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="add the llama-quantize --prune-layers row; without PATH, build it once from the "
        "llama.cpp that llama-cpp-python's sdist vendors; 'libllama': the same llama_model_quantize "
        "call through llama-cpp-python instead of the binary",
    )
    parser.add_argument(
        "--rows",
        default=None,
        help="comma-separated rows to compute; the others are kept from --out (same cut and "
        f"--eval-tokens). Rows: {', '.join(ROWS)}",
    )
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="rebuild the rows for time, size and memory only; keep their perplexity from --out",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON (default RUN_DIR/bench-gguf-native.json)"
    )
    parser.add_argument("--child", choices=list(_MAKERS), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    if args.llama_quantize_path == "":
        args.llama_quantize_path = None
        want_llama_quantize = True
    else:
        want_llama_quantize = args.llama_quantize_path is not None

    from validation.gguf_bench import _quality, _windows
    from validation.gguf_parity import gguf_type_of

    record, source = _source(args.run_dir)
    kept = record["kept_layers"]
    out = args.out or args.run_dir / "bench-gguf-native.json"
    windows = _windows(source.location, source.location, args.eval_tokens, 512)
    eval_tokens = int(windows.shape[0] * (windows.shape[1] - 1))
    rows = _previous(out, kept, eval_tokens)
    if args.rows is not None:
        todo = [name.strip() for name in args.rows.split(",")]
        unknown = set(todo) - set(ROWS)
        if unknown:
            raise SystemExit(f"unknown rows {sorted(unknown)}; rows: {', '.join(ROWS)}")
    else:
        todo = [name for name in ROWS if name != LLAMA_QUANTIZE or want_llama_quantize]
    with tempfile.TemporaryDirectory(dir=args.run_dir) as work:
        work = Path(work)
        for name in todo:
            if name == ORIGINAL and args.measure_only:
                continue
            if name == ORIGINAL:
                path, extra = Path(source.location), {}
            else:
                path = work / _FILES[name]
                extra = _make(name, path, args)
            if args.measure_only:
                if name not in rows:
                    raise SystemExit(
                        f"--measure-only: no earlier {name!r} row in {out} to keep the perplexity of"
                    )
                rows[name] |= extra | {"size_bytes": path.stat().st_size}
            else:
                rows[name] = _quality(path, windows, args.threads) | extra
            if name != ORIGINAL:
                rows[name]["file"] = _FILES[name] + " (deleted after the bench)"
            print(
                f"{name:30s} PPL {rows[name]['ppl']:8.2f}  {path.stat().st_size / 2**20:8.1f} MiB"
                f"  {extra.get('seconds', '-')} s  peak RSS {extra.get('peak_rss_mib', '-')} MiB",
                flush=True,
            )
    result = {
        "source": source.location,
        "type": gguf_type_of(source.location),
        "kept_layers": kept,
        "eval_tokens": eval_tokens,
        "threads": args.threads,
        "rows": {name: rows[name] for name in ROWS if name in rows},
    }
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
