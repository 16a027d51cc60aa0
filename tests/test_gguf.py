"""GGUF export checked in the real llama.cpp (llama-cpp-python's libllama): every family, the
pruned real default model at every type, tokenization, refusals, determinism, metadata carry-over,
the benchmark command, and agreement with llama.cpp's own converter."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import gguf
import pytest

from converters.gguf_export import describe_gguf, export_gguf, summarize_gguf
from converters.gguf_metadata import read_metadata
from rmexport.cli import main
from rmexport.errors import ConfigError, ToleranceError
from rmexport.models import read_provenance
from validation.gguf_parity import compare_gguf

from .conftest import FAMILIES
from .tiny import make_tiny_checkpoint

# Small budgets: parity over a couple of prompts is enough to catch a wrong layout or key.
TINY_CHECK = dict(n_prompts=2, max_tokens=48, new_tokens=8)
REAL_CHECK = dict(n_prompts=2, max_tokens=64, new_tokens=16)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_of_every_family_runs_in_llama_cpp_like_pytorch(family, tiny_checkpoints, gguf_dir):
    out = export_gguf(tiny_checkpoints[family], gguf_dir / f"tiny-{family}-f32.gguf", "f32")
    info = summarize_gguf(out)
    assert info.block_count == 8 and info.tensor_types == {"F32": info.tensors}
    assert describe_gguf(out) == info.to_json()
    keys = ["file", "size_bytes", "architecture", "block_count", "tensor_types", "tensors"]
    assert list(info.to_json()) == keys
    result = compare_gguf(out, tiny_checkpoints[family], **TINY_CHECK)  # raises when out of tolerance
    assert result.passed and result.max_abs_diff < 2e-2 and result.mean_kl < 1e-5
    assert result.decode_llama_cpp == result.decode_torch
    assert result.tokenization_mismatches == [] and result.source_error is None


def test_wrong_reference_fails_parity_with_exit_code_1(tiny_checkpoints, builtin_corpus, gguf_dir, capsys):
    """Same family and block count, other weights: the comparison runs and fails. (A reference of
    another family or block count is refused up front as a different model, exit 2.)"""
    other = make_tiny_checkpoint("llama", gguf_dir / "llama-seed1", builtin_corpus.pool[:300], seed=1)
    out = export_gguf(other, gguf_dir / "tiny-llama-seed1-f32.gguf", "f32")
    with pytest.raises(ToleranceError):
        compare_gguf(out, tiny_checkpoints["llama"], **TINY_CHECK)
    code = main(
        ["validate", "gguf", str(out), "--reference", str(tiny_checkpoints["llama"]), "--prompts", "1"]
    )
    assert code == 1
    assert "top-1 agreement" in capsys.readouterr().out


@pytest.fixture(scope="module")
def pruned_ggufs(pruned_default_checkpoint, gguf_dir) -> dict[str, Path]:
    return {
        t: export_gguf(pruned_default_checkpoint, gguf_dir / f"pruned-{t}.gguf", t)
        for t in ("f32", "f16", "q8_0", "q4_k_m")
    }


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_pruned_default_model_passes_parity(gguf_type, pruned_ggufs, pruned_default_checkpoint):
    result = compare_gguf(pruned_ggufs[gguf_type], pruned_default_checkpoint, **REAL_CHECK)
    assert result.type == gguf_type and result.passed
    assert summarize_gguf(pruned_ggufs[gguf_type]).block_count == 22
    if gguf_type == "f32":
        assert result.decode_match == 1.0 and result.max_abs_diff < 2e-2


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m"])
def test_pruned_default_model_quantized_writes_and_loads(gguf_type, pruned_ggufs, pruned_default_checkpoint):
    info = summarize_gguf(pruned_ggufs[gguf_type])
    assert info.block_count == 22
    assert info.size_bytes < 0.6 * pruned_ggufs["f16"].stat().st_size  # 8.5 or fewer bits per weight
    if gguf_type == "q8_0":
        assert info.tensor_types.get("Q8_0", 0) >= 22 * 7  # every 2-D weight of every block
    else:
        # Rows of 576 are not a multiple of 256: llama.cpp falls back per tensor to other types.
        assert set(info.tensor_types) - {"F32"}, info
        assert int(read_metadata(str(pruned_ggufs[gguf_type]))["general.file_type"].value) == 15
    result = compare_gguf(
        pruned_ggufs[gguf_type], pruned_default_checkpoint, n_prompts=1, max_tokens=64, new_tokens=8
    )
    assert result.passed


def test_metadata_of_a_gguf_source_is_carried_over(default_checkpoint, pruned_default_checkpoint, tmp_path):
    source = read_provenance(default_checkpoint).get("gguf_file")
    if not source:
        pytest.skip("the default checkpoint did not come from a GGUF")
    pruned = tmp_path / "pruned-with-provenance"
    shutil.copytree(pruned_default_checkpoint, pruned, symlinks=True)
    # Only where it came from: the writer reads the blocks from the checkpoint's config.
    (pruned / "rmexport_source.json").write_text(json.dumps({"gguf_file": source}))
    out = export_gguf(pruned, tmp_path / "carried-f16.gguf", "f16")
    ours, theirs = read_metadata(str(out)), read_metadata(source)
    for key, kv in theirs.items():
        if key.startswith(("general.", "tokenizer.")) and key not in ("general.file_type",):
            assert ours[key].value == kv.value, key
    assert ours["llama.block_count"].value == 22
    assert ours["general.file_type"].value == int(gguf.LlamaFileType.MOSTLY_F16)
    from transformers import AutoTokenizer

    from rmexport import llamacpp as llama_cpp_tools
    from validation.gguf_parity import TOKENIZER_PROBES

    tokenizer = AutoTokenizer.from_pretrained(pruned)
    with llama_cpp_tools.open_model(out, n_ctx=64) as model:
        for text in TOKENIZER_PROBES:
            assert (
                llama_cpp_tools.tokenize(model, text)
                == tokenizer(text, add_special_tokens=False)["input_ids"]
            )


def test_sentencepiece_tokenizers_match_in_llama_cpp(builtin_corpus, tmp_path):
    """Gemma/Mistral-style tokenizers (SentencePiece BPE with byte fallback) as ``model = llama``."""
    import sentencepiece
    import torch
    from transformers import AutoModelForCausalLM, LlamaTokenizerFast

    from .tiny import tiny_config

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(builtin_corpus.pool[:300]),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    tokenizer = LlamaTokenizerFast(vocab_file=str(tmp_path / "sp.model"), legacy=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gemma2", len(tokenizer)), dtype=torch.float32)
    checkpoint = tmp_path / "gemma2-spm"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    out = export_gguf(checkpoint, tmp_path / "spm.gguf", "f32")
    meta = read_metadata(str(out))
    assert meta["tokenizer.ggml.model"].value == "llama" and "tokenizer.ggml.scores" in meta
    result = compare_gguf(out, checkpoint, **TINY_CHECK)
    assert result.passed and result.tokenization_mismatches == []


def test_unknown_type_is_a_config_error(tiny_checkpoints, tmp_path):
    with pytest.raises(ConfigError):
        export_gguf(tiny_checkpoints["llama"], tmp_path / "x.gguf", "q3_k_xs")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("gguf_type", ["f16", "q4_k_m"])
def test_writing_twice_gives_identical_bytes(gguf_type, tiny_checkpoints, tmp_path):
    first = export_gguf(tiny_checkpoints["qwen3"], tmp_path / "a.gguf", gguf_type)
    second = export_gguf(tiny_checkpoints["qwen3"], tmp_path / "b.gguf", gguf_type)
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]  # no temp files left


def test_cli_export_and_bench(tiny_checkpoints, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmexport.arch import adapter_for
    from rmexport.replaceme.apply import remove_blocks

    original = tiny_checkpoints["llama"]
    pruned = tmp_path / "pruned"
    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    remove_blocks(model, adapter_for(model.config), (4, 6))
    model.save_pretrained(pruned)
    AutoTokenizer.from_pretrained(original).save_pretrained(pruned)

    assert main(["export", "gguf", str(pruned), "--out", str(tmp_path / "p.gguf"), "--type", "q8_0"]) == 0
    assert "6 blocks" in capsys.readouterr().out

    report = tmp_path / "bench.json"
    args = [
        "bench",
        "gguf",
        "--original",
        str(original),
        "--pruned",
        str(pruned),
        "--types",
        "f32",
        "--eval-tokens",
        "64",
        "--window",
        "32",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--min-rounds",
        "1",
        "--max-rounds",
        "2",
        "--threads",
        "2",
        "--json",
        str(report),
    ]
    assert main(args) == 0
    result = json.loads(report.read_text())
    entry = result["types"]["f32"]
    assert result["windows"] == 2
    assert entry["original"]["block_count"] == 8 and entry["pruned"]["block_count"] == 6
    speed = entry["speed"]
    assert list(speed["phases"]) == ["pp16", "tg4"] and speed["protocol"]["threads"] == 2
    # The head stays: the FLOP ideal is below L/N, prompt processing (head once) closest to it.
    assert 1 < speed["phases"]["tg4"]["ideal"] < speed["phases"]["pp16"]["ideal"] < 8 / 6
    for role in ("original", "pruned"):
        # Same windows, same perplexity function: llama.cpp f32 equals PyTorch's perplexity.
        assert entry[role]["ppl"] == pytest.approx(result["torch"][role]["ppl"], rel=1e-3)
        for phase in speed["phases"].values():
            assert (
                math.isfinite(phase[role]["tokens_per_s"]["median"])
                and phase[role]["tokens_per_s"]["min"] > 0
            )
    assert "speed-up" in capsys.readouterr().out


@pytest.mark.hub  # downloads llama-cpp-python's sdist (llama.cpp's converter) once; fails offline
def test_our_writer_agrees_with_llama_cpp_converter(pruned_default_checkpoint):
    from bench.compare_converter import compare_with_converter

    result = compare_with_converter(pruned_default_checkpoint)
    assert result["tensors_only_ours"] == [] and result["tensors_only_theirs"] == []
    assert result["tensor_shape_differences"] == []
    assert result["tensor_max_abs_diff"] == 0.0
    assert result["unexplained_metadata"] == [], result["metadata_differing"]
    assert result["tokens_equal"]


ROPE_SCALINGS = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize(
    ("family", "scaling"), [("llama", "llama3"), ("qwen2", "linear"), ("qwen3", "yarn"), ("gemma3", "linear")]
)
def test_rope_scaling_survives_export(family, scaling, tiny_checkpoints, tmp_path):
    src = tiny_checkpoints[family]
    scaled = tmp_path / f"{family}-{scaling}"
    scaled.mkdir()
    for item in src.iterdir():
        if item.name != "config.json":
            (scaled / item.name).symlink_to(item)
    config = json.loads((src / "config.json").read_text())
    config["rope_scaling"] = ROPE_SCALINGS[scaling]
    (scaled / "config.json").write_text(json.dumps(config))
    out = export_gguf(scaled, tmp_path / "scaled.gguf", "f32")
    assert compare_gguf(out, scaled, **TINY_CHECK).passed


def test_bench_accepts_gguf_files(tiny_checkpoints, tmp_path, capsys):
    """GGUF inputs: windows come from the file's own tokenizer, the type from the file."""
    out = export_gguf(tiny_checkpoints["qwen2"], tmp_path / "q.gguf", "f16")
    args = [
        "bench",
        "gguf",
        "--original",
        str(out),
        "--pruned",
        str(out),
        "--eval-tokens",
        "64",
        "--window",
        "32",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "2",
        "--min-rounds",
        "1",
        "--max-rounds",
        "1",
        "--json",
        str(tmp_path / "b.json"),
    ]
    assert main(args) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert list(result["types"]) == ["f16"] and result["windows"] == 2 and result["torch"] == {}
    entry = result["types"]["f16"]
    assert entry["original"]["ppl"] == entry["pruned"]["ppl"]
    assert {p["ideal"] for p in entry["speed"]["phases"].values()} == {1.0}
    assert "f16" in capsys.readouterr().out


