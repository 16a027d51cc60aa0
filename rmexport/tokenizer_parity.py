"""Tokenizer parity for a GGUF source: the tokenizer a run uses must split text as llama.cpp does.

A GGUF file carries its tokenizer as ``tokenizer.ggml.*`` fields, and llama.cpp is the reader
that counts. transformers rebuilds an HF tokenizer from the same fields, and for some families
(Gemma's SentencePiece vocabulary with scores) gets it wrong without a word. So, before any heavy
work, ``ensure_parity`` tokenizes a fixed sample (the first ``PARITY_CHARACTERS`` characters of
the built-in held-out text, plus a few probes with whitespace runs, digits, code and non-Latin
script) with the HF tokenizer and with llama.cpp reading the file (vocabulary only), and compares

- the ids of every text, nothing added (special-token text parsed by both, as the run does);
- what each adds around a text when asked to (BOS/EOS), and the BOS/EOS/pad ids;
- the chat template, and a short chat rendered with it.

If transformers' tokenizer differs anywhere, one is rebuilt from the GGUF's own vocabulary
(``tokenizer_rebuild``) and checked the same way; if that differs too, ModelLoadError (exit 2)
names the first differing position and both ids. The verdict is saved beside the cached
conversion (``PARITY_FILE``) and trusted on later uses while the GGUF file, llama.cpp and
tokenizers are the same ones (``record_is_current``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .atomic import write_json
from .calib.corpus import BUILTIN, load_corpus
from .errors import ModelLoadError
from .llamacpp import llama_module
from .log import get_logger
from .records import JsonObject, from_jsonable
from .sysinfo import package_versions
from .tokenizer_rebuild import SpecialTokens, read_gguf_vocab, rebuild_tokenizer

__all__ = [
    "CHECK_VERSION",
    "PARITY_CHARACTERS",
    "PARITY_FILE",
    "PROBES",
    "REBUILT",
    "TRANSFORMERS",
    "Comparison",
    "TokenizerParity",
    "check_saved",
    "LlamaCppVocab",
    "compare",
    "ensure_parity",
    "open_llama_cpp_vocab",
    "parity_texts",
    "read_record",
    "record_is_current",
    "write_record",
]

log = get_logger(__name__)

PARITY_FILE = "tokenizer_parity.json"
CHECK_VERSION = 1  # bump when what is compared changes, so that older verdicts are checked again
PARITY_CHARACTERS = 20_000
TRANSFORMERS = "transformers"
REBUILT = "rebuilt from GGUF vocabulary"

# What plain prose lacks: runs of spaces and newlines, tabs, digits, contractions, code, other scripts.
PROBES = (
    "Hello world! It's 2024; I'll pay $1,234.56 (or 3 333 3333) by 12/31.",
    "  leading spaces,\ttabs\tand\nnew\n\nlines   end  ",
    "I'VE been told he's there; we'd RE-check: don't, can't, won't.",
    "Café naïve — ünïcödé: 東京 🦙🚀 émojis ✅ Ελληνικά русский",
    "def f(x):\n    return x**2  # comment\n\n\n\tif a<=b: pass\n",
)
CHAT_PROBE = (
    {"role": "user", "content": "What is 2+2? Answer briefly."},
    {"role": "assistant", "content": "It is 4."},
)


@functools.lru_cache(maxsize=4)
def parity_texts(n_characters: int = PARITY_CHARACTERS) -> tuple[str, ...]:
    """The first ``n_characters`` of the built-in held-out documents, then ``PROBES``."""
    texts: list[str] = []
    total = 0
    for document in load_corpus(BUILTIN).heldout:
        if total >= n_characters:
            break
        if isinstance(document, str) and document:
            texts.append(document[: n_characters - total])
            total += len(texts[-1])
    return (*texts, *PROBES)


class LlamaCppVocab:
    """A GGUF's vocabulary as llama.cpp reads it (``vocab_only``: no weights, no context).

    Results are cached per text, so a second tokenizer is compared at the cost of its own side only.
    """

    def __init__(self, llama_cpp: Any, model: Any):
        self._lib = llama_cpp
        self._vocab = vocab = llama_cpp.llama_model_get_vocab(model)
        self.bos = _optional(llama_cpp.llama_vocab_bos(vocab))
        self.eos = _optional(llama_cpp.llama_vocab_eos(vocab))
        self.pad = _optional(llama_cpp.llama_vocab_pad(vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
        self.n_tokens = int(llama_cpp.llama_vocab_n_tokens(vocab))
        template = llama_cpp.llama_model_chat_template(model, None)
        self.chat_template: str | None = template.decode("utf-8") if template else None
        self.model = _metadata(llama_cpp, model, "tokenizer.ggml.model")
        self.pre = _metadata(llama_cpp, model, "tokenizer.ggml.pre")
        self._cache: dict[tuple[str, bool], list[int]] = {}

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Ids for ``text``, special-token text parsed; with ``add_special``, BOS/EOS as the file says."""
        key = (text, add_special)
        if key not in self._cache:
            data = text.encode("utf-8")
            size = len(data) + 8
            for _ in range(2):
                buf = (self._lib.llama_token * size)()
                n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, size, add_special, True)
                if n >= 0:
                    break
                size = -n
            else:  # pragma: no cover - llama.cpp said how many it needs
                raise ModelLoadError(f"llama.cpp could not tokenize a text of {len(text)} characters")
            self._cache[key] = list(buf[:n])
        return self._cache[key]

    def piece(self, token_id: int) -> str:
        """The text of one token (special tokens included), for messages."""
        if not 0 <= token_id < self.n_tokens:
            return "?"
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")


