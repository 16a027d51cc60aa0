"""ONNX export, parity, perplexity and loading in onnxruntime (the real runtime, CPU EP)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from converters.onnx_export import (
    EXPORT_INFO_FILE,
    OPTIMUM_RUNTIME_GAPS,
    OnnxExportInfo,
    export_onnx,
    read_export_info,
)
from rmexport.cli import main
from validation.onnx_parity import TOLERANCES, OnnxParity, compare_onnx, heldout_prompts
from validation.ort_decoder import OrtDecoder

from .conftest import FAMILIES

TINY_PROMPT_TOKENS = 64  # > the tiny Gemma sliding window (16), so the window is exercised
PRUNED_TINY_CUT = (2, 5)  # keeps blocks 0, 1, 5, 6, 7: breaks Gemma 3's every-6th-global period


def _prune_tiny(src: Path, dst: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmexport.arch import adapter_for
    from rmexport.replaceme.apply import remove_blocks

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    remove_blocks(model, adapter_for(model.config), PRUNED_TINY_CUT)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def pruned_tiny_checkpoints(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-pruned")
    return {f: _prune_tiny(path, root / f) for f, path in tiny_checkpoints.items()}


@pytest.fixture(scope="module")
def pruned_default_onnx(pruned_default_checkpoint, tmp_path_factory) -> Path:
    return export_onnx(pruned_default_checkpoint, tmp_path_factory.mktemp("pruned-default-onnx") / "onnx")


def _check_parity(onnx_dir: Path, ckpt: Path, n_prompts: int, prompt_tokens: int) -> OnnxParity:
    result = compare_onnx(onnx_dir, ckpt, n_prompts=n_prompts, prompt_tokens=prompt_tokens, new_tokens=32)
    assert result.passed, result.failures
    assert result.max_abs_diff <= TOLERANCES["fp32"].max_abs_diff
    assert result.top1_agreement >= TOLERANCES["fp32"].min_top1_agreement
    assert result.decode_match == 1.0 and all(p.decode_identical for p in result.per_prompt)
    return result


def _optimum_greedy_prefix(onnx_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from optimum's ORTModelForCausalLM.generate (may stop early at EOS)."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(onnx_dir)
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


# What rmexport_onnx.json holds (OnnxExportInfo), in its order: readers of older exports expect it.
EXPORT_INFO_KEYS = [
    "flavor", "dtype", "precision", "task", "source_checkpoint", "architecture", "num_hidden_layers",
    "inputs", "external_data", "opsets", "optimum_runtime_gap", "export_s", "versions",
]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_export_loads_and_matches_pytorch(family, tiny_checkpoints, pruned_tiny_checkpoints, tmp_path):
    """Original and pruned tiny models of every family: export, plain session, parity; optimum generate()."""
    from transformers import AutoTokenizer

    for name, ckpt in (("original", tiny_checkpoints[family]), ("pruned", pruned_tiny_checkpoints[family])):
        out = export_onnx(ckpt, tmp_path / name)
        info = read_export_info(out)
        n_layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
        assert info["num_hidden_layers"] == n_layers == (8 if name == "original" else 5)
        assert list(info) == EXPORT_INFO_KEYS and OnnxExportInfo.from_json(info).to_json() == info
        assert info["inputs"] and info["opsets"]["ai.onnx"] >= 14
        assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
        decoder = OrtDecoder(out, spinning=False)  # a plain onnxruntime.InferenceSession
        assert decoder.num_layers == n_layers
        _check_parity(out, ckpt, n_prompts=2 if name == "original" else 1, prompt_tokens=TINY_PROMPT_TOKENS)
    # optimum's ORTModelForCausalLM runs the pruned export and picks the same greedy tokens.
    prompt = heldout_prompts(AutoTokenizer.from_pretrained(ckpt), 1, 24)[0]
    expected, _ = decoder.greedy(prompt, 8)
    if family in OPTIMUM_RUNTIME_GAPS:
        # Known upstream gap: kept as a failing expectation so a fixed optimum shows up here.
        with pytest.raises(InvalidArgument, match="past_key_values"):
            _optimum_greedy_prefix(out, prompt, 8)
        return
    got = _optimum_greedy_prefix(out, prompt, 8)
    assert got and got == expected[: len(got)]


def test_pruned_default_parity_and_perplexity(pruned_default_checkpoint, pruned_default_onnx, builtin_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmexport.calib.tokens import heldout_windows
    from validation.perplexity import perplexity, torch_forward

    result = _check_parity(pruned_default_onnx, pruned_default_checkpoint, n_prompts=1, prompt_tokens=96)
    assert result.prompts == 1 and all(8 <= p.prompt_tokens <= 96 for p in result.per_prompt)

    tokenizer = AutoTokenizer.from_pretrained(pruned_default_onnx)
    windows = heldout_windows(builtin_corpus, tokenizer, 512, window=512)
    assert windows.shape == (1, 513)
    model = AutoModelForCausalLM.from_pretrained(pruned_default_checkpoint).eval()
    ppl_torch = perplexity(torch_forward(model), windows, batch_size=1).ppl
    ppl_ort = perplexity(OrtDecoder(pruned_default_onnx, spinning=False).forward, windows, batch_size=1).ppl
    assert math.isfinite(ppl_ort) and ppl_ort > 1
    assert abs(ppl_ort - ppl_torch) / ppl_torch < 0.005, (ppl_torch, ppl_ort)


def test_pruned_default_runs_in_optimum(pruned_default_onnx):
    from transformers import AutoTokenizer

    prompt = heldout_prompts(AutoTokenizer.from_pretrained(pruned_default_onnx), 1, 32)[0]
    expected, _ = OrtDecoder(pruned_default_onnx, spinning=False).greedy(prompt, 12)
    got = _optimum_greedy_prefix(pruned_default_onnx, prompt, 12)
    assert got and got == expected[: len(got)]


def test_parity_fails_against_a_different_model(tiny_checkpoints, tmp_path, capsys):
    """The check can fail: a llama export compared with another model's weights exits 1 with a table."""
    out = export_onnx(tiny_checkpoints["llama"], tmp_path / "onnx")
    code = main(
        ["validate", "onnx", str(out), "--reference", str(tiny_checkpoints["qwen2"]), "--prompts", "1"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "out of tolerance" in err and "prefill max |Δlogit|" in err


def test_bad_input_is_a_clean_error(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "onnx", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(["validate", "onnx", str(tmp_path / "none"), "--reference", str(tmp_path)]) == 2
    assert "no model.onnx" in capsys.readouterr().err
    bench = ["bench", "onnx", "--original", str(tmp_path / "a"), "--pruned", str(tmp_path / "b")]
    assert main(bench) == 2


def test_int4_needs_genai_flavor(tiny_checkpoints, tmp_path, capsys):
    code = main(
        [
            "export",
            "onnx",
            str(tiny_checkpoints["llama"]),
            "--out",
            str(tmp_path / "o"),
            "--precision",
            "int4",
        ]
    )
    assert code == 2
    assert "--flavor genai" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_refuses_to_overwrite_a_foreign_folder(tiny_checkpoints, tmp_path):
    from rmexport.errors import ExportError

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="refusing to overwrite"):
        export_onnx(tiny_checkpoints["llama"], foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


# --- onnxruntime-genai flavor -----------------------------------------------------------------
@pytest.fixture(scope="module")
def og():
    return pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def genai_exports(og, tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genai")
    return {f: export_onnx(tiny_checkpoints[f], root / f, flavor="genai") for f in ("llama", "gemma3")}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_genai_flavor_matches_pytorch(family, og, genai_exports, tiny_checkpoints):
    from transformers import AutoTokenizer

    ckpt, out = tiny_checkpoints[family], genai_exports[family]
    assert read_export_info(out)["flavor"] == "genai" and (out / "genai_config.json").is_file()
    _check_parity(out, ckpt, n_prompts=2, prompt_tokens=TINY_PROMPT_TOKENS)
    # The genai runtime itself generates the same greedy tokens from the same ids.
    prompt = heldout_prompts(AutoTokenizer.from_pretrained(ckpt), 1, 24)[0]
    expected, _ = OrtDecoder(out, spinning=False).greedy(prompt, 8)
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 8, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    got = list(generator.get_sequence(0))[len(prompt) :]
    assert got and got == expected[: len(got)]


def test_genai_refuses_gemma_patterns_it_cannot_build(
    og, tiny_checkpoints, pruned_tiny_checkpoints, tmp_path
):
    """The builder derives Gemma's sliding layers from the index; a cut that breaks it is refused."""
    from rmexport.errors import ExportError

    for ckpt in (pruned_tiny_checkpoints["gemma3"], tiny_checkpoints["gemma2"]):
        with pytest.raises(ExportError, match="layer_types"):
            export_onnx(ckpt, tmp_path / "g", flavor="genai")
    assert not (tmp_path / "g").exists()


def test_genai_int4_runs_and_is_smaller(og, genai_exports, tiny_checkpoints, tmp_path):
    import onnx

    ckpt = tiny_checkpoints["llama"]
    int4 = export_onnx(ckpt, tmp_path / "int4", flavor="genai", precision="int4")
    ops = {n.op_type for n in onnx.load(str(int4 / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops

    def size(d: Path) -> int:
        return sum(p.stat().st_size for p in d.glob("model.onnx*"))

    assert size(int4) < 0.6 * size(genai_exports["llama"])
    result = compare_onnx(int4, ckpt, n_prompts=1, prompt_tokens=32, new_tokens=8, raise_on_failure=False)
    assert result.precision == "int4" and result.tolerance.max_abs_diff is None
    assert 0 < result.max_abs_diff < 1e3 and result.positions == 32


# --- benchmarks (slow) ----------------------------------------------------------------------
@pytest.mark.slow
def test_bench_original_vs_pruned(default_checkpoint, pruned_default_onnx, tmp_path):
    from validation.onnx_bench import measure_onnx
    from validation.speed import SpeedProtocol, SpeedRounds

    original = export_onnx(default_checkpoint, tmp_path / "original")
    protocol = SpeedProtocol(
        prompt_tokens=(128, 512), gen_tokens=32, rounds=SpeedRounds(min_rounds=3, max_rounds=5)
    )
    result = measure_onnx(original, pruned_default_onnx, eval_tokens=1024, protocol=protocol)
    orig, pruned = result.models["original"], result.models["pruned"]
    assert (orig.num_hidden_layers, pruned.num_hidden_layers) == (30, 22)
    phases = result.speed.phases
    assert list(phases) == ["pp128", "pp512", "tg32"] and 3 <= result.speed.rounds <= 5
    # The graph returns logits for every position: the head runs on the whole prompt, so even
    # prefill's ideal stays below L/N.
    assert all(1.2 < p.ideal < 30 / 22 for p in phases.values())
    assert pruned.ppl > orig.ppl > 1  # eight blocks removed without any fit cost quality
    for p in phases.values():  # no timing threshold here: the report's speed check judges that
        assert p.slower_than_original == (p.speedup.median < 1)
        assert p.speedup.min <= p.speedup.median <= p.speedup.max
    (tmp_path / "bench.json").write_text(json.dumps(result.to_json()))
    assert EXPORT_INFO_FILE in {p.name for p in original.iterdir()}
