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
