"""Token batches for calibration and the fixed held-out windows for perplexity.

Calibration: plain text is packed (documents truncated to ``seq_len`` tokens, joined with a
blank line, cut into full ``seq_len`` sequences, no padding); chat samples are rendered with
the model's chat template, truncated, and right-padded per batch with the pads masked out.

Evaluation (the benchmark protocol, identical for every backend): held-out documents joined
with a blank line, tokenized without special tokens, the first ``n_tokens`` tokens cut into
non-overlapping windows of ``window`` tokens, each prefixed with BOS. Every token of every
window is predicted, so perplexity averages over exactly ``n_tokens`` predictions.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..errors import CalibrationError, ConfigError
from ..records import JsonObject
from .corpus import Corpus, Document, load_corpus, parse_mixture

__all__ = [
    "DEFAULT_EVAL_WINDOW",
    "CalibrationPart",
    "CalibrationSet",
    "calibration_batches",
    "heldout_windows",
    "mixture_batches",
    "shares",
]

DEFAULT_EVAL_WINDOW = 512
_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class CalibrationPart:
    """One source of a mixture: how many of its documents, and tokens, the set holds."""

    source: str
    documents: int
    tokens: int
    packed: bool


@dataclass
class CalibrationSet:
    """Batches of ``input_ids`` and ``attention_mask`` (1 = real token) plus provenance."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    source: str
    n_documents: int
    seq_len: int
    packed: bool
    n_tokens: int = 0
    token_hash: str = ""
    parts: list[CalibrationPart] = field(default_factory=list)  # a mixture's sources; none for one source

    def summary(self) -> str:
        """One sentence for the log: how much text, from where, and its hash."""
        parts = self.parts
        sources = ", ".join(f"{p.documents} of `{p.source}`" for p in parts) if parts else f"`{self.source}`"
        return (
            f"{self.n_documents} documents ({sources}) in {sum(len(ids) for ids, _ in self.batches)} "
            f"sequences of up to {self.seq_len} tokens, {self.n_tokens} tokens in all "
            f"(sha256 {self.token_hash})"
        )

    def subset(self, indices: list[int]) -> CalibrationSet:
        """The same text's batches ``indices`` only (a survey of cuts reads a share of them)."""
        batches = [self.batches[i] for i in indices]
        return replace(self, batches=batches, n_tokens=sum(int(mask.sum()) for _ids, mask in batches))

    def spread(self, documents: int) -> list[int]:
        """Indices of batches evenly spread over the set, about ``documents`` documents' share of it
        (all of them where ``documents`` is at least the set's)."""
        total = len(self.batches)
        count = min(total, max(1, math.ceil(total * documents / max(self.n_documents, 1))))
        return sorted({(2 * i + 1) * total // (2 * count) for i in range(count)})

    def describe(self) -> JsonObject:
        """The set as ``prune.json``'s ``calibration`` records it (which the prune extends)."""
        described = {
            "source": self.source,
            "documents": self.n_documents,
            "sequences": sum(len(ids) for ids, _ in self.batches),
            "tokens": self.n_tokens,
            "seq_len": self.seq_len,
            "packed": self.packed,
            "sha256": self.token_hash,
        }
        return described | ({"parts": [asdict(p) for p in self.parts]} if self.parts else {})


def _choose_documents(pool: list[Document], n: int, seed: int, offset: int = 0) -> list[Document]:
    """Documents ``offset .. offset + n`` of the pool: in pool order for seed 0 (the protocol),
    in a seeded shuffled order otherwise. Different offsets never share a document."""
    order = list(range(len(pool)))
    if seed != 0:
        random.Random(seed).shuffle(order)
    return [pool[i] for i in order[offset : offset + n]]


# Tokens past those needed that a prefix must yield: a tokenizer merges only across a few characters,
# so ids this far before the prefix's end are the ids of the whole text.
_PREFIX_MARGIN_TOKENS = 256


def _encode_prefix(tokenizer: Any, text: str, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` ids of ``text`` (fewer if it is shorter), tokenizing only as long a
    prefix as they need: the held-out text of a corpus can be hundreds of times longer."""
    chars = 8 * (n_tokens + _PREFIX_MARGIN_TOKENS)
    while True:
        if chars >= len(text):
            return _encode(tokenizer, text)
        ids = _encode(tokenizer, text[:chars])
        if len(ids) >= n_tokens + _PREFIX_MARGIN_TOKENS:
            return ids[:n_tokens]
        chars *= 2


def _bos_id(tokenizer: Any) -> int | None:
    return tokenizer.bos_token_id


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pack(tokenizer: Any, documents: list[str], seq_len: int) -> list[list[int]]:
    bos = _bos_id(tokenizer)
    body = seq_len - (1 if bos is not None else 0)
    separator = _encode(tokenizer, _SEPARATOR)
    stream: list[int] = []
    for i, doc in enumerate(documents):
        if i:
            stream.extend(separator)
        stream.extend(_encode(tokenizer, doc)[:seq_len])
    sequences = []
    for start in range(0, len(stream) - body + 1, body):
        chunk = stream[start : start + body]
        sequences.append(([bos] if bos is not None else []) + chunk)
    return sequences


def _render_chats(tokenizer: Any, chats: list[list[dict[str, str]]], seq_len: int) -> list[list[int]]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("chat-formatted calibration data needs a tokenizer with a chat template")
    sequences = []
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat, tokenize=True)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        sequences.append(list(ids)[:seq_len])
    return sequences


def _batch(
    sequences: list[list[int]], batch_size: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for start in range(0, len(sequences), batch_size):
        group = sequences[start : start + batch_size]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        batches.append((ids, mask))
    return batches


def calibration_batches(
    corpus: Corpus,
    tokenizer: Any,
    *,
    n_samples: int,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    min_tokens: int = 256,
    offset: int = 0,
) -> CalibrationSet:
    """Tokenize ``n_samples`` documents of the corpus's calibration pool into batches.

    ``offset`` skips documents another set already uses (the selection slice comes after the
    calibration documents)."""
    if n_samples < 1 or seq_len < 8 or batch_size < 1:
        raise ConfigError("--calib-samples and --batch-size must be >= 1 and --seq-len >= 8")
    documents = _choose_documents(corpus.pool, n_samples, seed, offset)
    if corpus.is_chat and getattr(tokenizer, "chat_template", None) is None:
        documents = [_chat_text(d) for d in documents]  # no template: the turns as plain text
        corpus = Corpus(corpus.name, pool=[], heldout=[])
    if corpus.is_chat:
        sequences = _render_chats(tokenizer, documents, seq_len)  # type: ignore[arg-type]
        sequences = [s for s in sequences if len(s) >= 2]
    else:
        sequences = _pack(tokenizer, documents, seq_len)  # type: ignore[arg-type]
    n_tokens = sum(len(s) for s in sequences)
    if n_tokens < min_tokens:
        raise CalibrationError(
            f"calibration text from {corpus.name!r} gives {n_tokens} tokens; need at least {min_tokens}",
            hint="use more --calib-samples, a shorter --seq-len, or a longer text source",
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return CalibrationSet(
        batches=_batch(sequences, batch_size, pad_id),
        source=corpus.name,
        n_documents=len(documents),
        seq_len=seq_len,
        packed=not corpus.is_chat,
        n_tokens=n_tokens,
        token_hash=digest.hexdigest()[:16],
    )


def shares(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders; ties to the first)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_batches(
    spec: str,
    tokenizer: Any,
    *,
    n_samples: int,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    offset: int = 0,
    min_tokens: int = 256,
) -> CalibrationSet:
    """``calibration_batches`` over a mixture (``parse_mixture``): each source gives its share of
    ``n_samples`` documents, after its share of ``offset``. One source is exactly that source."""
    parts = parse_mixture(spec)
    if len(parts) == 1:
        return calibration_batches(
            load_corpus(parts[0][0]),
            tokenizer,
            n_samples=n_samples,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            offset=offset,
            min_tokens=min_tokens,
        )
    weights = [w for _, w in parts]
    sets = [
        calibration_batches(
            load_corpus(name),
            tokenizer,
            n_samples=count,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            offset=skip,
            min_tokens=1,
        )
        for (name, _), count, skip in zip(
            parts, shares(n_samples, weights), shares(offset, weights), strict=True
        )
        if count > 0
    ]
    n_tokens = sum(s.n_tokens for s in sets)
    if n_tokens < min_tokens:
        raise CalibrationError(
            f"calibration text from {spec!r} gives {n_tokens} tokens; need at least {min_tokens}",
            hint="use more --calib-samples or a shorter --seq-len",
        )
    digest = hashlib.sha256("|".join(s.token_hash for s in sets).encode())
    return CalibrationSet(
        batches=[batch for s in sets for batch in s.batches],
        source=spec,
        n_documents=sum(s.n_documents for s in sets),
        seq_len=seq_len,
        packed=all(s.packed for s in sets),
        n_tokens=n_tokens,
        token_hash=digest.hexdigest()[:16],
        parts=[CalibrationPart(s.source, s.n_documents, s.n_tokens, s.packed) for s in sets],
    )


def _chat_text(chat: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in chat)


def _heldout_text(corpus: Corpus) -> str:
    return _SEPARATOR.join(doc if isinstance(doc, str) else _chat_text(doc) for doc in corpus.heldout)


def heldout_windows(
    corpus: Corpus, tokenizer: Any, n_tokens: int, window: int = DEFAULT_EVAL_WINDOW
) -> torch.Tensor:
    """``[n_windows, window + 1]`` token ids: BOS then ``window`` held-out tokens per row."""
    if n_tokens < window:
        raise ConfigError(f"--eval-tokens {n_tokens} is shorter than one window of {window} tokens")
    ids = _encode_prefix(tokenizer, _heldout_text(corpus), n_tokens)
    usable = min(n_tokens, len(ids)) // window * window
    if usable == 0:
        raise ConfigError(f"held-out text of {corpus.name!r} has {len(ids)} tokens; need {window}")
    body = torch.tensor(ids[:usable], dtype=torch.long).view(-1, window)
    bos = _bos_id(tokenizer)
    bos_column = torch.full((body.shape[0], 1), bos if bos is not None else body[0, 0].item())
    return torch.cat([bos_column, body], dim=1)
