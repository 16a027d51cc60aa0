"""ArchAdapter: where a model family keeps the parts that pruning and the converters touch.

An adapter is declared once per family and read by every stage: activation capture and the
fold (blocks, MLP output, ``down_proj``, post-MLP norm), the config surgery (per-layer lists),
and the converters and runtimes (GGUF architecture name and metadata, llama.cpp's layer pattern
and refusals, the rope permutation, the layer pattern onnxruntime-genai's builder assumes, what
optimum's runtime cannot do). The converters read these facts and never test a family's name.

A new family provides one adapter (a new file here, registered in ``__init__``): ``family``,
``hf_architectures``, ``model_type``, ``gguf_arch``, where its blocks/MLP/``down_proj`` live if not
Llama's, ``post_mlp_norm`` and ``norm_weight_offset`` if it has them, ``per_layer_keys`` (plus
``_slice_extra`` for fields that depend on the block count), and, where a runtime differs from
transformers, the GGUF flags below and ``llama_cpp_problem`` / ``gguf_cut_problem`` /
``genai_layer_types``; plus its tiny-model entry in ``tests/tiny.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ArchAdapter"]


def _get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    hf_architectures: tuple[str, ...]
    model_type: str
    gguf_arch: str
    layers_path: str = "model.layers"
    mlp: str = "mlp"
    down_proj: str = "mlp.down_proj"
    # A norm applied to the MLP output before the residual add (Gemma 2/3). A dense map does
    # not commute with it, so such families get a diagonal map folded into this norm's weight.
    post_mlp_norm: str | None = None
    # Gemma's RMSNorm multiplies by (offset + weight) instead of weight.
    norm_weight_offset: float = 0.0
    # Config lists with one entry per decoder block, sliced together with the blocks.
    per_layer_keys: tuple[str, ...] = ()
    has_qk_norm: bool = False
    # llama.cpp rotates adjacent pairs where transformers rotates halves: q/k rows are permuted per head.
    gguf_permute_qk: bool = False
    # Config fields llama.cpp reads as ``{arch}.{field}`` softcapping keys.
    gguf_softcapping: tuple[str, ...] = ()
    # Sliding-window metadata (window, per-layer pattern) is written; the rope base of local layers too.
    gguf_sliding_window: bool = False
    gguf_rope_base_swa: bool = False
    # llama.cpp runs this family with full attention although its config may set sliding_window.
    llama_cpp_full_attention: bool = False
    # Why optimum's ORTModelForCausalLM cannot generate() with an export of this family when it has
    # fewer KV heads than query heads (the graph itself is right), or None.
    optimum_runtime_gap: str | None = None

    # --- module access -------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get_submodule(model, self.layers_path)

    def block(self, model: nn.Module, layer_idx: int) -> nn.Module:
        return self.blocks(model)[layer_idx]

    def mlp_output_module(self, block: nn.Module) -> nn.Module:
        """The module whose output is exactly what the MLP adds to the residual stream."""
        return _get_submodule(block, self.post_mlp_norm or self.mlp)

    def down_proj_module(self, block: nn.Module) -> nn.Linear:
        return _get_submodule(block, self.down_proj)

    def post_mlp_norm_module(self, block: nn.Module) -> nn.Module:
        assert self.post_mlp_norm is not None
        return _get_submodule(block, self.post_mlp_norm)

    @property
    def dense_fold(self) -> bool:
        """True when a dense d×d map folds exactly into ``down_proj``."""
        return self.post_mlp_norm is None

    # --- config surgery -----------------------------------------------------------------
    def slice_config(self, config: Any, kept: list[int]) -> None:
        """Make ``config`` describe only the blocks whose original indices are ``kept``."""
        n_before = config.num_hidden_layers
        for key in self.per_layer_keys:
            values = getattr(config, key, None)
            if isinstance(values, list | tuple) and len(values) == n_before:
                setattr(config, key, [values[i] for i in kept])
        self._slice_extra(config, kept)
        config.num_hidden_layers = len(kept)

    def _slice_extra(self, config: Any, kept: list[int]) -> None:
        """Family-specific config fields that depend on the block count."""

    # --- runtime rules ------------------------------------------------------------------
    def gguf_cut_problem(self, config: Any) -> str | None:
        """Why llama.cpp would run this (possibly pruned) config wrongly, or None if it is fine."""
        return None

    def llama_cpp_layer_types(self, n_layers: int) -> list[str] | None:
        """The sliding/global pattern llama.cpp derives from the layer index (None: it derives none)."""
        return None

    def llama_cpp_problem(self, config: Any) -> str | None:
        """What else llama.cpp computes differently from transformers for this config, or None."""
        return None

    def genai_layer_types(self, n_layers: int) -> list[str] | None:
        """The attention pattern onnxruntime-genai's builder assumes (None: no sliding layers)."""
        return None

    def complete_config_from_gguf(self, config: Any) -> None:
        """Set what a GGUF leaves implicit (llama.cpp derives it) on a config read from one."""

    def gguf_keeps_pattern(self, config: Any, kept: list[int]) -> bool:
        """Whether llama.cpp can run the model that keeps original blocks ``kept`` of ``config``."""
        return True

    def gguf_cut_sizes(self, n_layers: int) -> list[int] | None:
        """Block counts a single cut may remove for llama.cpp; None when any count works."""
        return None
