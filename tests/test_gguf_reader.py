"""GGUFCheckpointReader: a GGUF file read one tensor at a time under Hugging Face names, checked
against the HF checkpoint it was written from (f32: exact) and against transformers' own GGUF
dequantization (quantized files), on tiny models of every family and on the real default model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from converters.gguf_export import export_gguf
from rmexport.arch import ADAPTERS
from rmexport.calib.gguf_reader import (
    GGUFCheckpointReader,
    config_from_gguf,
    gguf_block_bytes,
    gguf_model_bytes,
    read_gguf_facts,
)
from rmexport.calib.weights import CheckpointReader, model_bytes, tensors_under
from rmexport.errors import ModelLoadError
from rmexport.models import DEFAULT_MODEL, resolve

from .conftest import FAMILIES


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reader-gguf")
    return {f: export_gguf(tiny_checkpoints[f], root / f"{f}-f32.gguf", "f32") for f in FAMILIES}


@pytest.fixture(scope="module")
def default_reader() -> GGUFCheckpointReader:
    reader = GGUFCheckpointReader(resolve(DEFAULT_MODEL).location)
    yield reader
    reader.close()


def _is_gemma_norm(family: str, name: str) -> bool:
    return ADAPTERS[family].norm_weight_offset != 0 and name.endswith("norm.weight")


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_reads_back_exactly_as_the_checkpoint_it_came_from(family, tiny_ggufs, tiny_checkpoints):
    reader = GGUFCheckpointReader(tiny_ggufs[family])
    source = CheckpointReader(tiny_checkpoints[family])
    # Same tensor names; a tied lm_head is absent from both.
    assert sorted(reader.names()) == sorted(source.names())
    assert ("lm_head.weight" in reader.names()) == (not reader.facts.tied_embeddings)
    for name in source.names():
        got, want = reader.get(name), source.get(name).float()
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        if _is_gemma_norm(family, name):
            # Stored as 1 + w in float32: subtracting the 1 again rounds in the last bits.
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got, want), f"{family}: {name} differs"
    assert reader.arch == ADAPTERS[family].gguf_arch and reader.block_count == 8
    reader.close()


def test_quantized_gguf_matches_transformers_dequantization(tiny_checkpoints, tmp_path):
    """q8_0 of the llama family: quantized weights and the q/k rotary permutation both undone."""
    from transformers import AutoModelForCausalLM

    path = export_gguf(tiny_checkpoints["llama"], tmp_path / "llama-q8_0.gguf", "q8_0")
    reader = GGUFCheckpointReader(path)
    assert reader.facts.tensor_types.get("Q8_0", 0) >= 8 * 7
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    state = model.state_dict()
    for name in reader.names():
        assert torch.equal(reader.get(name), state[name]), name
    # And the dequantized weights are close to the float originals (not some other layout).
    source = CheckpointReader(tiny_checkpoints["llama"])
    q = "model.layers.3.self_attn.q_proj.weight"
    assert (reader.get(q) - source.get(q)).abs().max() < 0.02 * source.get(q).abs().max()


def test_default_model_matches_transformers_dequantization(default_reader, default_checkpoint):
    """The default model's Q4_1 file against transformers' dequantization of it (cached as HF)."""
    source = CheckpointReader(default_checkpoint)
    assert sorted(default_reader.names()) == sorted(source.names())
    assert "lm_head.weight" not in default_reader.names()  # tied: no output.weight in the file
    for name in source.names():
        assert torch.equal(default_reader.get(name), source.get(name).float()), name


def test_reading_one_block_reads_nothing_else(default_reader):
    reader = default_reader
    reader.reset_counters()
    block = dict(tensors_under(reader, "model.layers.7"))
    assert len(block) == 9 and "mlp.down_proj.weight" in block
    infos = [reader.info(f"model.layers.7.{n}") for n in block]
    assert reader.tensors_read == 9
    assert reader.bytes_dequantized == gguf_block_bytes(reader, 7) == sum(4 * i.numel for i in infos)
    assert reader.bytes_read == sum(i.n_bytes for i in infos)
    assert {i.block for i in infos} == {7}
    # The whole model would be ~30x that.
    assert reader.bytes_dequantized < 0.05 * sum(4 * reader.info(n).numel for n in reader.names())


def test_config_from_gguf(default_reader, tiny_ggufs, tiny_checkpoints):
    cfg = default_reader.config
    assert cfg.architectures == ["LlamaForCausalLM"] and cfg.num_hidden_layers == 30
    assert cfg.tie_word_embeddings and cfg.hidden_size == 576
    gemma = config_from_gguf(tiny_ggufs["gemma3"])
    assert gemma.model_type == "gemma3_text" and gemma.architectures == ["Gemma3ForCausalLM"]
    facts = read_gguf_facts(tiny_ggufs["qwen2"])
    assert (facts.arch, facts.block_count, facts.tensor_types) == ("qwen2", 8, {"F32": len(facts.tensors)})
    assert gguf_model_bytes(tiny_ggufs["qwen2"]) == model_bytes(tiny_checkpoints["qwen2"])


def test_unknown_tensor_name_and_truncated_file_are_load_errors(tiny_ggufs, tmp_path):
    reader = GGUFCheckpointReader(tiny_ggufs["qwen2"])
    with pytest.raises(ModelLoadError, match="missing"):
        reader.get("model.layers.99.mlp.down_proj.weight")
    data = tiny_ggufs["qwen2"].read_bytes()
    for name, content in (("cut.gguf", data[: int(len(data) * 0.7)]), ("junk.gguf", b"GGUF" + b"\xff" * 64)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelLoadError) as err:
            GGUFCheckpointReader(tmp_path / name)
        assert err.value.exit_code == 2 and err.value.hint
