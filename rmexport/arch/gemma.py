"""Gemma 2 and Gemma 3 (text): sandwich norms around attention and MLP, mixed sliding layers.

The MLP output passes through ``post_feedforward_layernorm`` before the residual add, so a
dense map cannot be folded into ``down_proj`` exactly. These adapters declare the norm; the
solver then fits a diagonal map, which folds exactly into the norm's weight.

llama.cpp's Gemma 2 and Gemma 3 loaders call ``load_swa_pattern``: they read
``{arch}.attention.sliding_window_pattern`` as one bool per layer (``hparams.is_swa_impl``) and
derive the pattern from the layer index only when a GGUF has no array (Gemma 2: every other layer
sliding; Gemma 3: every 6th layer global). The array form came with llama.cpp PR 29042 (2026-09);
llama-cpp-python 0.3.36 (llama.cpp 0c1e57098) is the first release with it, 0.3.35 (4df29be4f)
ignores an array. So a GGUF of a pruned Gemma carries the kept blocks' pattern and runs any cut;
only an older llama.cpp gets the whole-period rule and its refusal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .base import ArchAdapter

__all__ = ["GEMMA2", "GEMMA3", "GemmaAdapter"]

_SLIDING = "sliding_attention"
_FULL = "full_attention"


@dataclass(frozen=True)
class GemmaAdapter(ArchAdapter):
    post_mlp_norm: str | None = "post_feedforward_layernorm"
    norm_weight_offset: float = 1.0
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    llama_cpp_swa_array_since: str | None = "0.3.36"

    # llama.cpp scales queries by 1/sqrt(hidden/heads) for the 27B models, by 1/sqrt(head_dim)
    # for every other size; a GGUF stores no query_pre_attn_scalar.
    llama_cpp_27b_blocks: int = 0
    gguf_sliding_window: bool = True
    # onnxruntime-genai's builder: layer i is global when (i + 1) % period == 0 (Gemma 2 counts from
    # the other end: sliding when i is odd).
    genai_global_every: int = 0

    def genai_layer_types(self, n_layers: int) -> list[str] | None:
        if self.genai_global_every == 2:
            return [_SLIDING if i % 2 == 1 else _FULL for i in range(n_layers)]
        period = self.genai_global_every
        return [_SLIDING if (i + 1) % period else _FULL for i in range(n_layers)]

    def _llama_cpp_query_scalar(self, config: Any) -> float:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if config.num_hidden_layers == self.llama_cpp_27b_blocks:
            return config.hidden_size / config.num_attention_heads
        return head_dim

    def llama_cpp_problem(self, config: Any) -> str | None:
        scalar = getattr(config, "query_pre_attn_scalar", None)
        if scalar is not None:
            llama_cpp = self._llama_cpp_query_scalar(config)
            if not math.isclose(float(scalar), float(llama_cpp)):
                return (
                    f"llama.cpp scales {self.family} queries by 1/sqrt({llama_cpp:g}) for a "
                    f"{config.num_hidden_layers}-block model, but this model's query_pre_attn_scalar "
                    f"is {scalar:g}"
                )
        if "attn_logit_softcapping" not in self.gguf_softcapping and getattr(
            config, "attn_logit_softcapping", None
        ):
            return f"llama.cpp's {self.family} has no attention logit softcapping, but this config sets it"
        return None

    def complete_config_from_gguf(self, config: Any, swa_pattern: list[bool] | None = None) -> None:
        super().complete_config_from_gguf(config, swa_pattern)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if config.num_hidden_layers == self.llama_cpp_27b_blocks:
            config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads
        else:
            config.query_pre_attn_scalar = head_dim


GEMMA2 = GemmaAdapter(
    family="gemma2",
    hf_architectures=("Gemma2ForCausalLM",),
    model_type="gemma2",
    gguf_arch="gemma2",
    llama_cpp_swa_period=2,
    llama_cpp_27b_blocks=46,
    gguf_softcapping=("attn_logit_softcapping", "final_logit_softcapping"),
    genai_global_every=2,
    optimum_runtime_gap=(
        "optimum-onnx 0.1.0's ORTModelForCausalLM sizes the first (empty) KV cache with "
        "num_attention_heads instead of num_key_value_heads for gemma2, so generate() fails "
        "whenever they differ; run the graph with onnxruntime directly"
    ),
)

GEMMA3 = GemmaAdapter(
    family="gemma3",
    hf_architectures=("Gemma3ForCausalLM",),
    model_type="gemma3_text",
    gguf_arch="gemma3",
    has_qk_norm=True,
    llama_cpp_swa_period=6,
    llama_cpp_27b_blocks=62,
    gguf_softcapping=("final_logit_softcapping",),
    gguf_rope_base_swa=True,
    genai_global_every=6,
)
