"""Does a short KL refinement of the folded ``down_proj`` pay? (issue 29, item 2)

Starts from a finished prune (``prune.json`` + ``hf/``): the block ``start - 1`` before the cut carries the
closed-form map folded into its ``down_proj``. Gradient steps (Adam) on that one weight minimise
KL(original || pruned) over the next-token distributions of the calibration documents, and the best step
by the set-aside loss (mean next-token loss of the documents after the calibration ones, each source of the
mixture weighted alike) is kept. Everything before the folded MLP is unchanged by the prune, so it is run
once: the teacher's final hidden state (its logits follow from the shared LM head) and, for the pruned
model, the folded block's attention output ``Y`` and MLP hidden activations ``H`` are cached; a step runs
``Y + H·Wᵀ``, the blocks after the cut and the head, forward and backward, in bfloat16 autocast with a
float32 master weight.

Every variant is then judged on the held-out windows ``rmexport run`` uses (4,096 tokens per source),
next to the original, plain removal of the same blocks and the pruned model as saved, in float32.

    python -m bench.refine_kl out/shared/smollm2-r0.25 --variants "lr=3e-3,epochs=2,evals=6"

A variant is ``key=value`` pairs joined by commas; variants are separated by ``;``. Keys: ``lr``,
``epochs`` (at most), ``docs`` (calibration documents), ``topk`` (0 = the full distribution),
``evals`` (set-aside evaluations per epoch), ``patience``, ``minutes``, ``blocks`` (how many blocks after
the fold also have their ``down_proj`` refined: the repaired ones of a default prune), ``select`` (``kl``:
the step with the smallest mean set-aside KL to the original among those no further from it than the
start on any source, as the prune's guard judges; ``nll``: the smallest mean set-aside loss).
Each weight's step size is ``lr`` scaled by its RMS against the folded weight's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rmexport.atomic import write_json
from rmexport.calib.corpus import BUILTIN, OUT_OF_DOMAIN, load_corpus
from rmexport.calib.tokens import heldout_windows
from rmexport.models import load_tokenizer, resolve
from rmexport.prune import PruneOptions, _local_checkpoint, calibration_set, set_aside_by_source

__all__ = ["main"]

EVAL_TOKENS = 4096  # the windows of `rmexport run`
TOP_K = 128  # teacher tokens stored per position


@dataclass(frozen=True)
class Variant:
    lr: float = 3e-3  # the closed-form map's entries have std 0.41 on SmolLM2-135M: 3e-4 barely moves it
    epochs: int = 3
    docs: int = 384
    topk: int = 64  # 0: the full distribution (at most TOP_K)
    evals: int = 2  # set-aside evaluations per epoch
    patience: int = 2
    minutes: float = 0  # a time budget for the steps (0: none); the best weight so far is kept
    bf16: int = 1  # forward and backward in bfloat16 autocast (the master weight stays float32)
    seed: int = 0
    blocks: int = 0  # blocks after the fold whose down_proj is refined too
    select: str = "nll"  # "kl" or "nll": how the kept step is chosen

    @classmethod
    def parse(cls, text: str) -> Variant:
        fields = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, value = part.split("=")
            kind = type(getattr(cls(), key))
            fields[key] = kind(float(value)) if kind is int else kind(value)
        if fields.get("select", "nll") not in ("kl", "nll"):
            raise ValueError("select is kl or nll")
        return cls(**fields)

    def name(self) -> str:
        dist = "full" if self.topk == 0 else f"top{self.topk}"
        more = f" +{self.blocks} blocks select={self.select}" if self.blocks or self.select != "nll" else ""
        return f"lr={self.lr:g} epochs<={self.epochs} docs={self.docs} {dist}{more}"


# ---------------------------------------------------------------------------- the model's pieces


class Tail:
    """Blocks ``layers`` of a HF Llama-family model, then its final norm (and head), from hidden states."""

    def __init__(self, model, layers: list[int]):
        self.model = model.model
        self.head = model.lm_head
        self.layers = [self.model.layers[i] for i in layers]

    def run(self, h: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        positions = torch.arange(h.shape[1]).unsqueeze(0)
        rope = self.model.rotary_emb(h, positions)
        for layer in self.layers:
            out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope)
            h = out[0] if isinstance(out, tuple) else out
        return self.model.norm(h) if final_norm else h


def prefix(model, ids: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Hidden states entering block ``n_blocks`` (right padding only, so a causal mask suffices)."""
    h = model.model.embed_tokens(ids)
    return Tail(model, list(range(n_blocks))).run(h, final_norm=False)


