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
transformers, the GGUF flags below, llama.cpp's sliding-window loader (``llama_cpp_swa_period``,
``llama_cpp_swa_array_since``) and ``llama_cpp_problem`` / ``genai_layer_types``; plus its tiny-model
entry in ``tests/tiny.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ArchAdapter"]

_SLIDING = "sliding_attention"
_FULL = "full_attention"


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
    attention_output: str = "self_attn.o_proj"
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
    # How llama.cpp's loader for this family learns which layers slide (its ``load_swa_pattern``):
    # the period it derives from the layer index when a GGUF has no per-layer array (0: the loader
    # calls no load_swa_pattern and has no sliding layers), and the first llama-cpp-python release
    # whose llama.cpp reads ``{arch}.attention.sliding_window_pattern`` as that array (None: none).
    llama_cpp_swa_period: int = 0
    llama_cpp_swa_array_since: str | None = None
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

    def attention_output_module(self, block: nn.Module) -> nn.Linear:
        """The attention's output projection, whose output is added to the stream (no norm between
        them where ``dense_fold``)."""
        return _get_submodule(block, self.attention_output)

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
    def gguf_swa_pattern(self, layer_types: list[str]) -> list[bool] | None:
        """Per block, whether it slides, as ``{arch}.attention.sliding_window_pattern`` states it; from
        a config's ``layer_types`` (after a cut: the kept blocks'). None: this family writes no array."""
        if not (self.gguf_sliding_window and layer_types):
            return None
        return [kind == _SLIDING for kind in layer_types]

    def llama_cpp_layer_types(self, n_layers: int) -> list[str] | None:
        """The sliding/global pattern llama.cpp derives from the layer index when a GGUF carries no
        per-layer array (None: it derives none): layer il is global when (il + 1) % period == 0."""
        period = self.llama_cpp_swa_period
        if not period:
            return None
        return [_FULL if (i + 1) % period == 0 else _SLIDING for i in range(n_layers)]

    def llama_cpp_reads_swa_pattern(self, llama_cpp_version: str | None) -> bool:
        """Whether llama-cpp-python ``llama_cpp_version`` reads this family's per-layer array."""
        since = self.llama_cpp_swa_array_since
        if since is None or llama_cpp_version is None:
            return False
        return _release(llama_cpp_version) >= _release(since)

    def gguf_cut_problem(self, layer_types: list[str], llama_cpp_version: str | None) -> str | None:
        """Why that llama.cpp would run a model with these ``layer_types`` (possibly pruned) with
        another sliding/global pattern, or None."""
        derived = self.llama_cpp_layer_types(len(layer_types))
        if derived is None or not layer_types or list(layer_types) == derived:
            return None
        if self.llama_cpp_reads_swa_pattern(llama_cpp_version):
            return None
        since = self.llama_cpp_swa_array_since
        needed = (
            f"llama.cpp reads the GGUF's per-layer pattern from llama-cpp-python {since} on"
            if since
            else "no llama.cpp reads a per-layer pattern for it"
        )
        return (
            f"llama-cpp-python {llama_cpp_version or '(not installed)'} derives {self.family}'s "
            f"sliding/global layer pattern from the layer index (every {self.llama_cpp_swa_period}th "
            f"layer global), but this model's layer_types no longer follow it; {needed}"
        )

    def gguf_keeps_pattern(self, config: Any, kept: list[int], llama_cpp_version: str | None) -> bool:
        """Whether that llama.cpp runs the model that keeps original blocks ``kept`` of ``config``."""
        layer_types = list(getattr(config, "layer_types", None) or [])
        if not layer_types:
            return True
        return self.gguf_cut_problem([layer_types[i] for i in kept], llama_cpp_version) is None

    def gguf_cut_sizes(self, n_layers: int, llama_cpp_version: str | None) -> list[int] | None:
        """Block counts a single cut may remove for that llama.cpp; None when any count works.
        Whole periods keep every later block's place in the index-derived pattern (a cut at the very
        end keeps it too, but removing the last blocks is never a cut worth making)."""
        period = self.llama_cpp_swa_period
        if not period or self.llama_cpp_reads_swa_pattern(llama_cpp_version):
            return None
        return list(range(period, n_layers - 1, period))

    def llama_cpp_problem(self, config: Any) -> str | None:
        """What else llama.cpp computes differently from transformers for this config, or None."""
        return None

    def genai_layer_types(self, n_layers: int) -> list[str] | None:
        """The attention pattern onnxruntime-genai's builder assumes (None: no sliding layers)."""
        return None

    def complete_config_from_gguf(self, config: Any, swa_pattern: list[bool] | None = None) -> None:
        """Set what a GGUF leaves implicit (llama.cpp derives it) on a config read from one, and the
        layer pattern its per-layer ``sliding_window_pattern`` states (transformers reads no array)."""
        readable = self.llama_cpp_swa_period and swa_pattern is not None
        if readable and len(swa_pattern) == config.num_hidden_layers:
            config.layer_types = [_SLIDING if sliding else _FULL for sliding in swa_pattern]


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "0.3.36" -> (0, 3, 36), "0.4.0rc1" -> (0, 4, 0)."""
    numbers = []
    for part in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) < len(part):
            break
    return tuple(numbers)
