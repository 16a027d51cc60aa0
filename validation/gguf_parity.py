"""llama.cpp vs PyTorch on held-out prompts: ``rmexport validate gguf GGUF_FILE --reference CKPT``.

For each held-out prompt (BOS + up to ``max_tokens - 1`` tokens from the HF tokenizer), both
backends compute logits at every position from the same token ids. PyTorch runs through the
block engine, so a reference bigger than memory streams from disk like a prune does. Reported:
top-1 agreement over all positions, max |Δlogit|, mean KL(PyTorch ‖ llama.cpp); greedy decoding
of ``new_tokens`` tokens from the first prompt (llama.cpp decodes; PyTorch's choice at every step
of that same sequence is compared, which up to the first difference is PyTorch's own greedy
decode); and whether llama.cpp's tokenizer splits sample text exactly as the HF tokenizer does.

Tolerances per GGUF type are in ``TOLERANCES`` with how they were set. Out of tolerance:
ToleranceError (exit 1) with the table; ``compare_gguf`` returns the same numbers as a ``GGUFParity``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from converters.gguf_export import GGUF_TYPES
from rmexport import llamacpp as llama_cpp_tools
from rmexport.errors import ShapeMismatchError, ToleranceError
from rmexport.fileio import open_gguf
from rmexport.log import get_logger, progress
from rmexport.records import JsonObject, from_jsonable

from . import parity
from .parity import Tolerance

__all__ = [
    "EXACT_TYPES",
    "SOURCE_KL_MULTIPLE",
    "SOURCE_TOP1_MARGIN",
    "TOLERANCES",
    "GGUFParity",
    "SourceError",
    "TokenizationMismatch",
    "Tolerance",
    "compare_gguf",
    "format_table",
    "gguf_type_of",
    "print_table",
    "source_relative_tolerance",
]

log = get_logger(__name__)


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
    "f16": Tolerance(min_top1_agreement=0.97, max_mean_kl=3e-3),
    "bf16": Tolerance(min_top1_agreement=0.93, max_mean_kl=3e-2),
    "q8_0": Tolerance(min_top1_agreement=0.5),
    "q4_k_m": Tolerance(min_top1_agreement=0.3),
}

# Types whose error is rounding only, judged by the absolute limits above.
EXACT_TYPES = ("f32", "f16", "bf16")
# Lossy types are judged against the source's own quantization error: the original model's GGUF of
# the same type against the original in PyTorch, on the same prompts (for a GGUF source, the
# source file itself). The pruned file passes when its KL to the pruned PyTorch model is at most
# SOURCE_KL_MULTIPLE times that, and its top-1 agreement at most SOURCE_TOP1_MARGIN below it.
# Measured (pruned file / source file, 4 prompts x 96 tokens, ~370 positions): tiny llama and qwen2 Q8_0 and
# Q4_K_M, KL 0.96-1.41x, top-1 0.010 lower to 0.047 higher; SmolLM2-135M Q4_1, GGUF-native with the folded
# ffn_down in Q8_0, KL 0.0070 vs 0.0043 (1.6x), top-1 0.942 vs 0.984 (0.042 lower) after a 64-sample prune;
# after `rmexport run`'s prune 0.0054 (1.26x), 0.961. Broken files: two ffn_down swapped, KL 35-2200x, top-1
# below 0.1; one Q8_0 tensor's scales x1.5, 45x (x1.25: 12x); SmolLM2's fold requantized to Q4_1, 50x and
# 0.28 lower, to Q6_K 4.9x. 3x is about twice the worst real ratio and below every broken one. Top-1 over
# ~370 positions has a standard error of ~0.01 per file, so the margin is 0.10: over twice the worst real
# drop, and a tenth of a swap's. KL is the finer gate; top-1 catches a wholly wrong tensor. Where the source
# itself disagrees more often than the margin (a random tiny model's flat distributions: 0.79), the margin is
# that disagreement: the pruned file may disagree twice as often. Tiny llama, Q4_K_M, with its fitted map
# kept: top-1 0.646 against the source's 0.792, KL 1.4x; swapped tensors stay below 0.1.
SOURCE_KL_MULTIPLE = 3.0
SOURCE_TOP1_MARGIN = 0.10
# Below this KL a lossy file is as good as exact: a near-lossless source does not make noise fail.
SOURCE_KL_FLOOR = 1e-4


@dataclass(frozen=True)
class TokenizationMismatch:
    """A sample text the two tokenizers split differently."""

    text: str
    hf: list[int]
    llama_cpp: list[int]


@dataclass(frozen=True)
class SourceError:
    """The original model's GGUF of a type against the original in PyTorch: the error a pruned file of
    that type is judged against."""

    gguf_file: str
    top1_agreement: float
    mean_kl: float
    max_abs_diff: float

    @classmethod
    def of(cls, result: GGUFParity) -> SourceError:
        """From the original's ``compare_gguf`` record."""
        return cls(**{f.name: getattr(result, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class GGUFParity:
    """``compare_gguf``'s result; ``to_json()`` is one type's entry of ``checks/gguf_parity.json``."""

    gguf_file: str
    reference: str
    type: str
    prompts: int
    positions: int
    top1_agreement: float
    max_abs_diff: float
    mean_kl: float
    decode_new_tokens: int
    decode_matching_tokens: int  # identical before the first miss
    decode_match: float
    decode_torch: list[int]
    decode_llama_cpp: list[int]
    tokenization_probes: int
    tokenization_mismatches: list[TokenizationMismatch]
    tolerance: Tolerance
    tolerance_basis: str  # "absolute", or "source's own error"
    source_error: SourceError | None  # what the tolerance was derived from, when relative
    n_threads: int
    kv_cache_type: str
    elapsed_s: float
    passed: bool
    failures: list[str]  # messages

    def measured(self) -> parity.Measured:
        return parity.Measured(
            max_abs_diff=self.max_abs_diff,
            top1_agreement=self.top1_agreement,
            positions=self.positions,
            decode_match=self.decode_match,
            decode_tokens=self.decode_new_tokens,
            mean_kl=self.mean_kl,
            decode_matching_tokens=self.decode_matching_tokens,
            tokenization_probes=self.tokenization_probes,
            tokenization_mismatches=len(self.tokenization_mismatches),
        )

    def to_json(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> GGUFParity:
        return from_jsonable(cls, data)


def source_relative_tolerance(gguf_type: str, source_error: SourceError) -> Tolerance:
    """The tolerance of a lossy ``gguf_type`` given the source's own error; the absolute sanity floor
    of ``TOLERANCES`` still applies."""
    floor = TOLERANCES.get(gguf_type, Tolerance())
    top1 = source_error.top1_agreement - max(SOURCE_TOP1_MARGIN, 1.0 - source_error.top1_agreement)
    return replace(
        floor,
        max_mean_kl=max(SOURCE_KL_MULTIPLE * source_error.mean_kl, SOURCE_KL_FLOOR),
        min_top1_agreement=max(top1, floor.min_top1_agreement or 0.0),
    )


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
    file_type = open_gguf(path).metadata.get(gguf.Keys.General.FILE_TYPE)
    if file_type is None:
        return "unknown"
    for name, t in GGUF_TYPES.items():
        if int(t.file_type) == file_type:
            return name
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        return f"file_type_{file_type}"


def _llama_greedy(model: Any, ids: list[int], n_new: int) -> list[int]:
    model.reset()
    model.eval(list(ids))
    new = []
    for _ in range(n_new):
        new.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval([new[-1]])
    return new


def compare_gguf(
    gguf_file: str | Path,
    reference: str | Path,
    *,
    n_prompts: int = 4,
    max_tokens: int = 96,
    new_tokens: int = 32,
    n_threads: int = 2,
    gguf_type: str | None = None,
    check: bool = True,
    source_error: GGUFParity | None = None,
) -> GGUFParity:
    """Compare llama.cpp running ``gguf_file`` with PyTorch running ``reference`` (HF dir).

    ``source_error``: the same comparison of the original model's GGUF of this type with the
    original model; a lossy type is then held to ``source_relative_tolerance``."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    gguf_type = gguf_type or gguf_type_of(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(reference))
    prompts = parity.heldout_prompts(
        tokenizer, n_prompts, max_tokens, min_tokens=max_tokens // 2, need_all=False
    )
    n_ctx = max(len(p) for p in prompts) + new_tokens + 8
    f32_kv_cache = gguf_type == "f32"
    with parity.EngineReference.open(reference) as torch_ref:
        references = torch_ref.logits(prompts, desc="(1/3) PyTorch logits")
        per_prompt = []
        with llama_cpp_tools.open_model(
            gguf_file, n_ctx=n_ctx, n_threads=n_threads, logits_all=True, f32_kv_cache=f32_kv_cache
        ) as llm:
            for ids, ref in progress(
                list(zip(prompts, references, strict=True)), desc="(2/3) llama.cpp logits", total=len(prompts)
            ):
                got = llama_cpp_tools.eval_logits(llm, ids)
                if got.shape != ref.shape:
                    raise ShapeMismatchError(f"llama.cpp logits {got.shape} vs PyTorch {ref.shape}")
                per_prompt.append(parity.compare_logits(ref, got, kl=True))
            llama_new = _llama_greedy(llm, prompts[0], new_tokens)
            mismatches = []
            for text in TOKENIZER_PROBES:
                hf_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                llama_ids = llama_cpp_tools.tokenize(llm, text)
                if hf_ids != llama_ids:
                    mismatches.append(TokenizationMismatch(text, hf_ids, llama_ids))
        torch_new = torch_ref.choices_along(
            prompts[0], llama_new, desc="(3/3) PyTorch along llama.cpp's decode"
        )
    matched = parity.matching_prefix(torch_new, llama_new)
    summary = parity.summarize(per_prompt)
    relative = source_error is not None and gguf_type not in EXACT_TYPES
    source = SourceError.of(source_error) if relative else None
    tol = (
        TOLERANCES.get(gguf_type, Tolerance())
        if source is None
        else source_relative_tolerance(gguf_type, source)
    )
    unchecked = GGUFParity(
        gguf_file=str(gguf_file),
        reference=str(reference),
        type=gguf_type,
        prompts=len(prompts),
        positions=summary.positions,
        top1_agreement=summary.top1_agreement,
        max_abs_diff=summary.max_abs_diff,
        mean_kl=summary.mean_kl,
        decode_new_tokens=new_tokens,
        decode_matching_tokens=matched,
        decode_match=matched / new_tokens,
        decode_torch=torch_new,
        decode_llama_cpp=llama_new,
        tokenization_probes=len(TOKENIZER_PROBES),
        tokenization_mismatches=mismatches,
        tolerance=tol,
        tolerance_basis="absolute" if source is None else "source's own error",
        source_error=source,
        n_threads=n_threads,
        kv_cache_type="f32" if f32_kv_cache else "f16",
        elapsed_s=time.perf_counter() - start,
        passed=True,
        failures=[],
    )
    failures = list(parity.check(unchecked.measured(), tol).values())
    if mismatches:
        failures.append(f"tokenization differs on {len(mismatches)} sample texts")
    result = replace(unchecked, passed=not failures, failures=failures)
    log.info(
        "gguf parity %s: top1=%.4f max|Δ|=%.3g KL=%.3g decode %d/%d",
        gguf_type,
        result.top1_agreement,
        result.max_abs_diff,
        result.mean_kl,
        matched,
        new_tokens,
    )
    if failures and check:
        raise ToleranceError(
            f"llama.cpp ({gguf_type}) disagrees with PyTorch:\n{format_table(result)}\n"
            + "; ".join(failures),
            hint="see the numbers above; a wrong layout shows as top-1 agreement near 0",
        )
    return result


def format_table(r: GGUFParity) -> str:
    """The result as a plain-text table (also used in the ToleranceError message)."""
    return parity.format_table(
        r.measured(), r.tolerance, f"gguf parity [{r.type}]: {r.gguf_file} vs {r.reference}"
    )


def print_table(r: GGUFParity) -> None:
    parity.print_table(r.measured(), r.tolerance, f"GGUF parity [{r.type}]  {r.gguf_file}")
