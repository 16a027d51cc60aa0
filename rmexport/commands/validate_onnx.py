"""``rmexport validate onnx``: onnxruntime vs PyTorch on held-out prompts."""

from __future__ import annotations

import argparse

from validation.onnx_parity import compare_onnx, format_table, print_table

from ..atomic import write_json
from ..config import ValidateONNXConfig
from ..errors import ToleranceError
from ..inputs import check_validate_onnx_args
from ..options import add_arguments, from_args

__all__ = ["add_options", "run"]


def add_options(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ValidateONNXConfig)


def run(args: argparse.Namespace) -> int:
    config = from_args(ValidateONNXConfig, args)
    check_validate_onnx_args(config)
    result = compare_onnx(
        config.onnx_dir,
        config.reference,
        n_prompts=config.prompts,
        prompt_tokens=config.prompt_tokens,
        new_tokens=config.new_tokens,
        raise_on_failure=False,
    )
    print_table(result)
    if config.json:
        write_json(config.json, result.to_json())
    if not result.passed:
        raise ToleranceError(
            "ONNX export out of tolerance: " + ", ".join(result.failures) + "\n" + format_table(result)
        )
    return 0
