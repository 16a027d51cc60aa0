"""write_pruned_gguf: a pruned GGUF written straight from a quantized GGUF, checked in the real llama.cpp.

On the default model's Q4_1 file (blocks [12, 20) removed, a random near-identity map folded into
block 11): untouched tensors are byte-identical, the folded tensor is written in Q8_0 (its source
type, Q4_1, has fewer bits) within Q8_0's error of Tᵀ·W, the metadata is the source's with the block
count changed, and llama.cpp's logits agree with the dequantized PyTorch model pruned the same way as
closely as they agree on the unpruned model. Tiny models cover K-quant sources (the fold in Q8_0,
llama.cpp's own quantizer byte for byte), Gemma's norm fold and per-layer arrays, exactness in f32,
and broken inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from converters.ggml_quant import quantize_like
from converters.gguf_export import export_gguf
from converters.gguf_metadata import read_metadata
from converters.gguf_prune import (
    BlockCount,
    FileSizes,
    GGUFPrune,
    TensorWrite,
    folded_type,
    write_pruned_gguf,
)
from rmexport import llamacpp as llama_cpp_tools
from rmexport.arch import ADAPTERS
from rmexport.calib.gguf_reader import GGUFCheckpointReader
from rmexport.errors import ConfigError, ModelLoadError
from rmexport.fileio import read_gguf_header
from rmexport.fold import fold_map
from rmexport.models import DEFAULT_MODEL, resolve
from rmexport.replaceme.apply import remove_blocks

from .tiny import tiny_config, tiny_tokenizer

CUT = (12, 20)
FOLD_BLOCK = CUT[0] - 1
PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. From the top he could "
    "see the fishing boats returning to the harbour, their lanterns swaying in the wind, while gulls "
    "circled above the breaking waves and the town lights came on one by one."
)


def _near_identity(d: int, seed: int = 0, scale: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(d) + scale * torch.randn(d, d, generator=g) / d**0.5


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _sha(t: gguf.ReaderTensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()


def _dequantized(t: gguf.ReaderTensor) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- the default model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_gguf() -> Path:
    return Path(resolve(DEFAULT_MODEL).location)


@pytest.fixture(scope="module")
def pruned_default(default_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-prune") / "pruned.gguf"
    transform = _near_identity(576)
    kept = [i for i in range(30) if not CUT[0] <= i < CUT[1]]
    record = write_pruned_gguf(default_gguf, out, kept, {FOLD_BLOCK: [transform]}, dense_fold=True)
    return out, record, transform, kept


@pytest.fixture(scope="module")
def default_readers(default_gguf, pruned_default) -> tuple[gguf.GGUFReader, gguf.GGUFReader]:
    """Parsed once: the header of a 49k-token vocabulary takes seconds to read."""
    return gguf.GGUFReader(str(default_gguf)), gguf.GGUFReader(str(pruned_default[0]))


def _by_name(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def test_our_header_reader_agrees_with_gguf_py(default_readers):
    """fileio.read_gguf_header against gguf-py's GGUFReader: every key's value and types, every
    tensor's type, shape, offset and size, on the source and on the pruned file."""
    for reader in default_readers:
        header = read_gguf_header(reader.data.filename, strings=True)
        fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert list(header.metadata) == list(fields)
        for key, field in fields.items():
            assert header.metadata[key] == field.contents(), key
            item_type = int(field.types[-1]) if field.types[0] == gguf.GGUFValueType.ARRAY else None
            assert header.value_types[key] == (int(field.types[0]), item_type), key
        assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
        for ours, theirs in zip(header.tensors, reader.tensors, strict=True):
            assert ours.qtype == theirs.tensor_type and ours.offset == theirs.data_offset
            assert ours.shape == tuple(int(d) for d in reversed(theirs.shape.tolist()))
            assert ours.n_bytes == theirs.n_bytes
        assert read_gguf_header(reader.data.filename).metadata["tokenizer.ggml.tokens"] is None  # not decoded


