"""``rmexport export gguf``: HF checkpoint -> GGUF for llama.cpp."""

from __future__ import annotations

import argparse

from ..api import export_gguf
from ..config import ExportGGUFConfig
from ..inputs import check_export_gguf_args
from ..options import add_arguments, from_args

__all__ = ["add_options", "run"]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="HF checkpoint directory (or model alias / .gguf)")
    parser.add_argument("--out", required=True, help="GGUF file to write")
    add_arguments(parser, ExportGGUFConfig)


def run(args: argparse.Namespace) -> int:
    check_export_gguf_args(args.checkpoint, args.out)
    info = export_gguf(args.checkpoint, args.out, from_args(ExportGGUFConfig, args)).info
    types = ", ".join(f"{k}×{v}" for k, v in info["tensor_types"].items())
    size = info["size_bytes"] / 2**20
    print(f"{info['file']}  {size:.1f} MiB  {info['block_count']} blocks  tensors: {types}")
    return 0