def _optional(token_id: int | None) -> int | None:
    return None if token_id is None or token_id < 0 else int(token_id)


def _metadata(llama_cpp: Any, model: Any, key: str) -> str:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else ""


@contextlib.contextmanager
def open_llama_cpp_vocab(gguf_path: str | Path) -> Iterator[LlamaCppVocab]:
    """llama.cpp reading only the vocabulary of ``gguf_path``; ModelLoadError when it can not."""
    from llama_cpp import _logger as llama_cpp_logger

    llama_cpp = llama_module()
    llama_cpp_logger.set_verbose(log.isEnabledFor(logging.DEBUG))
    gguf_path = Path(gguf_path)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
    if not model:
        raise ModelLoadError(
            f"llama.cpp can not read the vocabulary of {gguf_path.name}",
            hint="run with -v to see llama.cpp's log; the file may be truncated, "
            "or need a newer llama.cpp than the installed one",
        )
    try:
        yield LlamaCppVocab(llama_cpp, model)
    finally:
        llama_cpp.llama_model_free(model)


def _render_chat(tokenizer: Any) -> str | None:
    """``CHAT_PROBE`` rendered with the tokenizer's chat template (None: no template, or it fails)."""
    import jinja2

    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return None
    try:
        return tokenizer.apply_chat_template(list(CHAT_PROBE), tokenize=False)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        log.debug("the chat template could not render the probe chat: %s", e)
        return None


def _hf_ids(tokenizer: Any, text: str, add_special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special, verbose=False)["input_ids"])


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass(frozen=True)
class Comparison:
    """One HF tokenizer against llama.cpp on the sample."""

    problems: tuple[str, ...]  # empty: identical; the first is the most telling
    texts: int
    characters: int
    tokens: int  # llama.cpp's count over the sample
    chat_tokens: int | None  # llama.cpp's count for the rendered chat probe, None if not rendered

    @property
    def identical(self) -> bool:
        return not self.problems