def test_untouched_tensors_are_byte_identical(default_readers, pruned_default):
    _, record, _, kept = pruned_default
    source, pruned = (_by_name(r) for r in default_readers)
    assert len(pruned) == len(source) - 8 * 9
    new_index = {old: new for new, old in enumerate(kept)}
    folded = f"blk.{FOLD_BLOCK}.ffn_down.weight"
    checked = 0
    for name, t in source.items():
        parts = name.split(".")
        if parts[0] == "blk":
            old = int(parts[1])
            if old not in new_index:
                continue
            new_name = ".".join(["blk", str(new_index[old]), *parts[2:]])
        else:
            new_name = name
        got = pruned[new_name]
        assert list(got.shape) == list(t.shape), new_name
        if name == folded:
            assert got.tensor_type == gguf.GGMLQuantizationType.Q8_0 != t.tensor_type
            continue
        assert got.tensor_type == t.tensor_type, new_name
        assert _sha(got) == _sha(t), f"{new_name} (from {name}) changed"
        checked += 1
    assert checked == len(pruned) - 1 == record.copied and record.requantized == 1
    assert record.dropped == 72 and record.type_changed == {folded: "Q8_0"}
    assert record.folded[folded].source_type == "Q4_1"
    assert record.tensors["blk.12.attn_q.weight"].to_json() == {
        "source": "blk.20.attn_q.weight",
        "action": "copied",
        "type": "Q4_1",
    }


