"""Original vs pruned ONNX exports in onnxruntime: held-out perplexity, prefill latency, decode speed.

- Perplexity: ``validation.perplexity.perplexity`` over ``heldout_windows`` (the same windows and
  the same computation as the PyTorch and llama.cpp numbers), logits from the plain session.
- Prefill: one forward over a 128- and a 512-token held-out prompt, batch 1, empty cache.
- Decode: batch 1, a short held-out prompt, then ``new_tokens`` single-token steps through
  the KV cache with IO binding (the cache stays in onnxruntime buffers); tokens/s of the steps.
Each latency is the median (and p90) of ``runs`` timed runs after ``warmup`` untimed ones, taken
round-robin between the two models so that load drift on a shared CPU hits both alike.
Depth pruning removes whole blocks, so the ideal speed-up is L/N (blocks before/after); the
embedding, final norm and LM head do not shrink, so the measured speed-up stays below it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from rmexport.atomic import write_json
from rmexport.errors import ConfigError, ModelLoadError

from .latency import hardware_info, time_interleaved

__all__ = ["bench_onnx", "add_arguments", "run"]

log = logging.getLogger(__name__)

DEFAULT_EVAL_TOKENS = 4096
DEFAULT_PREFILL_LENGTHS = (128, 512)
DEFAULT_NEW_TOKENS = 128
DECODE_PROMPT_TOKENS = 16
_VERSIONS = ("onnxruntime", "onnxruntime-gpu", "onnx", "optimum-onnx", "torch", "transformers", "numpy")


def _prompt(windows: Any, length: int) -> np.ndarray:
    """The first ``length`` held-out tokens (BOS first), taken across windows if needed."""
    flat = np.concatenate([windows[0].numpy(), windows[1:, 1:].reshape(-1).numpy()])
    if len(flat) < length:
        raise ConfigError(
            f"need {length} held-out tokens for the prefill prompt; --eval-tokens gives {len(flat)}"
        )
    return flat[:length]


def _latencies(
    decoders: dict[str, Any],
    windows: Any,
    *,
    prefill_lengths: tuple[int, ...],
    new_tokens: int,
    runs: int,
    warmup: int,
) -> dict[str, dict[str, Any]]:
    """Prefill and decode timings of every model, measured round-robin between the models."""
    results: dict[str, dict[str, Any]] = {name: {"prefill": {}} for name in decoders}
    for length in prefill_lengths:
        prompt = _prompt(windows, length)
        fns = {name: (lambda d=d, p=prompt: d.prefill(p)) for name, d in decoders.items()}
        for name, timing in time_interleaved(fns, runs=runs, warmup=warmup).items():
            results[name]["prefill"][str(length)] = {
                **timing.as_dict("latency"),
                "tokens_per_s": length / timing.median_s,
            }
    prompt = _prompt(windows, DECODE_PROMPT_TOKENS)
    fns = {name: (lambda d=d: d.greedy_timed(prompt, new_tokens)[1]) for name, d in decoders.items()}
    for name, timing in time_interleaved(fns, runs=runs, warmup=warmup, self_timed=True).items():
        results[name]["decode"] = {
            "prompt_tokens": DECODE_PROMPT_TOKENS,
            "new_tokens": new_tokens,
            "batch_size": 1,
            "io_binding": True,
            "latency_ms_per_token_p50": timing.median_s / new_tokens * 1e3,
            "tokens_per_s": new_tokens / timing.median_s,
            "tokens_per_s_runs": [new_tokens / s for s in timing.samples_s],
            "runs": runs,
        }
    return results


def _windows(onnx_dir: Path, eval_tokens: int, window: int):
    from transformers import AutoTokenizer

    from rmexport.calib.corpus import load_corpus
    from rmexport.calib.tokens import heldout_windows

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    return heldout_windows(load_corpus("builtin"), tokenizer, eval_tokens, window=window)


def bench_onnx(
    original_dir: str | Path,
    pruned_dir: str | Path,
    *,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    window: int = 512,
    prefill_lengths: tuple[int, ...] = DEFAULT_PREFILL_LENGTHS,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    runs: int = 5,
    warmup: int = 1,
    threads: int = 0,
) -> dict[str, Any]:
    """Perplexity and speed of two ONNX exports side by side, with speed-ups against L/N."""
    if runs < 1 or new_tokens < 1 or not prefill_lengths:
        raise ConfigError("need --runs >= 1, --new-tokens >= 1 and at least one prefill length")
    original_dir, pruned_dir = Path(original_dir), Path(pruned_dir)
    for path in (original_dir, pruned_dir):
        if not (path / "model.onnx").is_file():
            raise ModelLoadError(
                f"no model.onnx in {path}", hint="create it with: rmexport export onnx CKPT --out DIR"
            )
    windows = _windows(original_dir, eval_tokens, window)
    if not np.array_equal(windows.numpy(), _windows(pruned_dir, eval_tokens, window).numpy()):
        raise ConfigError(
            "the two exports tokenize the held-out text differently",
            hint="compare a pruned model with the model it was pruned from",
        )
    from .ort_decoder import OrtDecoder
    from .perplexity import perplexity

    paths = {"original": original_dir, "pruned": pruned_dir}
    decoders = {name: OrtDecoder(path, threads=threads) for name, path in paths.items()}
    models: dict[str, dict[str, Any]] = {}
    for name, decoder in decoders.items():
        ppl = perplexity(decoder.forward, windows, batch_size=1, desc=f"perplexity {name}")
        log.info("bench onnx: %s (%d blocks) ppl=%.3f", name, decoder.num_layers, ppl.ppl)
        models[name] = {
            "onnx_dir": str(decoder.dir),
            "num_hidden_layers": decoder.num_layers,
            "providers": decoder.session.get_providers(),
            "size_bytes": sum(f.stat().st_size for f in decoder.dir.glob("model.onnx*")),
            **ppl.as_dict(),
        }
    options = dict(prefill_lengths=tuple(prefill_lengths), new_tokens=new_tokens, runs=runs, warmup=warmup)
    timings = _latencies(decoders, windows, **options)
    for name in models:
        models[name].update(timings[name])
    original, pruned = models["original"], models["pruned"]
    ideal = original["num_hidden_layers"] / pruned["num_hidden_layers"]
    speedup: dict[str, float] = {"ideal_layers_ratio": ideal}
    for length in prefill_lengths:
        key = str(length)
        speedup[f"prefill_{key}"] = (
            original["prefill"][key]["latency_ms_p50"] / pruned["prefill"][key]["latency_ms_p50"]
        )
    speedup["decode"] = pruned["decode"]["tokens_per_s"] / original["decode"]["tokens_per_s"]
    return {
        "backend": "onnxruntime",
        "eval": {"source": "builtin", "tokens": int(original["tokens"]), "window": window},
        "threads": threads or "onnxruntime default",
        "hardware": hardware_info(*_VERSIONS),
        "models": models,
        "ppl_ratio": pruned["ppl"] / original["ppl"],
        "speedup": speedup,
    }


def _table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    original, pruned, speed = result["models"]["original"], result["models"]["pruned"], result["speedup"]
    rows = [
        (
            "blocks",
            str(original["num_hidden_layers"]),
            str(pruned["num_hidden_layers"]),
            f"ideal L/N = {speed['ideal_layers_ratio']:.3f}",
        ),
        (
            f"perplexity ({original['tokens']} tokens)",
            f"{original['ppl']:.3f}",
            f"{pruned['ppl']:.3f}",
            f"x{result['ppl_ratio']:.3f}",
        ),
    ]
    for key in original["prefill"]:
        rows.append(
            (
                f"prefill {key} tokens, ms (p50)",
                f"{original['prefill'][key]['latency_ms_p50']:.1f}",
                f"{pruned['prefill'][key]['latency_ms_p50']:.1f}",
                f"speed-up {speed[f'prefill_{key}']:.3f}",
            )
        )
    rows.append(
        (
            f"decode {original['decode']['new_tokens']} tokens, tok/s",
            f"{original['decode']['tokens_per_s']:.1f}",
            f"{pruned['decode']['tokens_per_s']:.1f}",
            f"speed-up {speed['decode']:.3f}",
        )
    )
    return rows


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    hw = result["hardware"]
    table = Table(
        title=f"onnxruntime {hw['versions'].get('onnxruntime')} on {hw['cpu']} ({hw['cpu_count']} cores)"
    )
    for column in ("", "original", "pruned", "pruned vs original"):
        table.add_column(column)
    for row in _table_rows(result):
        table.add_row(*row)
    Console().print(table)


# --- CLI ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--original", required=True, help="ONNX export of the original model")
    parser.add_argument("--pruned", required=True, help="ONNX export of the pruned model")
    parser.add_argument(
        "--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, help="held-out tokens for PPL"
    )
    parser.add_argument("--window", type=int, default=512, help="perplexity window")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help="decode steps to time")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    parser.add_argument("--json", help="write the result to this JSON file")


def run(args: argparse.Namespace) -> int:
    from rmexport.inputs import check_bench_onnx_args

    check_bench_onnx_args(args)
    result = bench_onnx(
        args.original,
        args.pruned,
        eval_tokens=args.eval_tokens,
        window=args.window,
        new_tokens=args.new_tokens,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
    )
    print_table(result)
    if args.json:
        write_json(args.json, result)
    return 0
