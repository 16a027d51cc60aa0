"""The ONNX export is quiet: tracing emits no Python warning, and its silencing ends with the export."""

from __future__ import annotations

import logging
import warnings

from converters.onnx_export import export_onnx

NOISY_LOGGERS = ("optimum", "transformers.modeling_utils", "transformers.configuration_utils")


def test_onnx_export_emits_no_python_warning(tiny_checkpoints, tmp_path, capfd):
    """Gemma 3 (tied embeddings, sliding layers) provokes every kind of tracer noise the exporter makes."""
    filters_before = list(warnings.filters)
    log_filters_before = {name: list(logging.getLogger(name).filters) for name in NOISY_LOGGERS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(tiny_checkpoints["gemma3"], tmp_path / "onnx")
    assert [f"{w.category.__name__} ({w.filename}:{w.lineno}): {w.message}" for w in caught] == []
    assert warnings.filters == filters_before, "the export's warning filters outlived it"
    assert {n: logging.getLogger(n).filters for n in NOISY_LOGGERS} == log_filters_before
    err = capfd.readouterr().err
    assert "Warning" not in err and "torch_dtype" not in err and "candidate ONNX initializers" not in err, err
