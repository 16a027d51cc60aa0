"""Does refitting ``o_proj`` in the repair walk pay? (issue 29, item 1's "refitting o_proj as well")

Starts from a finished prune (``prune.json`` + ``hf/``) and the original model, resident, in float32.
The blocks after the cut are walked again with the original and the pruned model side by side. In each
repaired block, first the attention's output projection is refitted so that, fed the pruned stream, the
stream after the attention matches the original's stream after the same block's attention; then the
``down_proj`` is refitted as the prune's repair does (the MLP's hidden activations → the original's
stream after the block). Both are the ridge least squares of ``rmexport.replaceme.solve.ridge_toward``,
shrunk toward the original block's own weights, each strength chosen on the set-aside documents. The
stages are scored on the held-out windows ``rmexport run`` uses (4,096 tokens per source).

    python -m bench.repair_o_proj out/shared/smollm2-r0.25 --blocks 2 --o-proj-only 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from bench.refine_kl import add, load, nll_all, prefix
from rmexport.atomic import write_json
from rmexport.calib.collect import accumulate, empty_statistics
from rmexport.calib.corpus import BUILTIN, OUT_OF_DOMAIN, load_corpus
from rmexport.calib.tokens import heldout_windows
from rmexport.models import load_tokenizer, resolve
from rmexport.prune import PruneOptions, _local_checkpoint, calibration_set
from rmexport.replaceme.solve import ridge_toward

__all__ = ["main"]

GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, float("inf"))


class Parts:
    """One block's forward, split where the two refitted weights act."""

    def __init__(self, layer, rotary_emb):
        self.layer, self.rotary_emb = layer, rotary_emb

    def attention(self, h: torch.Tensor):
        """(the o_proj input, the attention's output, the stream after it)."""
        layer = self.layer
        positions = torch.arange(h.shape[1]).unsqueeze(0)
        rope = self.rotary_emb(h, positions)
        seen = {}

        def keep_input(_module, inputs, _output) -> None:  # returning a value would replace the output
            seen["a"] = inputs[0]

        handle = layer.self_attn.o_proj.register_forward_hook(keep_input)
        try:
            attn, _ = layer.self_attn(
                hidden_states=layer.input_layernorm(h),
                attention_mask=None,
                position_ids=positions,
                position_embeddings=rope,
            )
        finally:
            handle.remove()
        return seen["a"], attn, h + attn

    def mlp(self, mid: torch.Tensor):
        """(the hidden activations, the MLP's output, the stream after the block)."""
        mlp = self.layer.mlp
        x = self.layer.post_attention_layernorm(mid)
        hidden = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        out = mlp.down_proj(hidden)
        return hidden, out, mid + out


def _sums(pairs, features: int, d: int, part):
    """Sums of ``part(stream) -> (features, contribution, after)`` toward the targets, real tokens only."""
    stats = empty_statistics([0], 1, d, features)[0]
    for pruned, target, mask in pairs:
        f, contribution, after = part(pruned)
        real = mask.bool()
        accumulate(stats, contribution[real], after[real], target[real], features=f[real])
    return stats


