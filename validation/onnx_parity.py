"""onnxruntime vs PyTorch on held-out prompts: prefill logits and greedy decoding via the KV cache.

The ONNX graph runs in a plain ``onnxruntime.InferenceSession`` fed by hand
(validation/ort_decoder.py); the reference is the checkpoint in PyTorch, float32, decoding with
transformers' own KV cache. Prompts are the first held-out documents of the builtin corpus
(never calibration text), tokenized, BOS-prefixed and truncated.

Checks, per precision (tolerances below):
- prefill: max |Δlogit| over every position and vocabulary entry; top-1 agreement over every
  position. A top-1 disagreement counts against the export only where the reference's top-1
  beats its runner-up by more than twice the logit tolerance (otherwise it is a tie the
  tolerance allows either way).
- decode: ``new_tokens`` greedy tokens through the cache must be identical for fp32/fp16; a
  divergence is allowed only at such a near-tie, and is reported.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rmexport.errors import ConfigError, ShapeMismatchError, ToleranceError

__all__ = ["TOLERANCES", "Tolerance", "heldout_prompts", "validate_onnx"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    max_abs_diff: float | None  # None: not checked (quantized weights change logits by design)
    min_top1_agreement: float
    exact_decode: bool


# Where these come from (measured 2026-11-29: onnxruntime 1.32 CPU EP vs torch 2.13 CPU, 4 held-out
# prompts of up to 96 tokens = 269 positions, 32 greedy tokens each):
# - fp32, SmolLM2-135M with 8 blocks removed (22 blocks; logits span about +-30): prefill max |Δlogit|
#   4.1e-4 (optimum flavor) and 5.0e-4 (genai flavor), decode max 2.2e-4, all tokens identical.
#   Tiny random models of every family: <= 2.4e-6. Tolerance 5e-3 = 10x the largest measured value,
#   still far below what a wrong graph produces (the genai Gemma 2 graph with a misplaced sliding
#   window, measured: 0.83, top-1 agreement 0.30).
# - fp16 (optimum, CPU EP), same model: max |Δlogit| 0.103, top-1 agreement 1.0 -> 0.5 (about 5x);
#   greedy tokens may legitimately differ after a near-tie, so decode is not required to match.
# - int4 (genai, MatMulNBits block 32, symmetric RTN): logits move by ~2 on average by design, so only
#   top-1 agreement is checked. Measured on SmolLM2-135M: 0.66 for the original 30 blocks, 0.23-0.32
#   for the 22-block plain cut. 0.5 = "agrees on at least half the next-token choices"; below that
#   the int4 file is not the same model, and the check says so.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_diff=5e-3, min_top1_agreement=0.99, exact_decode=True),
    "fp16": Tolerance(max_abs_diff=0.5, min_top1_agreement=0.95, exact_decode=False),
    "int4": Tolerance(max_abs_diff=None, min_top1_agreement=0.5, exact_decode=False),
}
DEFAULT_PROMPTS = 4
DEFAULT_PROMPT_TOKENS = 96
DEFAULT_NEW_TOKENS = 32
_MIN_PROMPT_TOKENS = 8


def heldout_prompts(tokenizer: Any, n_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """The first ``n_prompts`` held-out documents, as BOS + up to ``prompt_tokens - 1`` tokens."""
    from rmexport.calib.corpus import load_corpus

    if n_prompts < 1 or prompt_tokens < _MIN_PROMPT_TOKENS:
        raise ConfigError(f"need --prompts >= 1 and --prompt-tokens >= {_MIN_PROMPT_TOKENS}")
    bos = tokenizer.bos_token_id
    prompts = []
    for doc in load_corpus("builtin").heldout:
        text = doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        body = ids[: prompt_tokens - (bos is not None)]
        if len(body) < _MIN_PROMPT_TOKENS:
            continue
        prompts.append(([bos] if bos is not None else []) + body)
        if len(prompts) == n_prompts:
            return prompts
    raise ConfigError(
        f"the held-out text has only {len(prompts)} documents of >= {_MIN_PROMPT_TOKENS} tokens"
    )


def _torch_greedy(
    model: Any, prompt: list[int], new_tokens: int
) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """Prefill logits ``[T, V]``, then ``new_tokens`` greedy tokens through transformers' cache."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        prefill = out.logits[0].float().numpy()
        past, logits = out.past_key_values, out.logits[0, -1].float()
        tokens, step_logits = [], []
        for step in range(new_tokens):
            token = int(logits.argmax())
            tokens.append(token)
            step_logits.append(logits.numpy())
            if step == new_tokens - 1:
                break
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1].float()
    return prefill, tokens, step_logits


