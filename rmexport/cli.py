"""The ``rmexport`` command. The only place that turns RMExportError into an exit code.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import __version__
from .errors import RMExportError
from .log import set_quiet

__all__ = ["main"]

# (command, subcommand or None) -> (module, one-line help)
COMMANDS: dict[tuple[str, str | None], tuple[str, str]] = {
    ("prune", None): (
        "rmexport.prune",
        "remove a block of layers, fit and fold the linear map, save an HF checkpoint",
    ),
    ("export", "onnx"): ("converters.onnx_export", "HF checkpoint -> ONNX with KV cache"),
    ("export", "gguf"): ("converters.gguf_export", "HF checkpoint -> GGUF for llama.cpp"),
    ("validate", "onnx"): ("validation.onnx_parity", "onnxruntime vs PyTorch on held-out prompts"),
    ("validate", "gguf"): ("validation.gguf_parity", "llama.cpp vs PyTorch on held-out prompts"),
    ("bench", "onnx"): ("validation.onnx_bench", "perplexity and latency in onnxruntime, original vs pruned"),
    ("bench", "gguf"): ("validation.gguf_bench", "perplexity and speed in llama.cpp, original vs pruned"),
    ("run", None): ("rmexport.pipeline", "everything: prune, export, validate, benchmark, report"),
}

_GROUP_HELP = {
    "export": "write a deployable from an HF checkpoint",
    "validate": "check a deployable against the PyTorch model",
    "bench": "measure perplexity and speed",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and a hint, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        print(f"hint: see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(2)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    parser.add_argument("--log-file", help="also write a plain log to this file")


def _module_parser(sub: argparse._SubParsersAction, name: str, module: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    _add_common(parser)
    try:
        importlib.import_module(module).add_arguments(parser)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        parser.set_defaults(_unavailable=True)
    parser.set_defaults(_module=module)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rmexport",
        description="Depth-prune an LLM without training (ReplaceMe) and ship it as ONNX and GGUF.",
    )
    parser.add_argument("--version", action="version", version=f"rmexport {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    # Import only the module of the command being run (plus argparse's own needs for --help).
    wanted = [a for a in argv if not a.startswith("-")][:2]
    for (command, subcommand), (module, help_text) in COMMANDS.items():
        lazy = bool(wanted) and (wanted[0] != command or (subcommand and wanted[1:2] != [subcommand]))
        if subcommand is None:
            if lazy:
                sub.add_parser(command, help=help_text)
            else:
                _module_parser(sub, command, module, help_text)
            continue
        if command not in groups:
            group = sub.add_parser(command, help=_GROUP_HELP[command], description=_GROUP_HELP[command])
            groups[command] = group.add_subparsers(dest="subcommand", metavar="FORMAT", required=True)
        if lazy:
            groups[command].add_parser(subcommand, help=help_text)
        else:
            _module_parser(groups[command], subcommand, module, help_text)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handlers: list[logging.Handler] = [
        RichHandler(show_path=False, show_time=False, markup=False, console=_stderr_console())
    ]
    if args.log_file:
        file_handler = logging.FileHandler(args.log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file_handler)
    logging.basicConfig(level=logging.WARNING, handlers=handlers, format="%(message)s", force=True)
    for name in ("rmexport", "converters", "validation"):
        logging.getLogger(name).setLevel(level)
    set_quiet(args.quiet)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return int(e.code or 0)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", False):
        print(f"error: '{args.command}' is not available in this version", file=sys.stderr)
        return 2
    _configure_logging(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except RMExportError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