def test_carry_over_takes_per_layer_arrays_from_the_config_when_blocks_differ():
    from gguf import GGUFValueType

    from converters.gguf_metadata import KV, carry_over

    def array(values):
        return KV(values, GGUFValueType.ARRAY, GGUFValueType.BOOL)

    source = {
        "general.name": KV("src", GGUFValueType.STRING),
        "gemma3.block_count": KV(6, GGUFValueType.UINT32),
        "gemma3.attention.sliding_window_pattern": array([True] * 5 + [False]),
        "gemma3.source_only_per_layer": array([True, False] * 3),
    }
    ours = {
        "gemma3.block_count": KV(4, GGUFValueType.UINT32),
        "gemma3.attention.sliding_window_pattern": array([True, True, True, False]),
    }
    merged = carry_over(ours, source, "gemma3")
    assert merged["general.name"].value == "src" and merged["gemma3.block_count"].value == 4
    assert merged["gemma3.attention.sliding_window_pattern"].value == [True, True, True, False]
    assert "gemma3.source_only_per_layer" not in merged
    same = carry_over({**ours, "gemma3.block_count": KV(6, GGUFValueType.UINT32)}, source, "gemma3")
    assert same["gemma3.source_only_per_layer"].value == [True, False] * 3
    assert same["gemma3.attention.sliding_window_pattern"].value == [True] * 5 + [False]


