"""``rmexport bench onnx``: perplexity and latency in onnxruntime, original vs pruned."""

from __future__ import annotations

import argparse

from validation.onnx_bench import format_table, measure_onnx

from ..atomic import write_json
from ..config import BenchONNXConfig
from ..inputs import check_bench_onnx_args
from ..options import add_arguments, from_args
from .common import add_speed_options, protocol_from_args

__all__ = ["add_options", "run"]


def add_options(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, BenchONNXConfig)
    add_speed_options(parser)


def run(args: argparse.Namespace) -> int:
    config = from_args(BenchONNXConfig, args, protocol=protocol_from_args(args))
    check_bench_onnx_args(config)
    result = measure_onnx(
        config.original,
        config.pruned,
        eval_tokens=config.eval_tokens,
        window=config.window,
        protocol=config.protocol,
    )
    print(format_table(result))
    if config.json:
        write_json(config.json, result.to_json())
    return 0
