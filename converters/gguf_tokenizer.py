"""The tokenizer as llama.cpp reads it from GGUF (``tokenizer.ggml.*``), from an HF fast tokenizer.

Byte-level BPE tokenizers (Llama 3, Qwen 2/3, SmolLM, GPT-2 style) become ``model = "gpt2"``
with tokens, token types and merges. llama.cpp re-implements each family's pre-tokenizer
(the regex that splits text before BPE) under a name, ``tokenizer.ggml.pre``. The name is
chosen from the tokenizer's own pre-tokenizer definition in ``tokenizer.json`` — the split
regex and whether digits are split one by one — so a tokenizer is recognised by what it does,
not by its model's name:

  ===========================================  ==========================  ============
  pre-tokenizer in tokenizer.json              families                    ggml.pre
  ===========================================  ==========================  ============
  ByteLevel(use_regex) alone                   GPT-2 style                 gpt-2
  Digits(individual) + ByteLevel(use_regex)    SmolLM 1/2                  smollm
  Split(LLAMA3 regex: \\p{N}{1,3})              Llama 3.x                   llama-bpe
  Split(QWEN2 regex: \\p{N} single digits)      Qwen 2/2.5/3                qwen2
  Split(TEKKEN regex)                          Mistral Nemo / tekken       tekken
  ===========================================  ==========================  ============

SentencePiece-style BPE tokenizers (``Metaspace`` + byte fallback: Gemma, Mistral v0.x)
become ``model = "llama"`` with per-token scores: llama.cpp's SentencePiece tokenizer merges
the adjacent pair whose result has the highest score, so score = minus the rank of the BPE
merge that creates the token reproduces the HF merge order.

Special token ids, add_bos/add_eos (measured: does the HF tokenizer add them?) and the chat
template are written as well.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, Keys, TokenType

from rmexport.errors import ExportError
from rmexport.llamacpp import PRE_TOKENIZER_REGEXES
from rmexport.records import JsonObject

from .gguf_metadata import KV, Metadata

__all__ = ["pre_tokenizer_name", "tokenizer_metadata"]


@dataclass(frozen=True)
class _Step:
    kind: str  # "bytelevel-regex" | "digits" | "split" | "metaspace"
    pattern: str = ""


def _steps(pre_tokenizer: JsonObject | None) -> list[_Step]:
    """The pre-tokenizer reduced to the parts that decide how text is split."""
    if not pre_tokenizer:
        return []
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return [s for p in pre_tokenizer.get("pretokenizers", []) for s in _steps(p)]
    if kind == "ByteLevel":
        return [_Step("bytelevel-regex")] if pre_tokenizer.get("use_regex", True) else []
    if kind == "Digits":
        return [_Step("digits")] if pre_tokenizer.get("individual_digits") else [_Step("digits-grouped")]
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return [_Step("split", pattern.get("Regex", pattern.get("String", "")))]
    if kind == "Metaspace":
        return [_Step("metaspace")]
    return [_Step(str(kind))]


def pre_tokenizer_name(tokenizer_json: JsonObject) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; ExportError when it has none."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    if steps == [_Step("bytelevel-regex")]:
        return "gpt-2"
    if steps == [_Step("digits"), _Step("bytelevel-regex")]:
        return "smollm"
    if len(steps) == 1 and steps[0].kind == "split":
        for name, regex in PRE_TOKENIZER_REGEXES.items():
            if steps[0].pattern == regex:
                return name
    raise ExportError(
        f"llama.cpp has no pre-tokenizer known to match this tokenizer ({steps})",
        hint="supported: GPT-2, SmolLM, Llama 3, Qwen 2/3, tekken byte-level BPE and SentencePiece BPE",
    )


def _is_sentencepiece_bpe(tokenizer_json: JsonObject) -> bool:
    model = tokenizer_json.get("model", {})
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    normalizer = json.dumps(tokenizer_json.get("normalizer") or {}, ensure_ascii=False)
    uses_metaspace = _Step("metaspace") in steps or "\u2581" in normalizer
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and uses_metaspace


def _merges(tokenizer_json: JsonObject) -> list[str]:
    merges = tokenizer_json.get("model", {}).get("merges", [])
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _token_table(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[token].special else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _sentencepiece_scores(tokens: list[str], types: list[int], merges: list[str], unk: int | None):
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault("".join(merge.split(" ", 1)), r)
    scores = []
    for i, token in enumerate(tokens):
        if token in rank:
            scores.append(-float(rank[token]) - 1.0)
        else:
            scores.append(0.0 if len(token) == 1 else -1e9)
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[i] = int(TokenType.BYTE)
    if unk is not None and 0 <= unk < len(types):
        types[unk] = int(TokenType.UNKNOWN)
    return scores


def _adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the HF tokenizer adds BOS / EOS around plain text (measured, not read from flags)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and full[:1] == [tokenizer.bos_token_id] != plain[:1]
    add_eos = tokenizer.eos_token_id is not None and full[-1:] == [tokenizer.eos_token_id] != plain[-1:]
    return bool(add_bos), bool(add_eos)


def tokenizer_metadata(checkpoint: str | Path, vocab_size: int) -> Metadata:
    """``tokenizer.ggml.*`` and ``tokenizer.chat_template`` for the checkpoint's HF tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(
            "the GGUF writer needs a fast (tokenizer.json) tokenizer", hint="save it with transformers"
        )
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    if tokenizer_json.get("model", {}).get("type") != "BPE":
        raise ExportError(f"tokenizer model {tokenizer_json.get('model', {}).get('type')!r} is not BPE")
    vocab_size = max(vocab_size, len(tokenizer))
    tokens, types = _token_table(tokenizer, vocab_size)
    merges = _merges(tokenizer_json)
    meta: Metadata = {}
    if _is_sentencepiece_bpe(tokenizer_json):
        scores = _sentencepiece_scores(tokens, types, merges, tokenizer.unk_token_id)
        meta[Keys.Tokenizer.MODEL] = KV("llama", GGUFValueType.STRING)
        meta[Keys.Tokenizer.PRE] = KV("default", GGUFValueType.STRING)
        meta[Keys.Tokenizer.LIST] = KV(tokens, GGUFValueType.ARRAY, GGUFValueType.STRING)
        meta[Keys.Tokenizer.SCORES] = KV(scores, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        meta[Keys.Tokenizer.TOKEN_TYPE] = KV(types, GGUFValueType.ARRAY, GGUFValueType.INT32)
        meta[Keys.Tokenizer.ADD_PREFIX] = KV(_adds_prefix_space(tokenizer_json), GGUFValueType.BOOL)
    else:
        meta[Keys.Tokenizer.MODEL] = KV("gpt2", GGUFValueType.STRING)
        meta[Keys.Tokenizer.PRE] = KV(pre_tokenizer_name(tokenizer_json), GGUFValueType.STRING)
        meta[Keys.Tokenizer.LIST] = KV(tokens, GGUFValueType.ARRAY, GGUFValueType.STRING)
        meta[Keys.Tokenizer.TOKEN_TYPE] = KV(types, GGUFValueType.ARRAY, GGUFValueType.INT32)
        meta[Keys.Tokenizer.MERGES] = KV(merges, GGUFValueType.ARRAY, GGUFValueType.STRING)
    for key, token_id in (
        (Keys.Tokenizer.BOS_ID, tokenizer.bos_token_id),
        (Keys.Tokenizer.EOS_ID, tokenizer.eos_token_id),
        (Keys.Tokenizer.UNK_ID, tokenizer.unk_token_id),
        (Keys.Tokenizer.PAD_ID, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            meta[key] = KV(int(token_id), GGUFValueType.UINT32)
    add_bos, add_eos = _adds_special(tokenizer)
    meta[Keys.Tokenizer.ADD_BOS] = KV(add_bos, GGUFValueType.BOOL)
    meta[Keys.Tokenizer.ADD_EOS] = KV(add_eos, GGUFValueType.BOOL)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta[Keys.Tokenizer.CHAT_TEMPLATE] = KV(template, GGUFValueType.STRING)
    return meta


def _adds_prefix_space(tokenizer_json: JsonObject) -> bool:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    normalizer = json.dumps(tokenizer_json.get("normalizer") or {}, ensure_ascii=False)
    return '"Prepend"' in normalizer
