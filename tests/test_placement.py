"""Blocks spread over several GPUs: accelerate's plan on faked devices, and the moves of a block's inputs.

No test here runs on a GPU: CUDA is faked (what torch reports), so the plan is checked, not the copies.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from rmexport.arch import ADAPTERS
from rmexport.calib.engine import _moved
from rmexport.calib.placement import place_blocks

from .tiny import tiny_config


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _meta_blocks(family: str = "llama") -> torch.nn.ModuleList:
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(tiny_config(family, 300))
    return ADAPTERS[family].blocks(model)


def _block_bytes(blocks, dtype=torch.bfloat16) -> int:
    return sum(p.numel() for p in blocks[0].parameters()) * torch.tensor([], dtype=dtype).element_size()


def test_blocks_are_spread_in_order_over_the_gpus_and_never_split(two_gpus):
    blocks = _meta_blocks()
    size = _block_bytes(blocks)
    placed = place_blocks(blocks, {0: 10 * size, 1: 10 * size}, torch.bfloat16, reserved=0)
    assert placed is not None and len(placed) == len(blocks)
    indices = [d.index for d in placed]
    assert set(indices) == {0, 1} and indices == sorted(indices)  # contiguous: 0 ... 0 1 ... 1
    assert all(d.type == "cuda" for d in placed)


def test_what_the_first_gpu_keeps_moves_blocks_to_the_others(two_gpus):
    blocks = _meta_blocks()
    size = _block_bytes(blocks)
    light = place_blocks(blocks, {0: 10 * size, 1: 10 * size}, torch.bfloat16, reserved=0)
    heavy = place_blocks(blocks, {0: 10 * size, 1: 10 * size}, torch.bfloat16, reserved=8 * size)
    on_first = [sum(d.index == 0 for d in p) for p in (light, heavy)]
    assert on_first[1] < on_first[0]


def test_blocks_that_do_not_fit_on_the_gpus_are_not_placed(two_gpus):
    blocks = _meta_blocks()
    size = _block_bytes(blocks)
    assert place_blocks(blocks, {0: 2 * size, 1: 2 * size}, torch.bfloat16, reserved=0) is None
    assert place_blocks(blocks, {0: 100 * size}, torch.bfloat16, reserved=0) is None  # one GPU: no plan


def test_a_blocks_inputs_are_moved_whatever_their_nesting():
    cos, sin, mask = torch.ones(2, 3), torch.zeros(2, 3), torch.ones(1, 1, 3, 3, dtype=torch.bool)
    kwargs = {"position_embeddings": (cos, sin), "attention_mask": mask, "use_cache": False, "extra": [mask]}
    moved = _moved(kwargs, torch.device("meta"))
    assert moved["position_embeddings"][0].device.type == "meta" and isinstance(
        moved["position_embeddings"], tuple
    )
    assert moved["attention_mask"].device.type == "meta" and moved["attention_mask"].dtype == torch.bool
    assert moved["extra"][0].device.type == "meta" and moved["use_cache"] is False
    assert kwargs["attention_mask"].device.type == "cpu"  # the recorded arguments stay where they were