def test_folded_tensor_is_q8_0_within_q8_0_error(default_readers, pruned_default):
    _, record, transform, _ = pruned_default
    name = f"blk.{FOLD_BLOCK}.ffn_down.weight"
    src, got = (_by_name(r)[name] for r in default_readers)
    assert src.tensor_type == gguf.GGMLQuantizationType.Q4_1
    assert got.tensor_type == gguf.GGMLQuantizationType.Q8_0
    w = _dequantized(src)  # [576, 1536]: transformers' W_down
    target = transform.double().numpy().T @ w
    approx = _dequantized(got)
    # Q8_0: per block of 32, scale d = max|x|/127 in fp16; rounding error <= d/2, plus up to 127
    # times the fp16 rounding of d (2^-11 relative).
    blocks = target.reshape(-1, 32)
    d = np.abs(blocks).max(1) / 127
    bound = d * (0.5 + 127 * 2.0**-11) * 1.01 + 1e-7
    err = np.abs(approx.reshape(-1, 32) - blocks).max(1)
    assert (err <= bound).all(), f"{(err > bound).sum()} blocks exceed Q8_0's rounding bound"
    rel = np.linalg.norm(approx - target) / np.linalg.norm(target)
    assert rel == pytest.approx(record.folded[name].relative_error, rel=1e-6)
    # Far below what the source's own type would have given the same weights.
    in_q4_1 = quantize_like(target.astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    back = np.asarray(gguf.quants.dequantize(in_q4_1.data, in_q4_1.qtype), dtype=np.float64)
    assert rel < 0.25 * np.linalg.norm(back.reshape(target.shape) - target) / np.linalg.norm(target)
    # The fold is really there: the stored weight is much closer to Tᵀ·W than to W.
    assert np.linalg.norm(approx - target) < 0.7 * np.linalg.norm(approx - w)
    assert record.folded[name].quantizer == "gguf-py"


def test_metadata_is_the_sources_with_the_block_count_sliced(default_gguf, pruned_default):
    out, record, _, _ = pruned_default
    before, after = read_metadata(str(default_gguf)), read_metadata(str(out))
    assert list(after) == list(before)  # same keys, same order
    for key, kv in before.items():
        if key == "llama.block_count":
            assert after[key].value == 22 and after[key].vtype == kv.vtype
        else:
            assert after[key] == kv, key
    assert record.block_count == BlockCount(before=30, after=22)


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    q = torch.log_softmax(torch.from_numpy(got).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_llama_cpp_runs_the_pruned_file_like_the_pruned_pytorch_model(
    default_gguf, default_readers, pruned_default, default_checkpoint
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, transform, _ = pruned_default
    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"][:48]
    model = AutoModelForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32).eval()
    adapter = ADAPTERS["llama"]

    def torch_logits() -> np.ndarray:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()

    def llama_logits(path: Path) -> np.ndarray:
        with llama_cpp_tools.open_model(path, n_ctx=64, n_threads=2, logits_all=True) as llm:
            return llama_cpp_tools.eval_logits(llm, ids)

    base_ref, base_got = torch_logits(), llama_logits(default_gguf)
    remove_blocks(model, adapter, CUT)
    plain_ref = torch_logits()
    down_proj = adapter.down_proj_module(model.model.layers[FOLD_BLOCK])
    fold_map(adapter, model.model.layers[FOLD_BLOCK], transform)
    exact_ref, got = torch_logits(), llama_logits(out)
    # The same model carrying the stored (requantized) folded weight instead of the exact Tᵀ·W.
    stored = _dequantized(_by_name(default_readers[1])[f"blk.{FOLD_BLOCK}.ffn_down.weight"])
    down_proj.weight.data.copy_(torch.from_numpy(stored.astype(np.float32)))
    stored_ref = torch_logits()

    base_kl, stored_kl = _kl(base_ref, base_got), _kl(stored_ref, got)
    base_top1 = float((base_ref.argmax(-1) == base_got.argmax(-1)).mean())
    stored_top1 = float((stored_ref.argmax(-1) == got.argmax(-1)).mean())
    # llama.cpp runs Q4_1 matmuls with 8-bit activations: that is its error on the unpruned file.
    # The pruned file adds nothing to it: llama.cpp computes exactly the model the file describes.
    assert stored_kl <= 2 * base_kl + 1e-3, (stored_kl, base_kl)
    assert stored_top1 >= base_top1 - 0.1, (stored_top1, base_top1)
    # Against the exact fold, the only further error is Q8_0's own on the one rewritten tensor.
    requant_kl, exact_kl = _kl(exact_ref, stored_ref), _kl(exact_ref, got)
    assert exact_kl <= 2 * (base_kl + requant_kl) + 1e-3, (exact_kl, base_kl, requant_kl)
    # And llama.cpp runs the fold: it matches the folded model far better than the unfolded one.
    assert exact_kl < 0.5 * _kl(plain_ref, got)


# --- tiny models: exactness, Gemma, per-layer arrays, bad requests -------------------------------
def _pruned_hf_model(checkpoint: Path, family: str, cut: tuple[int, int], fold_block: int, transform):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    adapter = ADAPTERS[family]
    fold_map(adapter, adapter.blocks(model)[fold_block], transform)
    remove_blocks(model, adapter, cut)
    return model


@pytest.mark.parametrize(
    ("family", "transform"),
    [
        ("llama", _near_identity(64, seed=1, scale=0.3)),
        ("llama", 0.1 * torch.randn(128, 64, dtype=torch.float64)),  # a map of the hidden activations
        ("gemma2", 1 + 0.2 * torch.randn(64)),
    ],
)
def test_f32_prune_equals_pruning_the_hf_model(family, transform, tiny_checkpoints, tmp_path):
    """f32 GGUF -> write_pruned_gguf -> read back == transformers model folded and cut by apply.py."""
    cut = (2, 4)
    src = export_gguf(tiny_checkpoints[family], tmp_path / "src.gguf", "f32")
    kept = [i for i in range(8) if not cut[0] <= i < cut[1]]
    adapter = ADAPTERS[family]
    record = write_pruned_gguf(
        src, tmp_path / "out.gguf", kept, {1: [transform]}, dense_fold=adapter.dense_fold
    )
    folded = "blk.1.ffn_down.weight" if adapter.dense_fold else "blk.1.post_ffw_norm.weight"
    assert list(record.folded) == [folded] and record.folded[folded].relative_error < 1e-6
    model = _pruned_hf_model(tiny_checkpoints[family], family, cut, 1, transform)
    reader = GGUFCheckpointReader(tmp_path / "out.gguf")
    assert reader.block_count == 6 and reader.config.num_hidden_layers == 6
    state = model.state_dict()
    for name in reader.names():
        torch.testing.assert_close(reader.get(name), state[name], rtol=0, atol=1e-6, msg=name)
    if family == "gemma2":
        before = read_metadata(str(src))["gemma2.attention.sliding_window_pattern"].value
        after = read_metadata(str(tmp_path / "out.gguf"))["gemma2.attention.sliding_window_pattern"].value
        assert len(before) == 8 and after == [before[i] for i in kept]


def test_bad_requests_are_refused_before_writing(tiny_checkpoints, tmp_path):
    src = export_gguf(tiny_checkpoints["gemma3"], tmp_path / "g3.gguf", "f32")
    out = tmp_path / "out.gguf"
    with pytest.raises(ConfigError, match="removed"):
        write_pruned_gguf(src, out, [0, 1, 2, 3, 4, 5], {7: [torch.ones(64)]}, dense_fold=False)
    with pytest.raises(ConfigError, match="diagonal"):
        write_pruned_gguf(src, out, list(range(8)), {1: [_near_identity(64)]}, dense_fold=False)
    with pytest.raises(ConfigError, match="outside"):
        write_pruned_gguf(src, out, [0, 9], {}, dense_fold=False)
    assert not out.exists() and _leftovers(tmp_path) == []


# --- K-quants: llama.cpp's own quantizer ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_k_quant(builtin_corpus, tmp_path_factory):
    """A 4-block llama with hidden 256 / intermediate 512 (K-quant rows), as f32 and Q4_K_M GGUF."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("kquant")
    tokenizer = tiny_tokenizer(builtin_corpus.pool[:300])
    cfg = tiny_config("llama", len(tokenizer))
    cfg.update(dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, head_dim=64))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    f32 = export_gguf(root / "hf", root / "f32.gguf", "f32")
    q4km = root / "q4_k_m.gguf"
    llama_cpp_tools.quantize(f32, q4km, "q4_k_m", n_threads=1)
    return f32, q4km


def test_folded_type_is_at_least_q8_0_for_a_dense_fold_only():
    Q = gguf.GGMLQuantizationType
    for source, dense in [(Q.Q4_1, Q.Q8_0), (Q.Q4_K, Q.Q8_0), (Q.Q6_K, Q.Q8_0), (Q.IQ4_NL, Q.Q8_0)]:
        assert folded_type(source, dense=True) == dense, source
    for kept in (Q.Q8_0, Q.F16, Q.BF16, Q.F32):
        assert folded_type(kept, dense=True) == kept
    for norm in (Q.Q4_1, Q.Q6_K, Q.F32):  # Gemma's folded norm weight keeps its type
        assert folded_type(norm, dense=False) == norm


def test_k_quant_fold_is_written_in_q8_0(tiny_k_quant, tmp_path):
    f32, q4km = tiny_k_quant
    name = "blk.1.ffn_down.weight"
    source = _tensors(q4km)
    qtype = source[name].tensor_type
    assert qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K)
    transform = _near_identity(256, seed=2)
    record = write_pruned_gguf(q4km, tmp_path / "out.gguf", [0, 1, 3], {1: [transform]}, dense_fold=True)
    assert record.type_changed == {name: "Q8_0"} and record.folded[name].source_type == qtype.name
    assert record.folded[name].quantizer == "gguf-py"
    pruned = _tensors(tmp_path / "out.gguf")
    assert pruned[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert pruned["blk.2.ffn_down.weight"].tensor_type == source["blk.3.ffn_down.weight"].tensor_type
    assert _sha(pruned["blk.2.ffn_down.weight"]) == _sha(source["blk.3.ffn_down.weight"])
    # Error of the stored fold, against the source type's error on the original float weights and
    # against the same fold requantized to the source's K-quant by llama.cpp's quantizer.
    w_float = _dequantized(_tensors(f32)[name])
    w_src = _dequantized(source[name])
    source_error = np.linalg.norm(w_src - w_float) / np.linalg.norm(w_float)
    target = transform.double().numpy().T @ w_src
    fold_error = np.linalg.norm(_dequantized(pruned[name]) - target) / np.linalg.norm(target)
    in_k = quantize_like(target.astype(np.float32), qtype, name=name)
    assert in_k.quantizer == "llama.cpp" and in_k.qtype == qtype
    k_back = np.asarray(gguf.quants.dequantize(in_k.data, qtype), dtype=np.float64).reshape(target.shape)
    k_error = np.linalg.norm(k_back - target) / np.linalg.norm(target)
    assert k_error < 1.5 * source_error, (k_error, source_error)
    assert fold_error < 0.5 * min(k_error, source_error), (fold_error, k_error, source_error)
    with llama_cpp_tools.open_model(tmp_path / "out.gguf", n_ctx=32, n_threads=1, logits_all=True) as llm:
        logits = llama_cpp_tools.eval_logits(llm, [1, 5, 9, 17, 33])
    assert np.isfinite(logits).all() and logits.std() > 0


def test_our_k_quant_is_llama_quantize_byte_for_byte(tiny_k_quant):
    """ggml_quantize_chunk as we call it writes what llama.cpp's quantizer wrote for the same floats."""
    f32, q4km = tiny_k_quant
    floats, quantized = _tensors(f32), _tensors(q4km)
    for name in ("blk.0.ffn_down.weight", "blk.1.ffn_gate.weight"):
        t = quantized[name]
        ours = quantize_like(np.asarray(floats[name].data), t.tensor_type, name=name)
        assert ours.quantizer == "llama.cpp"
        assert ours.data.tobytes() == np.ascontiguousarray(t.data).tobytes(), name


def test_a_type_that_cannot_be_produced_falls_back_and_says_so(caplog):
    rows = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    q = quantize_like(rows, gguf.GGMLQuantizationType.IQ2_XXS, name="w")  # needs an importance matrix
    assert q.qtype == gguf.GGMLQuantizationType.Q2_K and "IQ2_XXS cannot be produced" in caplog.text
    # 96 % 256 != 0: the 4.5-bit type with 32-wide blocks that llama.cpp itself falls back to.
    q = quantize_like(rows[:, :96], gguf.GGMLQuantizationType.Q4_K, name="narrow")
    assert q.qtype == gguf.GGMLQuantizationType.IQ4_NL
    back = gguf.quants.dequantize(q.data, q.qtype)
    assert np.abs(back - rows[:, :96]).max() < 0.5


def test_truncated_or_corrupt_gguf_is_exit_2_and_leaves_nothing(tiny_k_quant, tmp_path):
    data = tiny_k_quant[1].read_bytes()
    cases = {"truncated.gguf": data[: len(data) * 3 // 5], "corrupt.gguf": b"GGUF" + os.urandom(4096)}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, content in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        target = out_dir / f"pruned-{name}"
        with pytest.raises(ModelLoadError) as err:
            write_pruned_gguf(bad, target, [0, 1, 2], {}, dense_fold=True)
        assert err.value.exit_code == 2 and err.value.hint
        assert not target.exists() and list(out_dir.iterdir()) == []


def test_pruned_file_can_be_pruned_again(tiny_k_quant, tmp_path):
    """The output is an ordinary GGUF: valid offsets and alignment, readable by our own reader."""
    _, q4km = tiny_k_quant
    first = write_pruned_gguf(q4km, tmp_path / "a.gguf", [0, 1, 2], {}, dense_fold=True)
    second = write_pruned_gguf(tmp_path / "a.gguf", tmp_path / "b.gguf", [0, 2], {}, dense_fold=True)
    assert first.requantized == second.requantized == 0
    a, b = _tensors(tmp_path / "a.gguf"), _tensors(tmp_path / "b.gguf")
    assert _sha(b["blk.1.attn_v.weight"]) == _sha(a["blk.2.attn_v.weight"])
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_prune_record_round_trips_through_json_with_its_keys():
    copied = TensorWrite(source="blk.20.attn_q.weight", action="copied", type="Q4_1")
    folded = TensorWrite(
        source="blk.11.ffn_down.weight",
        action="requantized",
        source_type="Q4_1",
        type="Q8_0",
        quantizer="gguf-py",
        relative_error=0.004,
    )
    record = GGUFPrune(
        source="/models/x-q4_1.gguf",
        output="/runs/x/x-q4_1.gguf",
        arch="llama",
        block_count=BlockCount(before=30, after=22),
        kept_blocks=[*range(12), *range(20, 30)],
        copied=1,
        requantized=1,
        type_changed={"blk.11.ffn_down.weight": "Q8_0"},
        dropped=72,
        folded={"blk.11.ffn_down.weight": folded},
        tensors={"blk.12.attn_q.weight": copied, "blk.11.ffn_down.weight": folded},
        size_bytes=FileSizes(source=1000, output=800),
        seconds=1.5,
    )
    data = json.loads(json.dumps(record.to_json()))
    assert list(data) == [
        "source", "output", "arch", "block_count", "kept_blocks", "copied", "requantized", "type_changed",
        "dropped", "folded", "tensors", "size_bytes", "seconds",
    ]  # fmt: skip
    assert data["tensors"]["blk.12.attn_q.weight"] == {
        "source": "blk.20.attn_q.weight",
        "action": "copied",
        "type": "Q4_1",
    }
    assert list(data["folded"]["blk.11.ffn_down.weight"]) == [
        "source", "action", "source_type", "type", "quantizer", "relative_error"
    ]  # fmt: skip
    assert data["block_count"] == {"before": 30, "after": 22} and data["size_bytes"] == {
        "source": 1000,
        "output": 800,
    }
    assert GGUFPrune.from_json(data) == record