def compare(tokenizer: Any, llama: LlamaCppVocab, texts: tuple[str, ...], label: str) -> Comparison:
    """Every way ``tokenizer`` differs from llama.cpp on ``texts``, as one-line descriptions."""
    problems: list[str] = []

    def show(ids: list[int], at: int, ours: bool) -> str:
        if at >= len(ids):
            return "nothing (the text ends there)"
        piece = tokenizer.decode([int(ids[at])]) if ours else llama.piece(ids[at])
        return f"{ids[at]} ({piece!r})"

    def differs(where: str, ours: list[int], theirs: list[int], base: int = 0) -> None:
        at = _first_difference(ours, theirs)
        if at is not None:
            problems.append(
                f"{where.format(at=at, pos=base + at)}: {label} gives {show(ours, at, True)}, "
                f"llama.cpp gives {show(theirs, at, False)}"
            )

    offset = 0
    for n, text in enumerate(texts):
        theirs = llama.tokenize(text)
        if not problems:  # the first difference is the one worth naming; later texts are only counted
            where = f"token {{pos}} of the sample (text {n + 1} of {len(texts)}, token {{at}})"
            differs(where, _hf_ids(tokenizer, text), theirs, base=offset)
        offset += len(theirs)
    roles = (("BOS", tokenizer.bos_token_id, llama.bos), ("EOS", tokenizer.eos_token_id, llama.eos))
    for role, ours_id, theirs_id in roles:
        if ours_id != theirs_id:
            problems.append(f"{role} id: {label} has {ours_id}, llama.cpp has {theirs_id}")
    if llama.pad is not None and tokenizer.pad_token_id != llama.pad:
        problems.append(f"pad id: {label} has {tokenizer.pad_token_id}, llama.cpp has {llama.pad}")
    differs(
        f"BOS/EOS added to a text (llama.cpp adds BOS {llama.add_bos}, EOS {llama.add_eos}), token {{at}}",
        _hf_ids(tokenizer, texts[0], add_special=True),
        llama.tokenize(texts[0], add_special=True),
    )
    template = getattr(tokenizer, "chat_template", None) or None
    chat = _render_chat(tokenizer)
    chat_tokens = None
    if template != llama.chat_template:
        problems.append(
            f"chat template: {label} has {_describe(template)}, the GGUF has {_describe(llama.chat_template)}"
        )
    elif chat is not None:
        theirs = llama.tokenize(chat)
        chat_tokens = len(theirs)
        differs("a chat rendered with the template, token {at}", _hf_ids(tokenizer, chat), theirs)
    return Comparison(
        tuple(problems),
        texts=len(texts),
        characters=sum(len(t) for t in texts),
        tokens=offset,
        chat_tokens=chat_tokens,
    )


def _describe(template: Any) -> str:
    if not template:
        return "none"
    return (
        f"one of {len(template)} characters" if isinstance(template, str) else f"a {type(template).__name__}"
    )


def _versions() -> dict[str, str]:
    versions = package_versions("llama_cpp_python", "tokenizers", "transformers")
    return {package: version or "absent" for package, version in versions.items()}


def ensure_parity(gguf_path: str | Path, tokenizer: Any, fingerprint: str) -> tuple[Any, TokenizerParity]:
    """The tokenizer to use for ``gguf_path`` and its parity record; ModelLoadError when none agrees.

    ``tokenizer`` is the candidate (transformers' reading of the file; None when transformers
    could not build one). When it differs from llama.cpp, a tokenizer is rebuilt from the file's
    vocabulary and must agree instead.
    """
    gguf_path = Path(gguf_path)
    start = time.perf_counter()
    texts = parity_texts()
    with open_llama_cpp_vocab(gguf_path) as llama:
        first = compare(tokenizer, llama, texts, "transformers") if tokenizer is not None else None
        if first is not None and first.identical:
            return tokenizer, _record(gguf_path, fingerprint, TRANSFORMERS, first, llama, None, start)
        if first is not None:
            log.warning(
                "the tokenizer transformers builds from %s differs from llama.cpp's (%s); "
                "rebuilding it from the GGUF vocabulary",
                gguf_path.name,
                first.problems[0],
            )
        vocab = read_gguf_vocab(gguf_path)
        special = SpecialTokens(
            bos=llama.bos,
            eos=llama.eos,
            pad=llama.pad,
            add_bos=llama.add_bos,
            add_eos=llama.add_eos,
            chat_template=llama.chat_template,
        )
        try:
            rebuilt = rebuild_tokenizer(vocab, special)
        except ModelLoadError as e:
            raise _refusal(gguf_path, llama, first, str(e)) from e
        second = compare(rebuilt, llama, texts, "the rebuilt tokenizer")
        if not second.identical:
            why = f"the tokenizer rebuilt from the GGUF vocabulary differs at {second.problems[0]}"
            raise _refusal(gguf_path, llama, first, why)
        log.info(
            "the tokenizer of %s was rebuilt from its GGUF vocabulary; it agrees with llama.cpp",
            gguf_path.name,
        )
        return rebuilt, _record(gguf_path, fingerprint, REBUILT, second, llama, first, start)


def _refusal(gguf_path: Path, llama: LlamaCppVocab, first: Comparison | None, why: str) -> ModelLoadError:
    told = f"transformers' tokenizer differs at {first.problems[0]}; " if first is not None else ""
    return ModelLoadError(
        f"the tokenizer of {gguf_path.name} (tokenizer.ggml.model={llama.model!r}, pre={llama.pre!r}) "
        f"can not be reproduced as llama.cpp reads it: {told}{why}",
        hint="use the model's original Hugging Face checkpoint (a directory or hub id) instead of the GGUF",
    )


