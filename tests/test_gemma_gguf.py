"""Gemma 2/3 in llama.cpp at any cut: the GGUF carries the kept blocks' sliding-window pattern.

llama.cpp's Gemma loaders read ``{arch}.attention.sliding_window_pattern`` as one bool per layer and
derive the pattern from the layer index only when a file has none. Tiny models with
``sliding_window=16`` run over 48-token prompts, so a block that slides where PyTorch attends fully
(or the other way round) changes the logits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converters.gguf_export import export_gguf
from converters.gguf_metadata import read_metadata, runtime_problem, write_metadata
from converters.gguf_prune import write_pruned_gguf
from rmexport import llamacpp as llama_cpp_tools
from rmexport.arch import ADAPTERS
from rmexport.calib.gguf_reader import config_from_gguf
from rmexport.cli import main
from rmexport.errors import ExportError
from rmexport.fileio import read_gguf_header
from rmexport.replaceme.apply import remove_blocks
from validation.gguf_parity import compare_gguf

from .test_pipeline import assert_checks_passed

SLIDING, FULL = "sliding_attention", "full_attention"
# Cuts that move a later block's place in llama.cpp's index-derived pattern: Gemma 3 globals every
# 6th block (8 blocks: [s s s s s F s s]), Gemma 2 every 2nd ([s F s F s F s F]).
CUTS = {"gemma3": (2, 4), "gemma2": (2, 3)}
PARITY = dict(n_prompts=2, max_tokens=48, new_tokens=8)
FAST = "--calib-samples 48 --seq-len 32 --eval-tokens 1024 --selection-samples 16".split()
FAST += "--min-rounds 3 --max-rounds 3 --threads 1".split()


def _pattern_key(family: str) -> str:
    return gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=ADAPTERS[family].gguf_arch)


def _without_key(source: Path, target: Path, key: str) -> Path:
    """A copy of an f32 GGUF without ``key``: what llama.cpp's own converter writes for Gemma 3."""
    meta = read_metadata(str(source))
    del meta[key]
    writer = gguf.GGUFWriter(str(target), meta["general.architecture"].value)
    write_metadata(writer, meta)
    for tensor in gguf.GGUFReader(str(source)).tensors:
        writer.add_tensor(tensor.name, tensor.data.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _pruned_checkpoint(checkpoint: Path, family: str, cut: tuple[int, int], out: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    remove_blocks(model, ADAPTERS[family], cut)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return out


@pytest.mark.parametrize("family", sorted(CUTS))
def test_a_cut_that_breaks_the_period_runs_in_llama_cpp_only_with_the_array(
    family, tiny_checkpoints, tmp_path
):
    cut = CUTS[family]
    pruned = _pruned_checkpoint(tiny_checkpoints[family], family, cut, tmp_path / "hf")
    layer_types = json.loads((pruned / "config.json").read_text())["layer_types"]
    adapter = ADAPTERS[family]
    assert layer_types != adapter.llama_cpp_layer_types(len(layer_types))  # the index rule is broken
    out = export_gguf(pruned, tmp_path / "pruned-f32.gguf", "f32")
    assert read_metadata(str(out))[_pattern_key(family)].value == [t == SLIDING for t in layer_types]
    with_array = compare_gguf(out, pruned, **PARITY)  # raises when out of the f32 tolerances
    assert with_array.passed and with_array.top1_agreement >= 0.995
    bare = _without_key(out, tmp_path / "no-array.gguf", _pattern_key(family))
    without = compare_gguf(bare, pruned, **PARITY, check=False)
    assert not without.passed and without.top1_agreement < 0.9
    assert without.mean_kl > 100 * with_array.mean_kl


def _raw_bytes(path: Path) -> dict[str, str]:
    header = read_gguf_header(path)
    data = path.read_bytes()
    return {t.name: hashlib.sha256(data[t.offset : t.offset + t.n_bytes]).hexdigest() for t in header.tensors}


@pytest.mark.parametrize("source_has_array", [True, False], ids=["array", "index-derived"])
def test_pruning_a_quantized_gemma3_gguf_writes_the_kept_pattern(
    source_has_array, tiny_checkpoints, tmp_path
):
    """Q8_0 by llama.cpp's own quantizer, from an f32 file with or without the array (llama.cpp's
    converter writes none for Gemma 3): the pruned file states the kept blocks' pattern, and every
    tensor but the folded norm is the source's, byte for byte."""
    key = _pattern_key("gemma3")
    f32 = export_gguf(tiny_checkpoints["gemma3"], tmp_path / "f32.gguf", "f32")
    if not source_has_array:
        f32 = _without_key(f32, tmp_path / "f32-bare.gguf", key)
    q8 = tmp_path / "q8_0.gguf"
    llama_cpp_tools.quantize(f32, q8, "q8_0", n_threads=1)
    assert (key in read_metadata(str(q8))) == source_has_array
    kept = [0, 1, 4, 5, 6, 7]
    scale = 1 + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    record = write_pruned_gguf(q8, tmp_path / "out.gguf", kept, {1: [scale]}, dense_fold=False)

    expected = [True, True, True, False, True, True]  # [s s | s F s s]: blocks 2, 3 removed
    assert read_metadata(str(tmp_path / "out.gguf"))[key].value == expected
    assert config_from_gguf(tmp_path / "out.gguf").layer_types == [SLIDING if s else FULL for s in expected]
    before, after = _raw_bytes(q8), _raw_bytes(tmp_path / "out.gguf")
    assert record.requantized == 1 and list(record.folded) == ["blk.1.post_ffw_norm.weight"]
    for name, entry in record.tensors.items():
        if entry.action == "copied":
            assert after[name] == before[entry.source], name
    assert record.copied == len(after) - 1 and record.dropped == len(before) - len(after)
    with llama_cpp_tools.open_model(tmp_path / "out.gguf", n_ctx=64, logits_all=True) as llm:
        logits = llama_cpp_tools.eval_logits(llm, list(range(3, 51)))
    assert logits.shape[0] == 48 and torch.isfinite(torch.from_numpy(logits)).all()


def test_which_llama_cpp_loaders_read_a_per_layer_pattern_is_declared():
    """Gemma 2/3 call load_swa_pattern (an array from llama-cpp-python 0.3.36 on); llama, qwen2 and
    qwen3 have no sliding layers in llama.cpp, so no pattern is written or needed."""
    readers = {f: (a.llama_cpp_swa_period, a.llama_cpp_swa_array_since) for f, a in ADAPTERS.items()}
    assert readers == {
        "gemma2": (2, "0.3.36"),
        "gemma3": (6, "0.3.36"),
        "llama": (0, None),
        "mistral": (0, None),
        "qwen2": (0, None),
        "qwen3": (0, None),
    }
    gemma3 = ADAPTERS["gemma3"]
    assert gemma3.llama_cpp_reads_swa_pattern("0.3.36") and gemma3.llama_cpp_reads_swa_pattern("0.4.0rc1")
    assert not gemma3.llama_cpp_reads_swa_pattern("0.3.35") and not gemma3.llama_cpp_reads_swa_pattern(None)
    assert gemma3.gguf_cut_sizes(26, "0.3.36") is None and gemma3.gguf_cut_sizes(26, "0.3.35") == [
        6,
        12,
        18,
        24,
    ]
    assert ADAPTERS["gemma2"].gguf_cut_sizes(8, "0.3.20") == [2, 4, 6]
    assert ADAPTERS["qwen2"].gguf_swa_pattern([SLIDING, FULL]) is None


def test_only_a_llama_cpp_that_cannot_read_the_array_is_refused(tiny_checkpoints, tmp_path):
    from transformers import AutoConfig

    pruned = _pruned_checkpoint(tiny_checkpoints["gemma3"], "gemma3", CUTS["gemma3"], tmp_path / "hf")
    config = AutoConfig.from_pretrained(pruned)
    adapter = ADAPTERS["gemma3"]
    assert runtime_problem(config, adapter, "0.3.36") is None
    problem = runtime_problem(config, adapter, "0.3.35")
    assert "0.3.35 derives gemma3's sliding/global layer pattern from the layer index" in problem
    assert "from llama-cpp-python 0.3.36 on" in problem
    whole_periods = _pruned_checkpoint(tiny_checkpoints["gemma3"], "gemma3", (1, 7), tmp_path / "hf6")
    assert runtime_problem(AutoConfig.from_pretrained(whole_periods), adapter, "0.3.35") is None
    with pytest.raises(ExportError, match="0.3.36"):
        q8 = export_gguf(tiny_checkpoints["gemma3"], tmp_path / "q8.gguf", "q8_0")
        write_pruned_gguf(
            q8, tmp_path / "out.gguf", [0, 1, 4, 5, 6, 7], {}, dense_fold=False, llama_cpp_version="0.3.35"
        )
    assert not (tmp_path / "out.gguf").exists()


def test_an_old_llama_cpp_is_refused_before_any_work(capsys, tmp_path, tiny_checkpoints, monkeypatch):
    """The installed llama-cpp-python's version is what the refusal reads (llama.cpp itself is real)."""
    monkeypatch.setattr(llama_cpp_tools, "installed_version", lambda: "0.3.35")
    code = main(["run", str(tiny_checkpoints["gemma3"]), "--out-root", str(tmp_path), "--layers", "2", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "llama-cpp-python 0.3.35 derives gemma3's" in err
    assert "--layers 6" in err and "llama-cpp-python >= 0.3.36" in err
    assert not (tmp_path / "gemma3-r2l").exists() or not any((tmp_path / "gemma3-r2l").iterdir())


def _gemma3_gguf_with_idle_blocks(tokenizer, root: Path, idle: tuple[int, int]) -> Path:
    """A tiny Gemma 3 f32 GGUF whose blocks ``idle`` add nothing to the residual stream (zero
    ``o_proj`` and ``down_proj``), so that the survey's best cut is exactly those blocks."""
    from .tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gemma3", len(tokenizer)), dtype=torch.float32)
    with torch.no_grad():
        for i in range(*idle):
            block = model.model.layers[i]
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    model.save_pretrained(root / "g3-spm")
    tokenizer.save_pretrained(root / "g3-spm")
    return export_gguf(root / "g3-spm", root / "g3-spm.gguf", "f32")


def test_a_gemma3_gguf_source_is_cut_where_the_period_breaks_end_to_end(
    tmp_path_factory, tmp_path, monkeypatch, builtin_corpus
):
    """A Gemma 3 GGUF with a SentencePiece vocabulary whose blocks 2 and 3 do nothing: ``--layers 2``
    cuts them, which moves the global block from index 5 to 3; the native f32 GGUF and the f16 one
    carry that pattern, and llama.cpp agrees with PyTorch on both."""
    from .test_tokenizer_parity import PROBES, sentencepiece_tokenizer

    texts = builtin_corpus.pool[:300] + list(PROBES) * 20
    tokenizer = sentencepiece_tokenizer(texts, space_prefix=False)
    source = _gemma3_gguf_with_idle_blocks(tokenizer, tmp_path_factory.mktemp("g3"), (2, 4))
    monkeypatch.setenv("RMEXPORT_CACHE", str(tmp_path / "cache"))
    out_root = tmp_path / "runs"
    argv = ["run", str(source), "--out-root", str(out_root), "--skip-onnx", "--skip-bench", "--layers", "2"]
    code = main(argv + FAST)
    run_dir = out_root / "g3-spm-r2l"
    report = assert_checks_passed(code, run_dir)
    prune = json.loads((run_dir / "prune.json").read_text())
    assert prune["kept_layers"] == [0, 1, 4, 5, 6, 7] and prune["tokenizer_parity"]["verdict"]
    kept_types = json.loads((run_dir / "hf" / "config.json").read_text())["layer_types"]
    assert kept_types == [SLIDING] * 3 + [FULL] + [SLIDING] * 2
    for gguf_type in ("f16", "f32"):
        path = run_dir / "gguf" / f"g3-spm-r2l-{gguf_type}.gguf"
        assert read_metadata(str(path))[_pattern_key("gemma3")].value == [t == SLIDING for t in kept_types]
        parity = report["gguf_parity"][gguf_type]
        assert parity["passed"] and parity["positions"] > 0  # each type's own tolerances
    assert report["gguf_parity"]["f32"]["top1_agreement"] >= 0.995
