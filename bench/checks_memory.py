"""Peak memory of the held-out perplexity check: full-vocabulary logits against the engine's chunks.

Two child processes on the same model and windows (so each peak RSS is its own):

* ``full_logits``: what the checks did before the block engine: the whole model in memory, a
  transformers forward of 4 windows at a time returning every position's logits, then a float64
  log-softmax over them (memory grows with vocabulary × batch × window);
* ``engine``: ``rmexport.replaceme.checks.perplexities``: blocks streamed or resident as the budget
  says, the LM head applied a few positions at a time.

    python -m bench.checks_memory --model out/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rmexport.atomic import write_json

__all__ = ["main"]

VARIANTS = ("full_logits", "engine")


def _windows(source: Any, eval_tokens: int) -> Any:
    from rmexport.calib.corpus import load_corpus
    from rmexport.calib.tokens import heldout_windows
    from rmexport.models import load_tokenizer

    return heldout_windows(load_corpus("builtin"), load_tokenizer(source), eval_tokens)


def _child(variant: str, model: str, eval_tokens: int, budget: str | None) -> dict[str, Any]:
    import math

    import torch

    from rmexport.models import checkpoint_dir, metadata_dir, resolve

    source = resolve(model)
    windows = _windows(source, eval_tokens)
    start = time.perf_counter()
    if variant == "full_logits":
        from transformers import AutoModelForCausalLM

        from validation.perplexity import perplexity, torch_forward

        hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir(source), dtype=torch.float32).eval()
        ppl = perplexity(torch_forward(hf), windows, batch_size=4).ppl
    else:
        from rmexport.calib.budget import MemoryBudget
        from rmexport.calib.engine import Engine, original_plan
        from rmexport.replaceme.checks import perplexities

        engine = Engine.open(metadata_dir(source), MemoryBudget.from_option(budget))
        ppl = perplexities(engine, {"original": original_plan(engine.n_layers)}, windows)["original"]
        engine.close()
    return {
        "variant": variant,
        "ppl": ppl if math.isfinite(ppl) else None,
        "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checks_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--memory-budget", default=None, help="the engine's budget (default: half of RAM)")
    parser.add_argument("--out", type=Path, default=Path("out/bench/checks-memory.json"))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.model, args.eval_tokens, args.memory_budget)))
        return 0
    results = []
    for variant in VARIANTS:
        command = [sys.executable, "-m", "bench.checks_memory", "--child", variant, "--model", args.model]
        command += ["--eval-tokens", str(args.eval_tokens)]
        if args.memory_budget:
            command += ["--memory-budget", args.memory_budget]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = results[-1]
        print(
            f"{variant:12s} PPL {row['ppl']:.3f}  peak RSS {row['peak_rss_mib']:.0f} MiB  {row['seconds']} s",
            flush=True,
        )
    write_json(args.out, {"model": args.model, "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
