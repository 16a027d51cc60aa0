"""``rmexport bench gguf``: perplexity and speed in llama.cpp, original vs pruned."""

from __future__ import annotations

import argparse

from converters.gguf_export import export_gguf
from validation.gguf_bench import bench_gguf, format_table

from ..atomic import write_json
from ..config import BenchGGUFConfig
from ..inputs import check_bench_gguf_args
from ..options import add_arguments, from_args
from .common import add_speed_options, protocol_from_args

__all__ = ["add_options", "run"]


def add_options(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, BenchGGUFConfig)
    add_speed_options(parser)


def run(args: argparse.Namespace) -> int:
    config = from_args(BenchGGUFConfig, args, protocol=protocol_from_args(args))
    types = check_bench_gguf_args(config)
    result = bench_gguf(
        config.original,
        config.pruned,
        types=types,
        eval_tokens=config.eval_tokens,
        window=config.window,
        protocol=config.protocol,
        torch_reference=config.torch_reference,
        work_dir=config.work_dir,
        export=export_gguf,
    )
    print(format_table(result))
    if config.json:
        write_json(config.json, result.to_json())
    return 0
