"""Llama and Mistral: pre-norm blocks, SwiGLU MLP, no per-layer config lists.

llama.cpp's ``llama`` loader (Llama and Mistral GGUFs alike) calls no ``load_swa_pattern`` (checked in
the llama.cpp of llama-cpp-python 0.3.36): it has no sliding layers, so ``llama_cpp_swa_period`` is 0
and a GGUF's sliding-window pattern, if any, is never read.
"""

from __future__ import annotations

from .base import ArchAdapter

__all__ = ["LLAMA", "MISTRAL"]

LLAMA = ArchAdapter(
    family="llama",
    hf_architectures=("LlamaForCausalLM",),
    model_type="llama",
    gguf_arch="llama",
    gguf_permute_qk=True,
)

MISTRAL = ArchAdapter(
    family="mistral",
    hf_architectures=("MistralForCausalLM",),
    model_type="mistral",
    gguf_arch="llama",  # llama.cpp converts Mistral checkpoints to its llama architecture
    per_layer_keys=("layer_types",),
    gguf_permute_qk=True,
    llama_cpp_full_attention=True,
)