@dataclass(frozen=True)
class TokenizerParity:
    """The verdict on a GGUF's tokenizer, saved beside its conversion as ``PARITY_FILE``."""

    check_version: int
    gguf_file: str
    gguf_fingerprint: str
    tokenizer_model: str  # tokenizer.ggml.model and .pre, as llama.cpp reads them ("" if absent)
    pre_tokenizer: str
    vocab_size: int
    method: str  # TRANSFORMERS or REBUILT
    verdict: str
    texts: int
    characters: int
    tokens: int
    chat_probe_tokens: int | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str
    seconds: float
    versions: dict[str, str]
    transformers_differed: list[str] | None = None  # where transformers' tokenizer differed, if it did

    def to_json(self) -> JsonObject:
        data = asdict(self)
        if self.transformers_differed is None:  # written only when transformers' tokenizer differed
            del data["transformers_differed"]
        return data

    @classmethod
    def from_json(cls, data: JsonObject) -> TokenizerParity:
        return from_jsonable(cls, data)


def _record(
    gguf_path: Path,
    fingerprint: str,
    method: str,
    result: Comparison,
    llama: LlamaCppVocab,
    transformers_result: Comparison | None,
    start: float,
) -> TokenizerParity:
    return TokenizerParity(
        check_version=CHECK_VERSION,
        gguf_file=str(gguf_path),
        gguf_fingerprint=fingerprint,
        tokenizer_model=llama.model,
        pre_tokenizer=llama.pre,
        vocab_size=llama.n_tokens,
        method=method,
        verdict="identical to llama.cpp",
        texts=result.texts,
        characters=result.characters,
        tokens=result.tokens,
        chat_probe_tokens=result.chat_tokens,
        bos_id=llama.bos,
        eos_id=llama.eos,
        pad_id=llama.pad,
        add_bos=llama.add_bos,
        add_eos=llama.add_eos,
        chat_template="identical" if llama.chat_template else "none in the GGUF",
        seconds=round(time.perf_counter() - start, 2),
        versions=_versions(),
        transformers_differed=None if transformers_result is None else list(transformers_result.problems),
    )


def write_record(checkpoint: str | Path, record: TokenizerParity) -> None:
    write_json(Path(checkpoint) / PARITY_FILE, record.to_json())


def read_record(checkpoint: str | Path) -> JsonObject | None:
    """The saved verdict as it is on disk (``prune.json`` carries it over as it is), None without one."""
    try:
        return json.loads((Path(checkpoint) / PARITY_FILE).read_text())
    except (OSError, ValueError):
        return None


def record_is_current(record: JsonObject | None, fingerprint: str) -> bool:
    """True for a passed verdict on this GGUF, made by this check with the installed llama.cpp/tokenizers."""
    if not record:
        return False
    versions = _versions()
    return (
        record.get("check_version") == CHECK_VERSION
        and record.get("gguf_fingerprint") == fingerprint
        and str(record.get("verdict", "")).startswith("identical")
        and all(record.get("versions", {}).get(p) == versions[p] for p in ("llama_cpp_python", "tokenizers"))
    )


def check_saved(gguf_path: str | Path, checkpoint: str | Path, fingerprint: str) -> bool:
    """True when the verdict saved in ``checkpoint`` holds, or its saved tokenizer passes a fresh check.

    A fresh pass is saved, so the next use is a file read again; False means the conversion's
    tokenizer disagrees with llama.cpp (or does not load) and must not be used.
    """
    from transformers import AutoTokenizer

    saved = read_record(checkpoint)
    if record_is_current(saved, fingerprint):
        return True
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    except (OSError, ValueError) as e:
        log.warning("the cached tokenizer in %s does not load (%s)", checkpoint, e)
        return False
    start = time.perf_counter()
    with open_llama_cpp_vocab(gguf_path) as llama:
        result = compare(tokenizer, llama, parity_texts(), "the cached tokenizer")
        if not result.identical:
            log.warning(
                "the cached tokenizer in %s differs from llama.cpp: %s", checkpoint, result.problems[0]
            )
            return False
        # Conversions made before this check have no record, and transformers made all of those.
        method = (saved or {}).get("method", TRANSFORMERS)
        record = _record(Path(gguf_path), fingerprint, method, result, llama, None, start)
    if saved and "transformers_differed" in saved:
        record = replace(record, transformers_differed=saved["transformers_differed"])
    write_record(checkpoint, record)
    return True
