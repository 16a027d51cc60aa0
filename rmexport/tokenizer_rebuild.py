"""An HF fast tokenizer built from a GGUF file's own vocabulary, the way llama.cpp reads it.

transformers rebuilds a tokenizer from ``tokenizer.ggml.*`` too, but not always as llama.cpp
does (Gemma's SentencePiece vocabulary is the known case). This module builds one from the
same fields with llama.cpp's rules, for the two tokenizer models that decoder LLMs use:

- ``llama`` (SentencePiece style, with scores): spaces become ``▁`` (and a ``▁`` is prepended
  to every piece of text when ``add_space_prefix``), then adjacent symbols are merged, the
  pair whose result has the highest score first; characters left outside the vocabulary fall
  back to ``<0xXX>`` byte tokens. That is a BPE whose merge list is every split of every token
  into two tokens, ordered by the score of the result.
- ``gpt2`` (byte-level BPE): tokens and merges as they are, and the pre-tokenizer that llama.cpp
  uses for ``tokenizer.ggml.pre`` (only the families whose split rules tokenizers can express
  exactly are known here; ``rebuild_tokenizer`` says so for the others).

User-defined tokens are matched in raw text before anything else (as llama.cpp always does),
control tokens become special tokens, and BOS/EOS/pad, what is added around a text and the chat
template are taken from llama.cpp's reading of the file (``LlamaCppVocab``), so the result
agrees with it by construction wherever tokenizers can express the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .errors import ModelLoadError
from .fileio import open_gguf
from .llamacpp import PRE_TOKENIZER_REGEXES

__all__ = ["GGUFVocab", "SpecialTokens", "read_gguf_vocab", "rebuild_tokenizer"]

# gguf TokenType values (gguf.TokenType), as the file stores them.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

_SPACE = "\u2581"

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) grouped by the split rule they select,
# and whether llama.cpp then takes a whole pre-token that is itself a token without merging.
_GPT2_NAMES = ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4")
_DIGITS_GPT2_NAMES = ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b")
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
_LLAMA3_REGEX_NAMES = ("dbrx", "smaug-bpe", "glm4", "chatglm-bpe")
_QWEN2_NAMES = ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo", "grok-2")


@dataclass(frozen=True)
class _PreRule:
    kind: str  # "bytelevel" | "digits+bytelevel" | "split" (a regex from gguf_tokenizer's table)
    regex_name: str = ""
    ignore_merges: bool = False


def _pre_rules() -> dict[str, _PreRule]:
    rules: dict[str, _PreRule] = {}
    rules.update({n: _PreRule("bytelevel") for n in _GPT2_NAMES})
    rules.update({n: _PreRule("digits+bytelevel") for n in _DIGITS_GPT2_NAMES})
    rules.update({n: _PreRule("split", "llama-bpe", ignore_merges=True) for n in _LLAMA3_NAMES})
    rules.update({n: _PreRule("split", "llama-bpe") for n in _LLAMA3_REGEX_NAMES})
    rules.update({n: _PreRule("split", "qwen2") for n in _QWEN2_NAMES})
    rules["tekken"] = _PreRule("split", "tekken", ignore_merges=True)
    return rules


_PRE_RULES = _pre_rules()


@dataclass(frozen=True)
class GGUFVocab:
    """The ``tokenizer.ggml.*`` fields that decide how text becomes ids."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float]
    merges: list[str]
    add_space_prefix: bool


@dataclass(frozen=True)
class SpecialTokens:
    """llama.cpp's special ids (None where it has none), what it adds around a text, the template."""

    bos: int | None
    eos: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def read_gguf_vocab(gguf_path: str | Path) -> GGUFVocab:
    """The tokenizer fields of a GGUF file (ModelLoadError when it has no vocabulary)."""
    metadata = open_gguf(gguf_path, strings=True).metadata

    def value(key: str, default: Any = None) -> Any:
        found = metadata.get(f"tokenizer.ggml.{key}")
        return default if found is None else found

    model = value("model")
    tokens = value("tokens")
    if not model or not tokens:
        raise ModelLoadError(
            f"{Path(gguf_path).name} has no tokenizer (tokenizer.ggml.model / tokens missing)",
            hint="use a GGUF converted with its tokenizer, or the model's original HF checkpoint",
        )
    n = len(tokens)
    add_prefix = value("add_space_prefix")
    return GGUFVocab(
        model=str(model),
        pre=str(value("pre", "") or ""),
        tokens=list(tokens),
        token_types=[int(t) for t in value("token_type", [1] * n)],
        scores=[float(s) for s in value("scores", [0.0] * n)],
        merges=list(value("merges", [])),
        # llama.cpp prepends a space for SentencePiece vocabularies unless the file says not to.
        add_space_prefix=(model == "llama") if add_prefix is None else bool(add_prefix),
    )