@torch.no_grad()
def walk(original, pruned, cut, sets, blocks: int, o_proj_only: int, refit_o_proj: bool):
    """Refit ``blocks`` blocks after the cut (o_proj then down_proj, or down_proj alone), then
    ``o_proj_only`` more blocks' o_proj alone. Returns the model and each block's chosen strengths."""
    start, end = cut
    model = copy.deepcopy(pruned)
    streams = {}
    for name, batches in sets.items():
        streams[name] = [
            [prefix(model, ids, start), prefix(original, ids, end), mask] for ids, mask in batches
        ]
    d = original.config.hidden_size
    chosen = []
    for k in range(blocks + o_proj_only):
        o_layer, p_layer = original.model.layers[end + k], model.model.layers[start + k]
        rope = original.model.rotary_emb
        o_parts, p_parts = Parts(o_layer, rope), Parts(p_layer, rope)
        mids = {n: [o_parts.attention(t)[2] for _, t, _ in s] for n, s in streams.items()}
        afters = {n: [o_parts.mlp(m)[2] for m in ms] for n, ms in mids.items()}
        record = {"layer": end + k}
        if refit_o_proj or k >= blocks:
            width = p_layer.self_attn.o_proj.weight.shape[1]
            fit, aside = (
                _sums(
                    [(p, m, mask) for (p, _, mask), m in zip(streams[n], mids[n], strict=True)],
                    width,
                    d,
                    p_parts.attention,
                )
                for n in ("fit", "aside")
            )
            choice = ridge_toward(fit, aside, o_layer.self_attn.o_proj.weight.T.double(), GRID)
            p_layer.self_attn.o_proj.weight.copy_(choice.transform.T.float())
            record["o_proj"] = {"alpha": choice.alpha, "errors": choice.set_aside_rel_residual}
        if k < blocks:
            features = p_layer.mlp.down_proj.weight.shape[1]

            def part(h, p_parts=p_parts):
                return p_parts.mlp(p_parts.attention(h)[2])

            fit, aside = (
                _sums(
                    [(p, a, mask) for (p, _, mask), a in zip(streams[n], afters[n], strict=True)],
                    features,
                    d,
                    part,
                )
                for n in ("fit", "aside")
            )
            choice = ridge_toward(fit, aside, o_layer.mlp.down_proj.weight.T.double(), GRID)
            p_layer.mlp.down_proj.weight.copy_(choice.transform.T.float())
            record["down_proj"] = {"alpha": choice.alpha, "errors": choice.set_aside_rel_residual}
        chosen.append(record)
        print(json.dumps(record), flush=True)
        for n, s in streams.items():
            for entry, after in zip(s, afters[n], strict=True):
                entry[0] = p_parts.mlp(p_parts.attention(entry[0])[2])[2]
                entry[1] = after
    return model, chosen


@torch.no_grad()
def perplexity(model, windows) -> dict[str, float]:
    out = {}
    for source, w in windows.items():
        sums: dict[str, tuple[float, int]] = {}
        for chunk in w.split(4):
            add(sums, "m", nll_all(model(chunk).logits, chunk))
        a, b = sums["m"]
        out[source] = math.exp(a / b)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.repair_o_proj", description=__doc__.split("\n")[0])
    parser.add_argument("prune_dir", type=Path)
    parser.add_argument("--blocks", type=int, default=2, help="blocks after the cut refitted")
    parser.add_argument("--o-proj-only", type=int, default=0, help="then this many more blocks' o_proj alone")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/bench/repair-o-proj.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    record = json.loads((args.prune_dir / "prune.json").read_text())
    (cut,) = [tuple(c["cut"]) for c in record["cuts"]]
    source = resolve(record["model"]["spec"])
    tokenizer = load_tokenizer(source)
    original = load(_local_checkpoint(source))
    pruned = load(str(args.prune_dir / "hf"))
    options = PruneOptions()
    sets = {
        "fit": calibration_set(tokenizer, options).batches,
        "aside": calibration_set(tokenizer, options, set_aside=True).batches,
    }
    windows = {s: heldout_windows(load_corpus(s), tokenizer, 4096) for s in (BUILTIN, *OUT_OF_DOMAIN)}
    results = {"saved": {"perplexity": perplexity(pruned, windows)}}
    print("saved", results["saved"], flush=True)
    variants = {
        "down_proj only (the prune's repair, redone here)": dict(refit_o_proj=False, o_proj_only=0),
        "o_proj then down_proj": dict(refit_o_proj=True, o_proj_only=0),
    }
    if args.o_proj_only:
        variants[f"o_proj then down_proj, then {args.o_proj_only} more blocks' o_proj"] = dict(
            refit_o_proj=True, o_proj_only=args.o_proj_only
        )
    for name, kw in variants.items():
        t0 = time.perf_counter()
        model, chosen = walk(original, pruned, cut, sets, args.blocks, **kw)
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, windows)
        results[name] = {"perplexity": ppl, "blocks": chosen, "walk_s": round(seconds, 1)}
        print(name, results[name]["perplexity"], f"{seconds:.0f} s", flush=True)
        del model
    write_json(
        args.out,
        {
            "prune_dir": str(args.prune_dir),
            "cut": list(cut),
            "results": results,
            "wall_s": round(time.perf_counter() - started, 1),
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
