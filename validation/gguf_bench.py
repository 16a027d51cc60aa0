"""Perplexity and speed in llama.cpp, original vs pruned: ``rmexport bench gguf``.

Perplexity: llama.cpp's logits over the SAME held-out windows every backend uses
(``heldout_windows``) and the same ``perplexity`` function as PyTorch; llama-perplexity is not
used because it chunks text its own way. Speed: prompt processing (a ``prompt_tokens`` prompt from
an empty cache) and generation (``gen_tokens`` single-token decodes after it), timed around
libllama's decode through llama-cpp-python with all cores, median of ``repeats`` runs after a
warm-up. The pruned model's speedup is shown next to the ideal, original blocks / pruned blocks.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters import llama_cpp as llama_cpp_tools
from rmexport.atomic import write_json
from rmexport.errors import ConfigError
from rmexport.log import get_logger

__all__ = ["add_arguments", "bench_gguf", "format_table", "llama_cpp_forward", "run", "speed"]

log = get_logger(__name__)


def llama_cpp_forward(model: Any):
    """``forward(ids[B, T]) -> logits[B, T, V]`` for ``validation.perplexity`` (one row at a time)."""

    def forward(ids: torch.Tensor) -> np.ndarray:
        return np.stack([llama_cpp_tools.eval_logits(model, row.tolist()) for row in ids])

    return forward


def speed(
    path: str | Path, *, prompt_tokens: int, gen_tokens: int, repeats: int, n_threads: int
) -> dict[str, Any]:
    """Median prompt-processing and generation tokens/s of a GGUF in llama.cpp."""
    rng = np.random.default_rng(0)
    with llama_cpp_tools.open_model(path, n_ctx=prompt_tokens + gen_tokens + 8, n_threads=n_threads) as model:
        vocab = model.n_vocab()
        prompt = rng.integers(10, vocab, size=prompt_tokens).tolist()
        continuation = rng.integers(10, vocab, size=gen_tokens).tolist()
        pp, tg = [], []
        for run_index in range(repeats + 1):  # run 0 warms up caches and is not counted
            model.reset()
            start = time.perf_counter()
            model.eval(prompt)
            prompt_s = time.perf_counter() - start
            start = time.perf_counter()
            for token in continuation:
                model.eval([token])
            gen_s = time.perf_counter() - start
            if run_index:
                pp.append(prompt_tokens / prompt_s)
                tg.append(gen_tokens / gen_s)
    return {
        "pp_tokens_per_s": statistics.median(pp),
        "tg_tokens_per_s": statistics.median(tg),
        "pp_tokens_per_s_runs": pp,
        "tg_tokens_per_s_runs": tg,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeats": repeats,
    }


class _LlamaTokenizer:
    """Just enough of an HF tokenizer for ``heldout_windows``, backed by a GGUF's own tokenizer."""

    def __init__(self, model: Any):
        self._model = model
        self.bos_token_id = model.token_bos() if model.token_bos() >= 0 else None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": llama_cpp_tools.tokenize(self._model, text)}


def _is_gguf(spec: str | Path) -> bool:
    return str(spec).lower().endswith(".gguf")


def _block_count(path: Path) -> int | None:
    from converters.gguf_export import describe_gguf

    return describe_gguf(path)["block_count"]


def _windows(original: str | Path, pruned: str | Path, eval_tokens: int, window: int) -> torch.Tensor:
    from rmexport.calib.corpus import load_corpus
    from rmexport.calib.tokens import heldout_windows

    corpus = load_corpus("builtin")
    checkpoint = next((s for s in (original, pruned) if not _is_gguf(s)), None)
    if checkpoint is not None:
        from transformers import AutoTokenizer

        return heldout_windows(corpus, AutoTokenizer.from_pretrained(str(checkpoint)), eval_tokens, window)
    with llama_cpp_tools.open_model(original, n_ctx=64) as model:
        return heldout_windows(corpus, _LlamaTokenizer(model), eval_tokens, window)


def _torch_ppl(checkpoint: Path, windows: torch.Tensor) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from validation.perplexity import perplexity, torch_forward

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    return perplexity(torch_forward(model), windows, batch_size=1, desc="PyTorch perplexity").as_dict()


def _gguf_file(spec: str | Path, gguf_type: str, work_dir: Path, role: str) -> Path:
    from converters.gguf_export import export_gguf

    if _is_gguf(spec):
        return Path(spec)
    return export_gguf(spec, work_dir / f"{role}-{gguf_type}.gguf", gguf_type)


def _measure(path: Path, windows: torch.Tensor, args: dict[str, Any]) -> dict[str, Any]:
    from validation.gguf_parity import gguf_type_of
    from validation.perplexity import perplexity

    f32 = gguf_type_of(path) == "f32"  # f32 weights: keep the KV cache in f32 too, as parity does
    with llama_cpp_tools.open_model(
        path, n_ctx=windows.shape[1], n_threads=args["n_threads"], logits_all=True, f32_kv_cache=f32
    ) as model:
        ppl = perplexity(
            llama_cpp_forward(model), windows, batch_size=1, desc=f"llama.cpp perplexity {path.name}"
        )
    result = {"file": str(path), "size_bytes": path.stat().st_size, "block_count": _block_count(path)}
    result.update(ppl.as_dict())
    result.update(
        speed(
            path,
            prompt_tokens=args["prompt_tokens"],
            gen_tokens=args["gen_tokens"],
            repeats=args["repeats"],
            n_threads=args["n_threads"],
        )
    )
    return result