def _unsupported(vocab: GGUFVocab, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"can not rebuild the tokenizer from the GGUF vocabulary: {what}",
        hint="use the model's original Hugging Face checkpoint (a directory or hub id) instead of the GGUF",
    )


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, the highest-scoring result first."""
    index = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for i, token in enumerate(tokens):
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in index and right in index:
                candidates.append((-scores[i], i, k, left, right))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _bpe_merges(merges: list[str], index: dict[str, int]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if cut < 0:
            continue
        left, right = merge[:cut], merge[cut + 1 :]
        if left in index and right in index and left + right in index:
            pairs.append((left, right))
    return pairs


def _spm_tokenizer(vocab: GGUFVocab) -> Any:
    index = {t: i for i, t in enumerate(vocab.tokens)}
    if not any(t.startswith("<0x") for t in vocab.tokens):
        raise _unsupported(vocab, "a SentencePiece vocabulary without <0xXX> byte tokens")
    unk = next(
        (t for t, kind in zip(vocab.tokens, vocab.token_types, strict=False) if kind == _UNKNOWN), None
    )
    tok = Tokenizer(
        models.BPE(
            vocab=index,
            merges=_spm_merges(vocab.tokens, vocab.scores),
            unk_token=unk,
            byte_fallback=True,
            fuse_unk=False,
        )
    )
    steps = [normalizers.Replace(" ", _SPACE)]
    if vocab.add_space_prefix:
        steps.insert(0, normalizers.Prepend(_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    decode = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    return tok


def _gpt2_tokenizer(vocab: GGUFVocab) -> Any:
    rule = _PRE_RULES.get(vocab.pre)
    if rule is None:
        raise _unsupported(
            vocab, f"no split rule known here for llama.cpp's pre-tokenizer {vocab.pre or '(none)'!r}"
        )
    index = {t: i for i, t in enumerate(vocab.tokens)}
    tok = Tokenizer(
        models.BPE(vocab=index, merges=_bpe_merges(vocab.merges, index), ignore_merges=rule.ignore_merges)
    )
    if rule.kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif rule.kind == "digits+bytelevel":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEXES[rule.regex_name]), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_marked_tokens(tok: Any, vocab: GGUFVocab) -> None:
    """Control and unknown tokens become special tokens; user-defined ones are matched in raw text."""
    added = []
    for token, kind in zip(vocab.tokens, vocab.token_types, strict=False):
        if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED):
            added.append(AddedToken(token, special=kind != _USER_DEFINED, normalized=False))
    tok.add_tokens(added)


def _post_processor(tok: Any, vocab: GGUFVocab, special: SpecialTokens) -> None:
    before = [vocab.tokens[special.bos]] if special.add_bos and special.bos is not None else []
    after = [vocab.tokens[special.eos]] if special.add_eos and special.eos is not None else []
    if not before and not after:
        return
    ids = {vocab.tokens[i]: i for i in (special.bos, special.eos) if i is not None}
    tok.post_processor = processors.TemplateProcessing(
        single=[*before, "$A", *after],
        pair=[*before, "$A", *after, *before, "$B", *after],
        special_tokens=[(t, ids[t]) for t in dict.fromkeys(before + after)],
    )


def rebuild_tokenizer(vocab: GGUFVocab, special: SpecialTokens) -> Any:
    """A ``PreTrainedTokenizerFast`` for ``vocab``; ModelLoadError where llama.cpp's rule is unknown."""
    from transformers import PreTrainedTokenizerFast

    if vocab.model == "llama":
        tok = _spm_tokenizer(vocab)
    elif vocab.model == "gpt2":
        tok = _gpt2_tokenizer(vocab)
    else:
        raise _unsupported(vocab, f"tokenizer model {vocab.model!r} (only 'llama' and 'gpt2' are rebuilt)")
    _add_marked_tokens(tok, vocab)
    _post_processor(tok, vocab, special)

    def text(token_id: int | None) -> str | None:
        return vocab.tokens[token_id] if token_id is not None else None

    unk = next((i for i, kind in enumerate(vocab.token_types) if kind == _UNKNOWN), None)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=text(special.bos),
        eos_token=text(special.eos),
        unk_token=text(unk),
        pad_token=text(special.pad),
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = special.chat_template
    return fast
