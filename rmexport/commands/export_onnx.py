"""``rmexport export onnx``: HF checkpoint -> ONNX with KV cache."""

from __future__ import annotations

import argparse

from ..api import export_onnx
from ..config import ExportONNXConfig
from ..inputs import check_export_onnx_args
from ..options import add_arguments, from_args

__all__ = ["add_options", "run"]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="HF checkpoint directory (original or pruned), alias or .gguf")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically when done)")
    add_arguments(parser, ExportONNXConfig)


def run(args: argparse.Namespace) -> int:
    check_export_onnx_args(args.checkpoint, args.out)
    config = from_args(ExportONNXConfig, args)
    print(export_onnx(args.checkpoint, args.out, config).path)
    return 0
