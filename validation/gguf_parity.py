"""llama.cpp vs PyTorch on held-out prompts: ``rmexport validate gguf GGUF_FILE --reference CKPT``.

For each held-out prompt (BOS + up to ``max_tokens - 1`` tokens from the HF tokenizer), both
backends compute logits at every position from the same token ids. PyTorch runs through the
block engine, so a reference bigger than memory streams from disk like a prune does. Reported:
top-1 agreement over all positions, max |Δlogit|, mean KL(PyTorch ‖ llama.cpp); greedy decoding
of ``new_tokens`` tokens from the first prompt (llama.cpp decodes; PyTorch's choice at every step
of that same sequence is compared, which up to the first difference is PyTorch's own greedy
decode); and whether llama.cpp's tokenizer splits sample text exactly as the HF tokenizer does.

Tolerances per GGUF type are in ``TOLERANCES`` with how they were set. Out of tolerance:
ToleranceError (exit 1) with the table; ``validate_gguf`` returns the same numbers as a dict.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmexport import llamacpp as llama_cpp_tools
from rmexport.errors import ConfigError, ToleranceError
from rmexport.log import get_logger, progress

__all__ = ["TOLERANCES", "Tolerance", "gguf_type_of", "validate_gguf"]

log = get_logger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """Limits one GGUF type must meet. ``None``: reported only."""

    min_top1_agreement: float | None
    max_mean_kl: float | None
    max_abs_diff: float | None
    min_decode_match: float | None  # fraction of the greedy tokens identical before the first miss


# Set from measurements (SmolLM2-135M pruned to 22 blocks, 4 prompts x 96 tokens, and tiny random
# models of every family), with headroom of ~5-10x on the measured error:
# - f32 (checked with an f32 KV cache; llama.cpp's default f16 cache alone gives max|Δ| ≈ 0.15 on
#   SmolLM2): both sides compute in float32 and differ only in summation order; measured max|Δ| ≈ 1e-3
#   on logits of magnitude ~20, KL ≈ 1e-9, top-1 and greedy decoding identical. Max |Δ| and KL are
#   the real gates; top-1 is allowed 2 % because random tiny models have near-ties (a tiny Gemma 3
#   measured 95/96 with KL 3e-9).
# - f16/bf16: weights rounded to 11/8 mantissa bits; measured on SmolLM2 f16 KL ≈ 2e-4 with
#   top-1 ≈ 0.99; bf16 (3 fewer bits) about 10x the KL. Greedy decoding may part after a near tie,
#   so it is reported, not required.
# - q8_0, q4_k_m: lossy by design; reported, with only a sanity floor on top-1 agreement that
#   catches a wrong tensor layout or metadata (which gives agreement near 0).
TOLERANCES: dict[str, Tolerance] = {
    "f32": Tolerance(min_top1_agreement=0.98, max_mean_kl=1e-5, max_abs_diff=2e-2, min_decode_match=1.0),
    "f16": Tolerance(min_top1_agreement=0.97, max_mean_kl=3e-3, max_abs_diff=None, min_decode_match=None),
    "bf16": Tolerance(min_top1_agreement=0.93, max_mean_kl=3e-2, max_abs_diff=None, min_decode_match=None),
    "q8_0": Tolerance(min_top1_agreement=0.5, max_mean_kl=None, max_abs_diff=None, min_decode_match=None),
    "q4_k_m": Tolerance(min_top1_agreement=0.3, max_mean_kl=None, max_abs_diff=None, min_decode_match=None),
}

# Text whose splitting differs between pre-tokenizers: digits, contractions, whitespace runs, unicode.
TOKENIZER_PROBES = (
    "Hello world! It's 2024; I'll pay $1,234.56 (or 3 333 3333) by 12/31.",
    "  leading spaces,\ttabs\tand\nnew\n\nlines   end  ",
    "I'VE been told he's there; we'd RE-check: don't, can't, won't.",
    "Café naïve — ünïcödé: 東京 🦙🚀 émojis ✅",
    "def f(x):\n    return x**2  # comment\n",
)


def gguf_type_of(path: str | Path) -> str:
    """Our type name (f32, f16, ...) from the file's ``general.file_type``."""
    import gguf

    from converters.gguf_export import GGUF_TYPES

    field = gguf.GGUFReader(str(path)).fields.get(gguf.Keys.General.FILE_TYPE)
    if field is None:
        return "unknown"
    file_type = int(field.contents())
    for name, t in GGUF_TYPES.items():
        if int(t.file_type) == file_type:
            return name
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        return f"file_type_{file_type}"


