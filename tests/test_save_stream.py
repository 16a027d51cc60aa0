"""Checkpoints are written one tensor at a time, as standard safetensors files transformers loads."""

import json
import shutil
import struct
import weakref

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rmexport.calib.weights import CheckpointReader, write_safetensors, write_shards


def _items(tensors: dict[str, torch.Tensor]):
    return [(name, t.numel() * 4, lambda t=t: t.clone()) for name, t in tensors.items()]


def test_every_dtype_and_shape_reads_back_exactly(tmp_path):
    tensors = {
        "a.weight": torch.randn(5, 7),
        "b.bias": torch.randn(3).to(torch.bfloat16),
        "c": torch.arange(4),
        "d": torch.randn(2, 3).half(),
        "scalar": torch.tensor(3.0, dtype=torch.float64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "deep": torch.randn((1,) * 60),  # a header entry longer than the room left for it
    }
    sizes = write_safetensors(tmp_path / "x.safetensors", _items(tensors))
    assert sizes == {k: t.numel() * t.element_size() for k, t in tensors.items()}
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert raw[8:9] == b"{" and (8 + n) % 8 == 0
    assert len(raw) == 8 + n + sum(sizes.values())  # no hole and nothing after the data


def test_the_header_reserve_is_padding_only(tmp_path):
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(3, 2) for i in range(20)}
    write_safetensors(tmp_path / "x.safetensors", _items(tensors))
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n].decode()
    assert json.loads(header)["__metadata__"] == {"format": "pt"}
    assert header.rstrip(" ") == header.rstrip() and header.rstrip().endswith("}")


def test_only_one_produced_tensor_is_alive_at_a_time(tmp_path):
    alive: list[weakref.ref] = []

    def producer(i):
        def produce():
            assert all(ref() is None for ref in alive), "an earlier tensor is still held"
            t = torch.full((64, 64), float(i))
            alive.append(weakref.ref(t))
            return t

        return produce

    items = [(f"t{i}", 64 * 64 * 4, producer(i)) for i in range(6)]
    total = write_shards(items, tmp_path, max_shard_bytes=3 * 64 * 64 * 4)
    assert total == 6 * 64 * 64 * 4
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    reader = CheckpointReader(tmp_path)
    for i in range(6):
        assert torch.equal(reader.get(f"t{i}"), torch.full((64, 64), float(i)))


def test_a_sharded_rewrite_loads_in_transformers_with_the_same_logits(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["qwen2"]
    reader = CheckpointReader(source)
    items = [(n, reader.numel(n) * 4, lambda n=n: reader.get(n)) for n in reader.names()]
    target = tmp_path / "hf"
    target.mkdir()
    write_shards(items, target, max_shard_bytes=2**16, after_shard=reader.close)
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith("model"):
            shutil.copy2(item, target / item.name)
    assert len(list(target.glob("model-*-of-*.safetensors"))) > 1
    ids = torch.randint(3, 200, (1, 16))
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(source).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(target).eval()(ids).logits
    assert torch.equal(want, got)