def split_block(model, block: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Y`` (the residual stream after attention) and ``H`` (the MLP's hidden activations) of ``block``."""
    layer = model.model.layers[block]
    positions = torch.arange(h.shape[1]).unsqueeze(0)
    rope = model.model.rotary_emb(h, positions)
    attn, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(h),
        attention_mask=None,
        position_ids=positions,
        position_embeddings=rope,
    )
    y = h + attn
    x = layer.post_attention_layernorm(y)
    mlp = layer.mlp
    return y, mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


# ---------------------------------------------------------------------------- data


@dataclass
class Cached:
    """Per batch: token ids, mask, the folded block's ``Y`` and ``H``, the teacher's final hidden state."""

    ids: list[torch.Tensor]
    mask: list[torch.Tensor]
    y: list[torch.Tensor]
    h: list[torch.Tensor]
    teacher: list[torch.Tensor]

    @property
    def tokens(self) -> int:
        return int(sum(m.sum() for m in self.mask))


@torch.no_grad()
def cache_batches(original, batches, block: int, teacher_layers: list[int]) -> Cached:
    out = Cached([], [], [], [], [])
    teacher = Tail(original, teacher_layers)
    for ids, mask in batches:
        x = prefix(original, ids, block)
        y, h = split_block(original, block, x)
        out.ids.append(ids)
        out.mask.append(mask.bool())
        out.y.append(y)
        out.h.append(h)
        out.teacher.append(teacher.run(x))
    return out


@dataclass
class TopK:
    """Per batch, for each real position: the teacher's ``k`` largest log-probabilities and their tokens."""

    logp: list[torch.Tensor]
    index: list[torch.Tensor]


@torch.no_grad()
def teacher_topk(c: Cached, head, k: int) -> TopK:
    out = TopK([], [])
    for t, mask in zip(c.teacher, c.mask, strict=True):
        logp = torch.log_softmax(head(t[mask]).float(), -1)
        top, index = logp.topk(k, -1)
        out.logp.append(top)
        out.index.append(index)
    return out


def cached(path: Path | None, build) -> tuple[Cached, float]:
    """``build()``, or what an earlier run stored at ``path``; and the seconds it took to build."""
    if path is not None and path.exists():
        data = torch.load(path)
        kind = {"Cached": Cached, "TopK": TopK}[data.get("kind", "Cached")]
        return kind(**data["cached"]), data["build_s"]
    began = time.perf_counter()
    value = build()
    build_s = time.perf_counter() - began
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"kind": type(value).__name__, "cached": asdict(value), "build_s": build_s},
            path.with_suffix(".tmp"),
        )
        path.with_suffix(".tmp").rename(path)
    return value, build_s


# ---------------------------------------------------------------------------- losses