def _prompts(tokenizer: Any, n_prompts: int, max_tokens: int) -> list[list[int]]:
    from rmexport.calib.corpus import load_corpus

    corpus = load_corpus("builtin")
    bos = tokenizer.bos_token_id
    prompts = []
    for doc in corpus.heldout:
        text = doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < max_tokens // 2:
            continue
        body = ids[: max_tokens - (1 if bos is not None else 0)]
        prompts.append(([bos] if bos is not None else []) + body)
        if len(prompts) == n_prompts:
            break
    if not prompts:
        raise ConfigError(f"no held-out document has {max_tokens // 2} tokens")
    return prompts


def _kl(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) ‖ softmax(logits)) per row, in float64."""
    p = torch.log_softmax(torch.from_numpy(ref_logits).double(), -1)
    q = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()


def _llama_greedy(model: Any, ids: list[int], n_new: int) -> list[int]:
    model.reset()
    model.eval(list(ids))
    new = []
    for _ in range(n_new):
        new.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval([new[-1]])
    return new


def _matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _check(result: dict[str, Any], tol: Tolerance) -> list[str]:
    failures = []
    if tol.min_top1_agreement is not None and result["top1_agreement"] < tol.min_top1_agreement:
        failures.append(f"top-1 agreement {result['top1_agreement']:.4f} < {tol.min_top1_agreement}")
    if tol.max_mean_kl is not None and result["mean_kl"] > tol.max_mean_kl:
        failures.append(f"mean KL {result['mean_kl']:.3g} > {tol.max_mean_kl}")
    if tol.max_abs_diff is not None and result["max_abs_diff"] > tol.max_abs_diff:
        failures.append(f"max |Δ| {result['max_abs_diff']:.3g} > {tol.max_abs_diff}")
    if tol.min_decode_match is not None and result["decode_match"] < tol.min_decode_match:
        failures.append(f"greedy decode matched {result['decode_match']:.2f} < {tol.min_decode_match}")
    if result["tokenization_mismatches"]:
        failures.append(f"tokenization differs on {len(result['tokenization_mismatches'])} sample texts")
    return failures


def validate_gguf(
    gguf_file: str | Path,
    reference: str | Path,
    *,
    n_prompts: int = 4,
    max_tokens: int = 96,
    new_tokens: int = 32,
    n_threads: int = 2,
    gguf_type: str | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Compare llama.cpp running ``gguf_file`` with PyTorch running ``reference`` (HF dir)."""
    from transformers import AutoTokenizer

    from rmexport.calib.budget import MemoryBudget
    from rmexport.calib.engine import Engine, original_plan

    start = time.perf_counter()
    gguf_type = gguf_type or gguf_type_of(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(reference))
    prompts = _prompts(tokenizer, n_prompts, max_tokens)
    n_ctx = max(len(p) for p in prompts) + new_tokens + 8
    engine = Engine.open(reference, MemoryBudget.from_option(None))
    try:
        plan = original_plan(engine.n_layers)
        references = [r.numpy() for r in engine.logits(plan, prompts, desc="(1/3) PyTorch logits")]
        agree = positions = 0
        max_abs = 0.0
        kls: list[np.ndarray] = []
        f32_kv_cache = gguf_type == "f32"
        with llama_cpp_tools.open_model(
            gguf_file, n_ctx=n_ctx, n_threads=n_threads, logits_all=True, f32_kv_cache=f32_kv_cache
        ) as llm:
            for ids, ref in progress(
                list(zip(prompts, references, strict=True)), desc="(2/3) llama.cpp logits", total=len(prompts)
            ):
                got = llama_cpp_tools.eval_logits(llm, ids)
                if got.shape != ref.shape:
                    from rmexport.errors import ShapeMismatchError

                    raise ShapeMismatchError(f"llama.cpp logits {got.shape} vs PyTorch {ref.shape}")
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                positions += len(ids)
                max_abs = max(max_abs, float(np.abs(got - ref).max()))
                kls.append(_kl(ref, got))
            llama_new = _llama_greedy(llm, prompts[0], new_tokens)
            mismatches = []
            for text in TOKENIZER_PROBES:
                hf_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                llama_ids = llama_cpp_tools.tokenize(llm, text)
                if hf_ids != llama_ids:
                    mismatches.append({"text": text, "hf": hf_ids, "llama_cpp": llama_ids})
        decoded = prompts[0] + llama_new[:-1]
        forced = engine.logits(plan, [decoded], desc="(3/3) PyTorch along llama.cpp's decode")[0]
        torch_new = forced[len(prompts[0]) - 1 :].argmax(-1).tolist()
    finally:
        engine.close()
    matched = _matching_prefix(torch_new, llama_new)
    tol = TOLERANCES.get(gguf_type, Tolerance(None, None, None, None))
    result: dict[str, Any] = {
        "gguf_file": str(gguf_file),
        "reference": str(reference),
        "type": gguf_type,
        "prompts": len(prompts),
        "positions": positions,
        "top1_agreement": agree / positions,
        "max_abs_diff": max_abs,
        "mean_kl": float(np.concatenate(kls).mean()),
        "decode_new_tokens": new_tokens,
        "decode_matching_tokens": matched,
        "decode_match": matched / new_tokens,
        "decode_torch": torch_new,
        "decode_llama_cpp": llama_new,
        "tokenization_probes": len(TOKENIZER_PROBES),
        "tokenization_mismatches": mismatches,
        "tolerance": asdict(tol),
        "n_threads": n_threads,
        "kv_cache_type": "f32" if f32_kv_cache else "f16",
        "elapsed_s": time.perf_counter() - start,
    }
    failures = _check(result, tol)
    result["passed"] = not failures
    result["failures"] = failures
    log.info(
        "gguf parity %s: top1=%.4f max|Δ|=%.3g KL=%.3g decode %d/%d",
        gguf_type,
        result["top1_agreement"],
        max_abs,
        result["mean_kl"],
        matched,
        new_tokens,
    )
    if failures and check:
        raise ToleranceError(
            f"llama.cpp ({gguf_type}) disagrees with PyTorch:\n{format_table([result])}\n"
            + "; ".join(failures),
            hint="see the numbers above; a wrong layout shows as top-1 agreement near 0",
        )
    return result


def format_table(results: list[dict[str, Any]]) -> str:
    header = f"{'type':<8} {'top-1':>7} {'max|Δ|':>9} {'mean KL':>9} {'decode':>7} {'tokenizer':>9}  result"
    lines = [header, "-" * len(header)]
    for r in results:
        decode = f"{r['decode_matching_tokens']}/{r['decode_new_tokens']}"
        tok = f"{r['tokenization_probes'] - len(r['tokenization_mismatches'])}/{r['tokenization_probes']}"
        lines.append(
            f"{r['type']:<8} {r['top1_agreement']:>7.4f} {r['max_abs_diff']:>9.3g} {r['mean_kl']:>9.3g} "
            f"{decode:>7} {tok:>9}  {'ok' if r['passed'] else 'FAIL'}"
        )
    return "\n".join(lines)
