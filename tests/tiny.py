"""Tiny random checkpoints of every supported family, with a small real byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from rmexport.arch import ADAPTERS

TINY_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
SEQ_LEN = 32


def tiny_tokenizer(texts: list[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.pad_token = fast.eos_token
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return fast


def tiny_config(family: str, vocab_size: int):
    adapter = ADAPTERS[family]
    extra: dict = {}
    if family in ("gemma2", "gemma3"):
        extra = dict(sliding_window=16, query_pre_attn_scalar=16)
    if family == "mistral":
        extra = dict(sliding_window=None)
    cfg = AutoConfig.for_model(
        adapter.model_type,
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=family in ("gemma2", "gemma3"),
        **TINY_DIMS,
        **extra,
    )
    cfg.architectures = [adapter.hf_architectures[0]]
    return cfg


def make_tiny_checkpoint(family: str, path: Path, texts: list[str], seed: int = 0) -> Path:
    """Write a seeded random fp32 model of ``family`` and its tokenizer to ``path``."""
    tokenizer = tiny_tokenizer(texts)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32)
    # Random init leaves tiny residual updates; scale them up so blocks actually matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(4.0)
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
