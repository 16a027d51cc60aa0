"""The honest ideal speed-up: FLOPs of what each phase really computes, from the model's config.

Removing blocks shrinks only the blocks. The embedding (a row lookup, no multiply) and the LM
head (``2·d·V`` FLOPs per position whose logits are computed) stay, so the ideal depends on the
phase:

- generation (``tgG``): every token runs the blocks and the head; at 135M with a 49k vocabulary
  the head is a fifth of the work, so the ideal is well below L/N;
- prompt processing (``ppP``): llama.cpp computes the head for the last position only, so the
  ideal is close to L/N; an ONNX graph that returns logits for every position computes the
  head ``P`` times, and its ideal says so (``head_positions="all"``).

Per block and token: the q/k/v/o projections ``2·d·(h + 2·h_kv + h)·hd`` and the gated MLP
``3·2·d·ff``; per query and attended key ``4·h·hd`` (scores and the weighted sum of values),
with the context each phase really has (token ``t`` of a prompt attends ``t`` keys; step ``k``
of generation from an empty cache attends ``k``), capped by a sliding window where the block has
one. Norms, RoPE, activations and softmax are O(d) per token and left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf

from rmexport.arch import gguf_adapter
from rmexport.errors import ConfigError
from rmexport.fileio import open_gguf

__all__ = ["IdealSpeedup", "ModelShape", "attended_keys", "ideal_speedups", "phase_flops"]

HeadPositions = Literal["last", "all"]
_SLIDING = "sliding_attention"


def _llama_cpp_layer_types(arch: str, layers: int) -> list[str] | None:
    adapter = gguf_adapter(arch)
    return adapter.llama_cpp_layer_types(layers) if adapter is not None else None


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from a decoder's config."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    windows: tuple[int | None, ...]  # per block: keys a query may attend (None: all of them)

    @property
    def layers(self) -> int:
        return len(self.windows)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From an HF ``config.json`` (a multimodal config's ``text_config`` is used)."""
        config = config.get("text_config") or config
        try:
            layers = int(config["num_hidden_layers"])
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            shape = dict(
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
            )
        except KeyError as e:
            raise ConfigError(f"config.json has no {e.args[0]!r}; cannot count FLOPs") from e
        window = config.get("sliding_window")
        layer_types = config.get("layer_types")
        if layer_types:
            windows = tuple(window if kind == _SLIDING else None for kind in layer_types[:layers])
        elif window and config.get("use_sliding_window", True):
            windows = (int(window),) * layers
        else:
            windows = (None,) * layers
        return cls(windows=windows, **shape)

    @classmethod
    def from_gguf(cls, path: str | Path) -> ModelShape:
        """From a GGUF's metadata, as llama.cpp reads it."""
        header = open_gguf(path)
        metadata = header.metadata
        arch = metadata[gguf.Keys.General.ARCHITECTURE]

        def value(key: str, default: Any = None) -> Any:
            found = metadata.get(key.format(arch=arch))
            if found is None:
                if default is None:
                    raise ConfigError(f"{path} has no {key.format(arch=arch)}; cannot count FLOPs")
                return default
            return found

        def scalar(key: str, default: Any = None) -> Any:
            content = value(key, default)  # some architectures store per-block lists; all equal here
            return content[0] if isinstance(content, list) else content

        pattern_key = gguf.Keys.Attention.SLIDING_WINDOW_PATTERN
        layers = int(scalar(gguf.Keys.LLM.BLOCK_COUNT))
        hidden = int(scalar(gguf.Keys.LLM.EMBEDDING_LENGTH))
        heads = int(scalar(gguf.Keys.Attention.HEAD_COUNT))
        embedding = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
        vocab = scalar(gguf.Keys.LLM.VOCAB_SIZE, embedding.shape[0] if embedding is not None else None)
        window = scalar(gguf.Keys.Attention.SLIDING_WINDOW, 0) or None
        if window is None:
            windows: tuple[int | None, ...] = (None,) * layers
        elif metadata.get(pattern_key.format(arch=arch)) is not None:
            windows = tuple(int(window) if s else None for s in value(pattern_key))
        elif (derived := _llama_cpp_layer_types(arch, layers)) is not None:
            # llama.cpp's own pattern when a GGUF carries none (Gemma: from the layer index)
            windows = tuple(int(window) if t == _SLIDING else None for t in derived)
        else:
            windows = (int(window),) * layers
        return cls(
            hidden=hidden,
            intermediate=int(scalar(gguf.Keys.LLM.FEED_FORWARD_LENGTH)),
            heads=heads,
            kv_heads=int(scalar(gguf.Keys.Attention.HEAD_COUNT_KV, heads)),
            head_dim=int(scalar(gguf.Keys.Attention.KEY_LENGTH, hidden // heads)),
            vocab=int(vocab),
            windows=windows,
        )

    def linear_flops_per_token(self) -> int:
        """One block, one token: q/k/v/o projections and the gated MLP (gate, up, down)."""
        d, hd = self.hidden, self.head_dim
        attention = 2 * d * (2 * self.heads + 2 * self.kv_heads) * hd
        return attention + 3 * 2 * d * self.intermediate

    def attention_flops_per_key(self) -> int:
        """One query against one cached key: scores (q·k) and the weighted sum of values."""
        return 4 * self.heads * self.head_dim

    def head_flops_per_position(self) -> int:
        return 2 * self.hidden * self.vocab


def attended_keys(tokens: int, window: int | None) -> int:
    """Σ over positions t = 1..tokens of the keys position t attends: min(t, window)."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


def phase_flops(
    shape: ModelShape, kind: str, tokens: int, *, head_positions: HeadPositions = "last"
) -> dict[str, int]:
    """FLOPs of one repetition of a phase, split into blocks (linear, attention), head, embedding.

    ``kind="prompt"``: ``tokens`` positions in one pass from an empty cache; the head runs for the
    last position or for all (``head_positions``). ``kind="generation"``: ``tokens`` single-token
    steps from an empty cache; the head runs at every step.
    """
    if kind not in ("prompt", "generation"):
        raise ConfigError(f"unknown phase kind {kind!r}; expected prompt or generation")
    linear = shape.layers * tokens * shape.linear_flops_per_token()
    attention = shape.attention_flops_per_key() * sum(attended_keys(tokens, w) for w in shape.windows)
    head_runs = 1 if kind == "prompt" and head_positions == "last" else tokens
    head = head_runs * shape.head_flops_per_position()
    return {
        "blocks_linear": linear,
        "blocks_attention": attention,
        "lm_head": head,
        "embedding": 0,  # a row lookup: memory traffic, no multiply-adds
        "total": linear + attention + head,
    }


@dataclass(frozen=True)
class IdealSpeedup:
    """One phase's ideal speed-up: FLOPs(original) / FLOPs(pruned), with both counts."""

    ideal: float
    head_positions: HeadPositions
    flops: dict[str, dict[str, int]]  # "original", "pruned" -> ``phase_flops``


def ideal_speedups(
    original: ModelShape,
    pruned: ModelShape,
    phases: Mapping[str, int],
    *,
    prompt_head: HeadPositions = "last",
) -> dict[str, IdealSpeedup]:
    """Per phase (``ppN``/``tgN`` -> tokens): the ideal speed-up of the pruned model."""
    out: dict[str, IdealSpeedup] = {}
    for phase, tokens in phases.items():
        kind = {"pp": "prompt", "tg": "generation"}[phase[:2]]
        counts = {
            role: phase_flops(shape, kind, tokens, head_positions=prompt_head)
            for role, shape in (("original", original), ("pruned", pruned))
        }
        out[phase] = IdealSpeedup(
            ideal=counts["original"]["total"] / counts["pruned"]["total"],
            head_positions=prompt_head if kind == "prompt" else "all",
            flops=counts,
        )
    return out