def _margin(logits: np.ndarray) -> np.ndarray:
    """top-1 minus top-2 logit along the last axis."""
    top2 = np.partition(logits, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def _precision_of(onnx_dir: Path, decoder: Any) -> str:
    from converters.onnx_export import read_export_info

    precision = read_export_info(onnx_dir).get("precision")
    if precision:
        return precision
    return "fp16" if decoder.kv_dtype == np.float16 else "fp32"


def _compare_prompt(
    ort_decoder: Any, model: Any, prompt: list[int], new_tokens: int, tie_margin: float
) -> dict[str, Any]:
    ref_prefill, ref_tokens, ref_steps = _torch_greedy(model, prompt, new_tokens)
    ort_prefill = ort_decoder.forward(np.array([prompt]))[0]
    diff = np.abs(ort_prefill - ref_prefill)
    agree = ort_prefill.argmax(-1) == ref_prefill.argmax(-1)
    decisive = _margin(ref_prefill) > tie_margin
    ort_tokens, ort_steps = ort_decoder.greedy(prompt, new_tokens, keep_logits=True)
    diverged = next((i for i, (a, b) in enumerate(zip(ref_tokens, ort_tokens, strict=True)) if a != b), None)
    same_steps = len(ref_tokens) if diverged is None else diverged + 1
    step_diff = max(float(np.abs(ort_steps[i] - ref_steps[i]).max()) for i in range(same_steps))
    near_tie = diverged is not None and float(_margin(ref_steps[diverged])) <= tie_margin
    return {
        "prompt_tokens": len(prompt),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agree": int(agree.sum()),
        "positions": int(agree.size),
        "decisive_disagreements": int((~agree & decisive).sum()),
        "decode_identical": diverged is None,
        "decode_first_divergence": diverged,
        "decode_divergence_near_tie": near_tie,
        "decode_max_abs_diff": step_diff,
        "reference_tokens": ref_tokens,
        "onnx_tokens": ort_tokens,
    }


def _summarize(per_prompt: list[dict[str, Any]], tol: Tolerance) -> dict[str, Any]:
    positions = sum(p["positions"] for p in per_prompt)
    summary = {
        "max_abs_diff": max(p["max_abs_diff"] for p in per_prompt),
        "mean_abs_diff": float(np.mean([p["mean_abs_diff"] for p in per_prompt])),
        "top1_agreement": sum(p["top1_agree"] for p in per_prompt) / positions,
        "top1_decisive_disagreements": sum(p["decisive_disagreements"] for p in per_prompt),
        "decode_match": sum(p["decode_identical"] for p in per_prompt) / len(per_prompt),
        "decode_max_abs_diff": max(p["decode_max_abs_diff"] for p in per_prompt),
        "positions": positions,
    }
    failures = []
    if tol.max_abs_diff is not None:
        if summary["max_abs_diff"] > tol.max_abs_diff:
            failures.append("max_abs_diff")
        if summary["top1_decisive_disagreements"]:
            failures.append("top1_decisive_disagreements")
        if summary["decode_max_abs_diff"] > tol.max_abs_diff:
            failures.append("decode_max_abs_diff")
    if summary["top1_agreement"] < tol.min_top1_agreement:
        failures.append("top1_agreement")
    if tol.exact_decode and any(
        not p["decode_identical"] and not p["decode_divergence_near_tie"] for p in per_prompt
    ):
        failures.append("decode_match")
    summary["failures"] = failures
    summary["passed"] = not failures
    return summary


def _rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    tol = result["tolerance"]
    bad = set(result["failures"])

    def ok(name: str, checked: bool = True) -> str:
        return "-" if not checked else ("FAIL" if name in bad else "ok")

    atol = tol["max_abs_diff"]
    atol_text = "not checked" if atol is None else f"<= {atol:.1e}"
    return [
        (
            "prefill max |Δlogit|",
            f"{result['max_abs_diff']:.3e}",
            atol_text,
            ok("max_abs_diff", atol is not None),
        ),
        ("prefill mean |Δlogit|", f"{result['mean_abs_diff']:.3e}", "", ""),
        (
            "prefill top-1 agreement",
            f"{result['top1_agreement']:.4f} ({result['positions']} positions)",
            f">= {tol['min_top1_agreement']}",
            ok("top1_agreement"),
        ),
        (
            "top-1 disagreements, not ties",
            str(result["top1_decisive_disagreements"]),
            "0" if atol is not None else "not checked",
            ok("top1_decisive_disagreements", atol is not None),
        ),
        (
            f"decode {result['new_tokens']} tokens identical",
            f"{result['decode_match']:.2f} of prompts",
            "all (ties excepted)" if tol["exact_decode"] else "not checked",
            ok("decode_match", tol["exact_decode"]),
        ),
        (
            "decode max |Δlogit|",
            f"{result['decode_max_abs_diff']:.3e}",
            atol_text,
            ok("decode_max_abs_diff", atol is not None),
        ),
    ]


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table (also used in the ToleranceError message)."""
    header = ("check", "value", "tolerance", "")
    rows = [header, *_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    title = f"onnx parity [{result['flavor']}, {result['precision']}]"
    lines = [f"{title}: {result['onnx_dir']} vs {result['reference']}"]
    for r in rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())
    return "\n".join(lines)


def validate_onnx(
    onnx_dir: str | Path,
    reference_ckpt: str | Path,
    *,
    n_prompts: int = DEFAULT_PROMPTS,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    raise_on_failure: bool = True,
) -> dict[str, Any]:
    """Compare the ONNX export in ``onnx_dir`` with ``reference_ckpt`` in PyTorch (fp32).

    Returns a JSON-able dict; raises ToleranceError (after computing everything) when a check
    fails and ``raise_on_failure``.
    """
    import torch

    from converters.onnx_export import read_export_info
    from rmexport.models import load_model, load_tokenizer, resolve

    from .ort_decoder import OrtDecoder

    if new_tokens < 1:
        raise ConfigError("--new-tokens must be >= 1")
    onnx_dir = Path(onnx_dir)
    decoder = OrtDecoder(onnx_dir, spinning=False)
    source = resolve(str(reference_ckpt))
    model = load_model(source, dtype=torch.float32)
    if int(model.config.num_hidden_layers) != decoder.num_layers:
        raise ShapeMismatchError(
            f"the ONNX graph has {decoder.num_layers} blocks, the reference {model.config.num_hidden_layers}",
            hint="validate against the checkpoint the export was made from",
        )
    tokenizer = load_tokenizer(source)
    precision = _precision_of(onnx_dir, decoder)
    tol = TOLERANCES[precision]
    tie_margin = 2 * (tol.max_abs_diff or 0.0)
    prompts = heldout_prompts(tokenizer, n_prompts, prompt_tokens)
    per_prompt = [_compare_prompt(decoder, model, p, new_tokens, tie_margin) for p in prompts]
    result = {
        "onnx_dir": str(onnx_dir),
        "reference": str(reference_ckpt),
        "flavor": read_export_info(onnx_dir).get("flavor", "unknown"),
        "precision": precision,
        "providers": decoder.session.get_providers(),
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "tolerance": asdict(tol),
        **_summarize(per_prompt, tol),
        "per_prompt": per_prompt,
    }
    log.info(
        "onnx parity: max|Δ|=%.2e top1=%.4f decode_match=%.2f -> %s",
        result["max_abs_diff"],
        result["top1_agreement"],
        result["decode_match"],
        "ok" if result["passed"] else "FAIL " + ",".join(result["failures"]),
    )
    if raise_on_failure and not result["passed"]:
        raise ToleranceError(
            "ONNX export out of tolerance: " + ", ".join(result["failures"]) + "\n" + format_table(result),
            hint="see the table; re-export, or compare against the checkpoint the export came from",
        )
    return result


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    title = f"ONNX parity [{result['flavor']}, {result['precision']}]  {result['onnx_dir']}"
    table = Table(title=escape(title))
    for column in ("check", "value", "tolerance", ""):
        table.add_column(column)
    for row in _rows(result):
        style = "red" if row[3] == "FAIL" else None
        table.add_row(*row, style=style)
    Console().print(table)
