import pytest
import torch
from transformers import AutoModelForCausalLM

from rmexport.arch import ADAPTERS, adapter_for
from rmexport.errors import UnsupportedArchitectureError

from .conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_modules(family, tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[family])
    adapter = adapter_for(model.config)
    assert adapter is ADAPTERS[family]
    blocks = adapter.blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == 8
    down = adapter.down_proj_module(blocks[0])
    assert isinstance(down, torch.nn.Linear)
    assert down.weight.shape == (64, 128)
    assert adapter.dense_fold == (family not in ("gemma2", "gemma3"))


def test_unknown_architecture_lists_supported():
    class Cfg:
        architectures = ["FalconForCausalLM"]
        model_type = "falcon"

    with pytest.raises(UnsupportedArchitectureError) as err:
        adapter_for(Cfg())
    assert "LlamaForCausalLM" in err.value.hint


def _config(**fields):
    from types import SimpleNamespace

    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=8, head_dim=16, layer_types=None)
    return SimpleNamespace(**(base | fields))


def test_runtime_facts_are_declared_by_the_adapters():
    """The converters read these instead of testing family names; the values are the ones the
    converters hard-coded before (rope permutation for llama.cpp's llama arch, optimum's gemma2 gap)."""
    assert [f for f, a in ADAPTERS.items() if a.gguf_permute_qk] == ["llama", "mistral"]
    assert all(a.gguf_permute_qk == (a.gguf_arch == "llama") for a in ADAPTERS.values())
    assert [f for f, a in ADAPTERS.items() if a.optimum_runtime_gap] == ["gemma2"]
    assert [f for f, a in ADAPTERS.items() if a.genai_layer_types(6) is not None] == ["gemma2", "gemma3"]
    sliding, full = "sliding_attention", "full_attention"
    assert ADAPTERS["gemma2"].genai_layer_types(4) == [full, sliding, full, sliding]
    assert ADAPTERS["gemma3"].genai_layer_types(7) == [sliding] * 5 + [full, sliding]
    assert ADAPTERS["gemma3"].llama_cpp_layer_types(7) == [sliding] * 5 + [full, sliding]
    assert ADAPTERS["llama"].llama_cpp_layer_types(7) is None


def test_llama_cpp_refusals_live_in_the_adapters():
    gemma2, qwen2 = ADAPTERS["gemma2"], ADAPTERS["qwen2"]
    assert gemma2.llama_cpp_problem(_config(query_pre_attn_scalar=16)) is None
    assert "query_pre_attn_scalar is 12" in gemma2.llama_cpp_problem(_config(query_pre_attn_scalar=12))
    # At the 27B block count llama.cpp scales by hidden/heads (64/4 = 16 here, head_dim 8).
    big = _config(num_hidden_layers=46, head_dim=8, query_pre_attn_scalar=16)
    assert gemma2.llama_cpp_problem(big) is None
    assert gemma2.llama_cpp_problem(_config(head_dim=8, query_pre_attn_scalar=16)) is not None
    assert "softcapping" in ADAPTERS["gemma3"].llama_cpp_problem(_config(attn_logit_softcapping=50.0))
    assert gemma2.llama_cpp_problem(_config(attn_logit_softcapping=50.0)) is None
    windowed = _config(use_sliding_window=True, layer_types=["full_attention", "sliding_attention"])
    assert "no sliding-window" in qwen2.llama_cpp_problem(windowed)
    assert qwen2.llama_cpp_problem(_config(use_sliding_window=False)) is None
    assert ADAPTERS["llama"].llama_cpp_problem(windowed) is None
