"""The ``genai`` ONNX flavor: onnxruntime-genai's model builder, run on a local checkpoint.

The builder writes one decoder graph of fused onnxruntime ops (GroupQueryAttention,
SkipSimplifiedLayerNormalization, MatMulNBits for int4) plus ``genai_config.json``; it reads the
checkpoint folder given with ``-i`` and needs no network. It runs in a subprocess: it is a
script with its own imports, and its tracebacks should not become ours.

Facts about the builder that decide what it can represent (read from its source, 0.15):
it derives the sliding/global attention pattern of Gemma from the layer index
(Gemma 2: local when ``i % 2 == 1``; Gemma 3: local when ``(i + 1) % 6 != 0``) instead of the
config's ``layer_types``. A checkpoint whose ``layer_types`` disagree (any pruned Gemma 3 whose
cut breaks the period, and every Gemma 2, whose first block is sliding in transformers) would
load and run silently wrong, so it is refused here.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rmexport.arch import adapter_for
from rmexport.errors import ExportError, ToolchainError

__all__ = ["GENAI_TESTED_VERSIONS", "build_genai", "genai_cut_problem"]

log = logging.getLogger(__name__)

# 0.16+ imports Qwen3_5* classes that exist only in transformers >= 5; this project pins < 4.58.
GENAI_TESTED_VERSIONS = "0.15.2"
_GENAI_HINT = f"pip install 'onnxruntime-genai=={GENAI_TESTED_VERSIONS}' onnx-ir (0.16+ needs transformers 5)"


def genai_cut_problem(config: Any) -> str | None:
    """Why the builder would build ``config`` wrongly, or None when it can represent it."""
    assumed = adapter_for(config).genai_layer_types(int(config.num_hidden_layers))
    actual = list(getattr(config, "layer_types", None) or [])
    if assumed is None or not actual or actual == assumed:
        return None
    wrong = [i for i, (a, b) in enumerate(zip(actual, assumed, strict=True)) if a != b]
    return (
        f"onnxruntime-genai's builder derives {config.model_type}'s sliding/global layers from the layer "
        f"index, which disagrees with this config's layer_types at blocks {wrong[:8]}"
    )


def _check_toolchain() -> str:
    try:
        version = importlib.metadata.version("onnxruntime-genai")
    except importlib.metadata.PackageNotFoundError as e:
        raise ToolchainError("onnxruntime-genai is not installed", hint=_GENAI_HINT) from e
    return version


def build_genai(checkpoint: str | Path, out: Path, config: Any, *, precision: str = "fp32") -> None:
    """Run the builder on ``checkpoint`` (a local HF folder) into the existing folder ``out``."""
    problem = genai_cut_problem(config)
    if problem:
        raise ExportError(problem, hint="use --flavor optimum, which follows layer_types")
    version = _check_toolchain()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    with tempfile.TemporaryDirectory(prefix="rmexport-genai-cache-") as cache:
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(checkpoint),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            cache,
        ]
        log.info("genai builder %s: %s", version, " ".join(command[2:]))
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        if "ImportError" in tail or "ModuleNotFoundError" in tail:
            raise ToolchainError(
                f"onnxruntime-genai {version}'s builder does not import with this environment:\n{tail}",
                hint=_GENAI_HINT,
            )
        raise ExportError(f"onnxruntime-genai's builder failed (exit {done.returncode}):\n{tail}")
    log.debug("genai builder output:\n%s", done.stdout[-4000:])
