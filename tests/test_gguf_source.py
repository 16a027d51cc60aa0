"""A quantized GGUF as the model: pruned block by block from the file, shipped in its own type."""

import json
from pathlib import Path

import gguf
import pytest

from converters.gguf_export import export_gguf
from rmexport.cli import main

from .test_pipeline import assert_checks_passed

FAST = "--calib-samples 48 --seq-len 32 --eval-tokens 1024 --selection-samples 16".split()
# a short speed protocol on one thread: tiny models, structure only
FAST += "--min-rounds 3 --max-rounds 3 --threads 1".split()


@pytest.fixture(scope="module")
def q8_gguf(tiny_checkpoints, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf-source")
    return export_gguf(tiny_checkpoints["llama"], root / "tiny-llama-q8_0.gguf", "q8_0")


def test_a_gguf_source_is_pruned_from_the_file_and_shipped_in_its_own_type(q8_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RMEXPORT_CACHE", str(cache))
    out_root = tmp_path / "runs"
    # The map of a random tiny model is noise; keep it anyway, so there is a folded tensor to requantize.
    argv = [
        "run",
        str(q8_gguf),
        "--out-root",
        str(out_root),
        "--skip-onnx",
        "--no-quality-guard",
        "--no-frontier",
    ]
    argv += FAST
    code = main(argv)
    run_dir = out_root / "tiny-llama-q8-0-r0.25"
    report = assert_checks_passed(code, run_dir)
    prune = json.loads((run_dir / "prune.json").read_text())
    assert prune["fold_parity"]["passed"] and prune["tokenizer_parity"]["verdict"]
    # The prune read the weights from the GGUF one block at a time: nothing needed the original's
    # float32 weights, so no conversion wrote them (the source file itself is the benchmark's original).
    assert not list(cache.glob("gguf-hf-v3/*/*.safetensors"))
    assert not (out_root / "tiny-llama-q8-0-original" / "gguf").exists()
    native = run_dir / "gguf" / "tiny-llama-q8-0-r0.25-q8_0.gguf"
    assert native.is_file() and (run_dir / "gguf" / "tiny-llama-q8-0-r0.25-f16.gguf").is_file()
    done = json.loads((run_dir / "checks" / "gguf_native.json").read_text())
    assert done["requantized"] == 1 and done["copied"] > 0 and not done["type_changed"]
    reader = gguf.GGUFReader(str(native))
    assert int(reader.fields["llama.block_count"].contents()) == prune["N"]
    assert report["gguf_parity"]["q8_0"]["passed"]
    # Benchmarked against the source file itself, in its own type only: same windows, fewer blocks.
    assert set(report["gguf_bench"]) == {"q8_0"} and set(report["gguf_parity"]) == {"f16", "q8_0"}
    bench = report["gguf_bench"]["q8_0"]["types"]["q8_0"]
    assert bench["original"]["file"] == str(q8_gguf) and bench["original"]["block_count"] == 8
    assert (
        bench["pruned"]["block_count"] == prune["N"]
        and bench["pruned"]["tokens"] == bench["original"]["tokens"]
    )