def kl_full(student_logits, teacher_logits, mask) -> tuple[torch.Tensor, int]:
    """Summed KL(teacher || student) over the real positions, and their number."""
    log_q = torch.log_softmax(student_logits[mask].float(), -1)
    log_p = torch.log_softmax(teacher_logits[mask].float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(), int(mask.sum())


def kl_topk(student_logits, mask, logp: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """KL(teacher || student) on the teacher's top-k tokens and one bucket for the rest of the vocabulary
    (a proper KL of that coarser distribution), summed over the real positions; and their number."""
    s = student_logits[mask].float()
    log_q = s.gather(-1, index) - torch.logsumexp(s, -1, keepdim=True)
    p = logp.exp()
    rest_p = (1 - p.sum(-1)).clamp_min(1e-12)
    rest_q = (1 - log_q.exp().sum(-1)).clamp_min(1e-12)
    kl = (p * (logp - log_q)).sum(-1) + rest_p * (rest_p.log() - rest_q.log())
    return kl.sum(), int(mask.sum())


def nll(logits, ids, mask) -> tuple[float, int]:
    keep = mask[:, 1:] & mask[:, :-1]
    lp = torch.log_softmax(logits[:, :-1][keep].float(), -1)
    return float(-lp.gather(-1, ids[:, 1:][keep].unsqueeze(-1)).sum()), int(keep.sum())


# ---------------------------------------------------------------------------- the refinement


class Student:
    """The folded block's MLP output ``Y + H·Wᵀ`` and the pruned model's blocks after it."""

    def __init__(self, pruned, block: int, n_blocks: int):
        self.tail = Tail(pruned, list(range(block + 1, n_blocks)))
        self.head = pruned.lm_head

    def logits(self, weight, y, h) -> torch.Tensor:
        return self.head(self.tail.run(y + F.linear(h, weight)))


@torch.no_grad()
def set_aside_losses(
    student: Student, weight, sets: dict[str, Cached], bf16: bool
) -> dict[str, dict[str, float]]:
    """Per source: mean next-token loss and mean KL to the original (the teacher's logits in float32)."""
    result = {}
    for source, c in sets.items():
        total = count = kl_total = kl_count = 0
        for ids, mask, y, h, t in zip(c.ids, c.mask, c.y, c.h, c.teacher, strict=True):
            teacher = student.head(t)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = student.logits(weight, y, h)
            a, b = nll(logits, ids, mask)
            total, count = total + a, count + b
            k, n = kl_full(logits, teacher, mask)
            kl_total, kl_count = kl_total + float(k), kl_count + n
        result[source] = {"nll": total / count, "kl": kl_total / kl_count}
    return result


def mean_nll(losses: dict[str, dict[str, float]]) -> float:
    return sum(v["nll"] for v in losses.values()) / len(losses)


def mean_kl(losses: dict[str, dict[str, float]]) -> float:
    return sum(v["kl"] for v in losses.values()) / len(losses)


def down_projs(pruned, layers) -> dict[int, torch.nn.Parameter]:
    return {i: pruned.model.layers[i].mlp.down_proj.weight for i in layers}


def rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def refine(
    student: Student,
    pruned,
    block: int,
    start: dict[int, torch.Tensor],
    train: Cached,
    top: TopK,
    sets: dict[str, Cached],
    v: Variant,
    save: Path | None = None,
) -> dict:
    """Adam on the folded weight (and the ``down_proj`` of ``v.blocks`` blocks after it); the best weights by
    ``v.select`` on the set-aside text (saved to ``save`` as they improve). The model's weights are put back
    as they were before returning."""
    torch.manual_seed(v.seed)
    head = student.head
    weight = start[block].detach().clone().float().requires_grad_(True)
    tail = down_projs(pruned, range(block + 1, block + 1 + v.blocks))
    saved = {i: p.detach().clone() for i, p in tail.items()}
    for i, p in tail.items():
        p.data.copy_(start.get(i, saved[i]))
        p.requires_grad_(True)
    groups = [{"params": [weight], "lr": v.lr}]
    groups += [{"params": [p], "lr": v.lr * rms(p) / rms(weight)} for p in tail.values()]
    opt = torch.optim.Adam(groups)

    def current() -> dict[int, torch.Tensor]:
        return {block: weight.detach().clone()} | {i: p.detach().clone() for i, p in tail.items()}

    def score(losses) -> float:
        return mean_kl(losses) if v.select == "kl" else mean_nll(losses)

    def candidate(losses) -> bool:  # select=kl: no source further from the original than at the start
        return v.select != "kl" or all(losses[s]["kl"] <= first[s]["kl"] + 1e-6 for s in losses)

    n = len(train.ids)
    every = max(1, math.ceil(n / v.evals))
    began = time.perf_counter()
    try:
        first = set_aside_losses(student, weight, sets, bool(v.bf16))
        curve = [{"step": 0, "train_kl": None, "set_aside": first, "mean_nll": mean_nll(first), "s": 0.0}]
        best, best_score, best_step, bad = current(), score(first), 0, 0
        print(f"  step 0: set-aside {fmt(first)}", flush=True)
        step, running, seen = 0, 0.0, 0
        stop = False
        for epoch in range(v.epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(v.seed + epoch)).tolist()
            for b in order:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(v.bf16)):
                    logits = student.logits(weight, train.y[b], train.h[b])
                if v.topk:
                    total, count = kl_topk(
                        logits, train.mask[b], top.logp[b][:, : v.topk], top.index[b][:, : v.topk]
                    )
                else:
                    with torch.no_grad():
                        teacher = head(train.teacher[b])  # float32
                    total, count = kl_full(logits, teacher, train.mask[b])
                loss = total / count
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                running, seen = running + float(total.detach()), seen + count
                if step % every == 0 or step == n * v.epochs:
                    losses = set_aside_losses(student, weight, sets, bool(v.bf16))
                    elapsed = time.perf_counter() - began
                    curve.append(
                        {
                            "step": step,
                            "train_kl": running / seen,
                            "set_aside": losses,
                            "mean_nll": mean_nll(losses),
                            "mean_kl": mean_kl(losses),
                            "s": elapsed,
                        }
                    )
                    print(
                        f"  step {step} ({elapsed:.0f} s): train KL {running / seen:.4f}; {fmt(losses)}",
                        flush=True,
                    )
                    running = seen = 0
                    if candidate(losses) and score(losses) < best_score - 1e-5:
                        best, best_score, best_step, bad = current(), score(losses), step, 0
                        if save is not None:
                            torch.save({"weights": best, "step": step, "variant": asdict(v)}, save)
                    else:
                        bad += 1
                        if bad >= v.patience:
                            stop = True
                            break
                    if v.minutes and elapsed > 60 * v.minutes:
                        stop = True
                        break
            if stop:
                break
    finally:
        for i, p in tail.items():
            p.requires_grad_(False)
            p.data.copy_(saved[i])
    return {
        "weights": best,
        "best_step": best_step,
        f"best_mean_{v.select}": best_score,
        "steps": step,
        "steps_per_epoch": n,
        "curve": curve,
        "refine_s": round(time.perf_counter() - began, 1),
    }


def fmt(losses: dict[str, dict[str, float]]) -> str:
    parts = [f"{s} {v['nll']:.4f}/{v['kl']:.4f}" for s, v in losses.items()]
    return ", ".join(parts) + f" (mean NLL {mean_nll(losses):.4f}, KL {mean_kl(losses):.4f})"


# ---------------------------------------------------------------------------- held-out perplexity


@torch.no_grad()
def perplexities(
    original, pruned, windows: dict[str, torch.Tensor], block: int, cut, weights, baselines: bool = True
) -> dict:
    """Perplexity per source of the original and plain removal (``baselines``), and of the pruned model
    with each of ``weights`` (``down_proj`` weights by block) put in, in float32, 4 windows per batch."""
    L = original.config.num_hidden_layers
    orig_tail = Tail(original, list(range(block, L)))
    plain_tail = Tail(original, [i for i in range(block, L) if not cut[0] <= i < cut[1]])
    pruned_tail = Tail(pruned, list(range(block, pruned.config.num_hidden_layers)))
    layers = sorted({i for w in weights.values() for i in w})
    downs = down_projs(pruned, layers)
    saved = {i: p.detach().clone() for i, p in downs.items()}
    results: dict[str, dict[str, float]] = {}
    try:
        for source, w in windows.items():
            sums: dict[str, list[float]] = {}
            for chunk in w.split(4):
                x = prefix(original, chunk, block)
                runs = (
                    {"original": (orig_tail, original), "plain_removal": (plain_tail, original)}
                    if baselines
                    else {}
                )
                for name, (tail, model) in runs.items():
                    add(sums, name, nll_all(model.lm_head(tail.run(x)), chunk))
                for name, weight in weights.items():
                    for i, p in downs.items():
                        p.copy_(weight.get(i, saved[i]))
                    add(sums, name, nll_all(pruned.lm_head(pruned_tail.run(x)), chunk))
            results[source] = {k: math.exp(a / b) for k, (a, b) in sums.items()}
    finally:
        for i, p in downs.items():
            p.copy_(saved[i])
    return results


def nll_all(logits, ids) -> tuple[float, int]:
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return float(-lp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum()), ids[:, 1:].numel()


def add(sums, name, pair):
    a, b = sums.get(name, (0.0, 0))
    sums[name] = (a + pair[0], b + pair[1])


# ---------------------------------------------------------------------------- main


def _saved_weights(path: Path, block: int) -> dict[int, torch.Tensor]:
    data = torch.load(path)
    return data["weights"] if "weights" in data else {block: data["weight"]}


def load(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refine_kl", description=__doc__.split("\n")[0])
    parser.add_argument("prune_dir", type=Path, help="a prune's output folder (prune.json, hf/)")
    parser.add_argument(
        "--variants", default="lr=3e-3,epochs=2,evals=6", help="';'-separated variants (see above)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    parser.add_argument("--out", type=Path, default=Path("out/bench/refine-kl.json"))
    parser.add_argument(
        "--start",
        type=Path,
        help="continue from a weight an earlier run saved (*-best-N.pt; a fresh Adam state) instead of the "
        "closed form",
    )
    parser.add_argument(
        "--skip-baselines",
        action="store_true",
        help="do not measure the original and plain removal (the same float32 numbers every time)",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=Path("out/bench/refine-kl-cache"), help="teacher/student caches"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()

    record = json.loads((args.prune_dir / "prune.json").read_text())
    spec = record["model"]["spec"]
    (cut,) = [tuple(c["cut"]) for c in record["cuts"]]
    block = cut[0] - 1
    source = resolve(spec)
    tokenizer = load_tokenizer(source)
    original = load(_local_checkpoint(source))
    pruned = load(str(args.prune_dir / "hf"))
    L = original.config.num_hidden_layers
    for i in range(block + 1):  # the blocks before the fold are the original's
        a, b = original.model.layers[i].mlp.up_proj.weight, pruned.model.layers[i].mlp.up_proj.weight
        assert torch.equal(a, b), f"block {i} differs"
    teacher_layers = list(range(block, L))
    student = Student(pruned, block, pruned.config.num_hidden_layers)
    closed_form = pruned.model.layers[block].mlp.down_proj.weight.detach().clone()
    print(f"{spec}: cut {cut}, refining block {block}'s down_proj {tuple(closed_form.shape)}", flush=True)

    variants = [Variant.parse(t) for t in args.variants.split(";") if t.strip()]
    base = PruneOptions()
    set_aside_opts = PruneOptions(calib_samples=base.calib_samples)
    key = f"{source.slug}-cut{cut[0]}-{cut[1]}"
    sets, cache_set_aside_s = {}, 0.0
    for s, c in set_aside_by_source(tokenizer, set_aside_opts).items():
        path = args.cache_dir / f"{key}-set-aside-{s}-{c.token_hash}.pt"
        sets[s], secs = cached(path, lambda c=c: cache_batches(original, c.batches, block, teacher_layers))
        cache_set_aside_s += secs
    print(
        f"set-aside cached: {', '.join(f'{s} {c.tokens} tokens' for s, c in sets.items())} "
        f"({cache_set_aside_s:.0f} s)",
        flush=True,
    )

    caches: dict[int, tuple[Cached, TopK, float, dict]] = {}
    results = []
    weights: dict[str, dict[int, torch.Tensor]] = {"pruned": {block: closed_form}}
    for v in variants:
        if v.docs not in caches:
            calib = calibration_set(tokenizer, PruneOptions(calib_samples=v.docs))
            path = args.cache_dir / f"{key}-calibration-{calib.token_hash}.pt"
            built, secs = cached(
                path, lambda calib=calib: cache_batches(original, calib.batches, block, teacher_layers)
            )
            top, top_s = cached(
                path.with_name(path.stem + f"-top{TOP_K}.pt"),
                lambda b=built: teacher_topk(b, original.lm_head, TOP_K),
            )
            caches[v.docs] = (built, top, secs + top_s, calib.describe())
            print(
                f"calibration cached: {v.docs} documents, {calib.n_tokens} tokens "
                f"({caches[v.docs][2]:.0f} s)",
                flush=True,
            )
        train, top, cache_s, described = caches[v.docs]
        print(f"variant {v.name()}", flush=True)
        save = args.out.with_name(args.out.stem + f"-best-{len(results)}.pt")
        begin = {block: closed_form} if args.start is None else _saved_weights(args.start, block)
        out = refine(student, pruned, block, begin, train, top, sets, v, save)
        weights[v.name()] = out.pop("weights")
        results.append(
            {"variant": asdict(v), "name": v.name(), "calibration": described, "cache_s": round(cache_s, 1)}
            | out
        )

    t0 = time.perf_counter()
    windows = {
        s: heldout_windows(load_corpus(s), tokenizer, args.eval_tokens) for s in (BUILTIN, *OUT_OF_DOMAIN)
    }
    digest = hashlib.sha256(b"".join(w.numpy().tobytes() for w in windows.values())).hexdigest()[:16]
    known_path = args.cache_dir / f"{key}-perplexity-{digest}.json"
    known = json.loads(known_path.read_text()) if known_path.exists() else None
    todo = {k: w for k, w in weights.items() if known is None or k != "pruned"}
    baselines = known is None and not args.skip_baselines
    ppl = perplexities(original, pruned, windows, block, cut, todo, baselines=baselines)
    if known is None and args.skip_baselines:
        known = {s: {"original": None, "plain_removal": None} for s in ppl}
    elif known is None:
        known = {s: {k: p[k] for k in ("original", "plain_removal", "pruned")} for s, p in ppl.items()}
        write_json(known_path, known)
    ppl = {s: known[s] | ppl[s] for s in ppl}
    eval_s = time.perf_counter() - t0
    for r in results:
        r["perplexity"] = {s: p[r["name"]] for s, p in ppl.items()}
    names = ["original", "plain_removal", *weights]
    print(f"\nheld-out perplexity (float32, {args.eval_tokens} tokens per source)")
    print("| variant | " + " | ".join(ppl) + " | refine s |")
    for name in names:
        secs = next((r["refine_s"] for r in results if r["name"] == name), "")
        cells = [f"{ppl[s][name]:.2f}" if ppl[s][name] is not None else "-" for s in ppl]
        print(f"| {name} | " + " | ".join(cells) + f" | {secs} |")
    result = {
        "prune_dir": str(args.prune_dir),
        "model": spec,
        "cut": list(cut),
        "refined": f"model.layers.{block}.mlp.down_proj.weight",
        "started_from": "closed form" if args.start is None else str(args.start),
        "threads": args.threads,
        "load_average_at_start": os.getloadavg(),
        "set_aside_tokens": {s: c.tokens for s, c in sets.items()},
        "cache_set_aside_s": round(cache_set_aside_s, 1),
        "eval_tokens": args.eval_tokens,
        "perplexity": ppl,
        "variants": results,
        "eval_s": round(eval_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