def bench_gguf(
    original: str | Path,
    pruned: str | Path,
    *,
    types: tuple[str, ...] = ("f16", "q4_k_m"),
    eval_tokens: int = 2048,
    window: int = 512,
    prompt_tokens: int = 128,
    gen_tokens: int = 32,
    repeats: int = 3,
    n_threads: int | None = None,
    torch_reference: bool = True,
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Perplexity, speed and size of original vs pruned in llama.cpp, per GGUF type."""
    from validation.gguf_parity import gguf_type_of

    file_types = {gguf_type_of(s) for s in (original, pruned) if _is_gguf(s)}
    if len(file_types) > 1:
        raise ConfigError(f"--original and --pruned GGUF files have different types: {sorted(file_types)}")
    if file_types:
        types = tuple(file_types)
    threads = n_threads or llama_cpp_tools.default_threads()
    windows = _windows(original, pruned, eval_tokens, window)
    args = {
        "n_threads": threads,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeats": repeats,
    }
    result: dict[str, Any] = {
        "original": str(original),
        "pruned": str(pruned),
        "windows": int(windows.shape[0]),
        "window_tokens": window,
        "n_threads": threads,
        "library": llama_cpp_tools.library_info(),
        "torch": {},
        "types": {},
    }
    if torch_reference:
        for role, spec in (("original", original), ("pruned", pruned)):
            if not _is_gguf(spec):
                result["torch"][role] = _torch_ppl(Path(spec), windows)
    with tempfile.TemporaryDirectory(prefix="rmexport-bench-") as scratch:
        folder = Path(work_dir) if work_dir else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for gguf_type in types:
            entry: dict[str, Any] = {}
            for role, spec in (("original", original), ("pruned", pruned)):
                path = _gguf_file(spec, gguf_type, folder, role)
                entry[role] = _measure(path, windows, args)
                log.info(
                    "%s %s: ppl %.3f, pp %.1f tok/s, tg %.1f tok/s",
                    gguf_type,
                    role,
                    entry[role]["ppl"],
                    entry[role]["pp_tokens_per_s"],
                    entry[role]["tg_tokens_per_s"],
                )
            entry.update(_ratios(entry["original"], entry["pruned"]))
            result["types"][gguf_type] = entry
    return result


def _ratios(original: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    ideal = (
        original["block_count"] / pruned["block_count"]
        if original["block_count"] and pruned["block_count"]
        else None
    )
    out: dict[str, Any] = {
        "ideal_speedup": ideal,
        "size_ratio": pruned["size_bytes"] / original["size_bytes"],
    }
    for key in ("pp", "tg"):
        speedup = pruned[f"{key}_tokens_per_s"] / original[f"{key}_tokens_per_s"]
        out[f"{key}_speedup"] = speedup
        out[f"{key}_fraction_of_ideal"] = speedup / ideal if ideal else None
    return out


def format_table(result: dict[str, Any]) -> str:
    header = (
        f"{'type':<7} {'model':<9} {'blocks':>6} {'MiB':>7} {'ppl':>9} {'torch ppl':>9} "
        f"{'pp tok/s':>9} {'tg tok/s':>9}"
    )
    lines = [
        f"{result['windows']} windows x {result['window_tokens']} tokens, {result['n_threads']} threads",
        header,
        "-" * len(header),
    ]
    for gguf_type, entry in result["types"].items():
        for role in ("original", "pruned"):
            r = entry[role]
            torch_ppl = result["torch"].get(role, {}).get("ppl")
            torch_text = "-" if torch_ppl is None else f"{torch_ppl:.3f}"
            lines.append(
                f"{gguf_type:<7} {role:<9} {r['block_count'] or '?':>6} {r['size_bytes'] / 2**20:>7.1f} "
                f"{r['ppl']:>9.3f} {torch_text:>9} {r['pp_tokens_per_s']:>9.1f} {r['tg_tokens_per_s']:>9.1f}"
            )
        ideal = entry["ideal_speedup"]
        lines.append(
            f"{gguf_type:<7} speedup   pp x{entry['pp_speedup']:.2f}  tg x{entry['tg_speedup']:.2f}  "
            f"(ideal x{ideal:.2f}: {entry['pp_fraction_of_ideal']:.0%} / {entry['tg_fraction_of_ideal']:.0%})"
            if ideal
            else f"{gguf_type:<7} speedup   pp x{entry['pp_speedup']:.2f}  tg x{entry['tg_speedup']:.2f}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--original", required=True, metavar="FILE_OR_CKPT", help="unpruned model: .gguf or HF dir"
    )
    parser.add_argument(
        "--pruned", required=True, metavar="FILE_OR_CKPT", help="pruned model: .gguf or HF dir"
    )
    parser.add_argument(
        "--types", default="f16,q4_k_m", help="GGUF types for checkpoints (default f16,q4_k_m)"
    )
    parser.add_argument(
        "--eval-tokens", type=int, default=2048, help="held-out tokens for perplexity (default 2048)"
    )
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window (default 512)")
    parser.add_argument(
        "--prompt-tokens", type=int, default=128, help="prompt length for speed (default 128)"
    )
    parser.add_argument("--gen-tokens", type=int, default=32, help="generated tokens for speed (default 32)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)"
    )
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch perplexity reference")
    parser.add_argument("--work-dir", help="keep the exported GGUFs here (default: a temporary folder)")
    parser.add_argument("--json", metavar="FILE", help="write the result as JSON")


def run(args: argparse.Namespace) -> int:
    from rmexport.inputs import check_bench_gguf_args

    types = check_bench_gguf_args(args)
    result = bench_gguf(
        args.original,
        args.pruned,
        types=types,
        eval_tokens=args.eval_tokens,
        window=args.window,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        repeats=args.repeats,
        n_threads=args.threads,
        torch_reference=not args.no_torch,
        work_dir=args.work_dir,
    )
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0
