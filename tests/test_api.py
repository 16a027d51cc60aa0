"""The Python API beside the CLI: ``from rmexport import prune, export_gguf, export_onnx``."""

from __future__ import annotations

import json

import rmexport.prune  # noqa: F401  (the submodule of the same name must not hide the function)
from rmexport import (
    ExportGGUFConfig,
    ExportONNXConfig,
    GGUFExport,
    ONNXExport,
    PruneOptions,
    PruneResult,
    export_gguf,
    export_onnx,
    prune,
)

FAST = dict(calib_samples=16, seq_len=32, eval_tokens=512, ood_tokens=512)


def test_prune_then_export_both_formats(tiny_checkpoints, tmp_path):
    assert callable(prune) and prune.__module__ == "rmexport.api"
    pruned = prune(tiny_checkpoints["qwen3"], tmp_path / "pruned", PruneOptions(ratio=0.25, **FAST))
    assert isinstance(pruned, PruneResult)
    assert pruned.record.to_json() == json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert (pruned.record.L, pruned.record.N) == (8, 6)
    config = json.loads((pruned.checkpoint / "config.json").read_text())
    assert config["num_hidden_layers"] == 6

    gguf = export_gguf(pruned.checkpoint, tmp_path / "pruned.gguf", ExportGGUFConfig(type="q8_0"))
    assert isinstance(gguf, GGUFExport) and gguf.path.is_file()
    assert gguf.info["block_count"] == 6 and "Q8_0" in gguf.info["tensor_types"]

    onnx = export_onnx(pruned.checkpoint, tmp_path / "onnx", ExportONNXConfig(dtype="fp32"))
    assert isinstance(onnx, ONNXExport) and (onnx.path / "model.onnx").is_file()
    assert onnx.info["num_hidden_layers"] == 6 and onnx.info["flavor"] == "optimum"


def test_bad_options_are_config_errors_before_any_work(tiny_checkpoints, tmp_path):
    import pytest

    from rmexport.errors import ConfigError

    with pytest.raises(ConfigError, match="solver"):
        prune(tiny_checkpoints["llama"], tmp_path / "p", PruneOptions(solver="sgd"))
    with pytest.raises(ConfigError, match="GGUF type"):
        export_gguf(tiny_checkpoints["llama"], tmp_path / "x.gguf", ExportGGUFConfig(type="q3_k_xs"))
    assert not any(tmp_path.iterdir())