def test_an_earlier_perplexity_of_the_original_is_reused_only_on_the_same_file_and_windows(
    tiny_checkpoints, tmp_path
):
    from validation.gguf_bench import GGUFQuality, bench_gguf, gguf_perplexity
    from validation.speed import SpeedProtocol, SpeedRounds

    original = export_gguf(tiny_checkpoints["llama"], tmp_path / "o.gguf", "f16")
    pruned = export_gguf(tiny_checkpoints["llama"], tmp_path / "p.gguf", "f16")
    protocol = SpeedProtocol(
        prompt_tokens=(8,), gen_tokens=2, rounds=SpeedRounds(warmup=0, min_rounds=1, max_rounds=1)
    )
    measured = gguf_perplexity(original, eval_tokens=64, window=32)

    def bench(earlier, eval_tokens=64):
        return bench_gguf(
            original,
            pruned,
            eval_tokens=eval_tokens,
            window=32,
            protocol=protocol,
            torch_reference=False,
            original_quality=earlier,
        ).types["f16"]

    fresh = bench(()).original
    assert measured.ppl == pytest.approx(fresh.ppl, rel=1e-6) and measured.tokens == fresh.tokens
    assert GGUFQuality.from_json(json.loads(json.dumps(measured.to_json()))) == measured  # as stored
    marked = replace(measured, ppl=-1.0)  # a value no measurement gives: shows which one the bench used
    assert bench([marked]).original.ppl == -1.0
    assert bench([marked]).pruned.ppl > 0  # the pruned model is always measured
    assert bench([marked], eval_tokens=96).original.ppl > 0  # other windows: measured again
    assert bench([replace(marked, file=str(pruned))]).original.ppl > 0  # another file
