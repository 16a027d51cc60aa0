"""GGUF in, GGUF out, against the alternatives: llama.cpp perplexity, size and time of each route.

From a finished prune of a GGUF source (``rmexport prune model.gguf --out DIR`` or a ``run`` folder),
on the same held-out windows in llama.cpp:

* ``original``: the source GGUF;
* ``plain removal``: the same blocks dropped, every other tensor copied byte for byte, no map: what
  ``llama-quantize --prune-layers`` gives, without its requantization of everything;
* ``dequantize → requantize``: the pruned HF checkpoint (dequantized float32, map folded) written as
  f32 GGUF and quantized to the source's type by llama.cpp's quantizer (every weight quantized twice);
* ``GGUF-native``: ``converters.gguf_prune``: untouched tensors copied, only the folded ``ffn_down``
  requantized to its own type.

    python -m bench.gguf_native --run-dir out/qwen-r0.25 [--eval-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from converters import llama_cpp as llama_cpp_tools
from converters.gguf_export import export_gguf
from converters.gguf_prune import prune_gguf
from rmexport.arch import adapter_for
from rmexport.atomic import write_json
from rmexport.models import load_config, resolve
from rmexport.replaceme.save import MAPS_FILE, load_maps
from validation.gguf_bench import _quality, _windows
from validation.gguf_parity import gguf_type_of

__all__ = ["main"]


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gguf_native", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a prune of a GGUF source")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=llama_cpp_tools.default_threads())
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON (default RUN_DIR/bench-gguf-native.json)"
    )
    args = parser.parse_args(argv)

    record = json.loads((args.run_dir / "prune.json").read_text())
    source = resolve(record["model"]["location"])
    if not source.is_gguf:
        raise SystemExit(f"{args.run_dir} was not pruned from a GGUF")
    gguf_type = gguf_type_of(source.location)
    adapter = adapter_for(load_config(source))
    kept, folds = record["kept_layers"], load_maps(args.run_dir / MAPS_FILE)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=args.run_dir) as work:
        work = Path(work)
        files = {"original": Path(source.location)}
        _, seconds = _timed(
            lambda: prune_gguf(source.location, work / "removal.gguf", kept, {}, dense_fold=True)
        )
        files["plain removal"] = work / "removal.gguf"
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        native, native_s = _timed(
            lambda: prune_gguf(
                source.location, work / "native.gguf", kept, folds, dense_fold=adapter.dense_fold
            )
        )
        files["GGUF-native"] = work / "native.gguf"

        def requantize() -> None:
            export_gguf(args.run_dir / "hf", work / "route-f32.gguf", "f32")
            llama_cpp_tools.quantize(work / "route-f32.gguf", work / "route.gguf", gguf_type)
            (work / "route-f32.gguf").unlink()

        _, route_s = _timed(requantize)
        files["dequantize → requantize"] = work / "route.gguf"
        windows = _windows(source.location, source.location, args.eval_tokens, 512)
        for name, path in files.items():
            rows[name] = _quality(path, windows, args.threads)
            print(
                f"{name:26s} PPL {rows[name]['ppl']:8.2f}  {path.stat().st_size / 2**20:8.1f} MiB", flush=True
            )
    rows["GGUF-native"] |= {
        "seconds": round(native_s, 1),
        "tensors_copied": native["copied"],
        "tensors_requantized": native["requantized"],
        "type_changed": native["type_changed"],
    }
    rows["dequantize → requantize"]["seconds"] = round(route_s, 1)
    rows["plain removal"]["seconds"] = round(seconds, 1)
    result = {
        "source": source.location,
        "type": gguf_type,
        "kept_layers": kept,
        "eval_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "peak_rss_mib_before_native": round(rss_before / 1024, 1),
        "rows": rows,
    }
    out = args.out or args.run_dir / "bench-gguf-native.json"
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
