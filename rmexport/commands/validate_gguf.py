"""``rmexport validate gguf``: llama.cpp vs PyTorch on held-out prompts."""

from __future__ import annotations

import argparse

from validation.gguf_parity import compare_gguf, format_table

from ..atomic import write_json
from ..config import ValidateGGUFConfig
from ..errors import ToleranceError
from ..inputs import check_validate_gguf_args
from ..options import add_arguments, from_args

__all__ = ["add_options", "run"]


def add_options(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ValidateGGUFConfig)


def run(args: argparse.Namespace) -> int:
    config = from_args(ValidateGGUFConfig, args)
    check_validate_gguf_args(config)
    result = compare_gguf(
        config.gguf_file,
        config.reference,
        n_prompts=config.prompts,
        max_tokens=config.tokens,
        new_tokens=config.new_tokens,
        n_threads=config.threads,
        check=False,
    )
    print(format_table(result))
    for failure in result.failures:
        print(f"  {failure}")
    if config.json:
        write_json(config.json, result.to_json())
    if result.failures and not config.report_only:
        raise ToleranceError(f"llama.cpp ({result.type}) is out of tolerance: " + "; ".join(result.failures))
    return 0
