"""A quantized GGUF as the model: pruned block by block from the file, shipped in its own type."""

import json
from pathlib import Path

import gguf
import pytest

from converters.gguf_export import export_gguf
from rmexport.cli import main

from .test_pipeline import assert_checks_passed

FAST = ["--calib-samples", "48", "--seq-len", "32", "--eval-tokens", "1024", "--selection-samples", "16"]


@pytest.fixture(scope="module")
def q8_gguf(tiny_checkpoints, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf-source")
    return export_gguf(tiny_checkpoints["llama"], root / "tiny-llama-q8_0.gguf", "q8_0")


def test_a_gguf_source_is_pruned_from_the_file_and_shipped_in_its_own_type(q8_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RMEXPORT_CACHE", str(cache))
    out_root = tmp_path / "runs"
    code = main(["run", str(q8_gguf), "--out-root", str(out_root), "--skip-onnx", "--skip-bench", *FAST])
    # The weights were read from the GGUF one block at a time, never converted to a checkpoint.
    (conversion,) = (cache / "gguf-hf-v3").iterdir()
    assert not list(conversion.glob("*.safetensors"))
    run_dir = out_root / "tiny-llama-q8-0-r0.25"
    report = assert_checks_passed(code, run_dir)
    prune = json.loads((run_dir / "prune.json").read_text())
    assert prune["fold_parity"]["passed"] and prune["tokenizer_parity"]["verdict"]
    native = run_dir / "gguf" / "tiny-llama-q8-0-r0.25-q8_0.gguf"
    assert native.is_file() and (run_dir / "gguf" / "tiny-llama-q8-0-r0.25-f16.gguf").is_file()
    done = json.loads((run_dir / "checks" / "gguf_native.json").read_text())
    assert done["requantized"] == 1 and done["copied"] > 0 and not done["type_changed"]
    reader = gguf.GGUFReader(str(native))
    assert int(reader.fields["llama.block_count"].contents()) == prune["N"]
    assert report["gguf_parity"]["q8_0"]["passed"]
