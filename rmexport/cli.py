"""The ``rmexport`` command: the dispatch to the commands, and the only place that turns an
``RMExportError`` into an exit code.

Each command is one module of ``rmexport.commands`` with ``add_options(parser)`` and ``run(args) -> int``.
Only the module of the command named is imported (``_command``), and only its parser is built, so that
``rmexport --help`` and ``rmexport <command> --help`` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType

from rich.console import Console
from rich.logging import RichHandler

from . import __version__
from .errors import RMExportError
from .hub import set_retries
from .log import route_library_logs, set_quiet

__all__ = ["COMMANDS", "build_parser", "main"]

# (command, subcommand or None) -> (its module in rmexport.commands, one-line help)
COMMANDS: dict[tuple[str, str | None], tuple[str, str]] = {
    ("prune", None): (
        "prune",
        "remove a block of layers, fit and fold the linear map, save an HF checkpoint",
    ),
    ("export", "onnx"): ("export_onnx", "HF checkpoint -> ONNX with KV cache"),
    ("export", "gguf"): ("export_gguf", "HF checkpoint -> GGUF for llama.cpp"),
    ("validate", "onnx"): ("validate_onnx", "onnxruntime vs PyTorch on held-out prompts"),
    ("validate", "gguf"): ("validate_gguf", "llama.cpp vs PyTorch on held-out prompts"),
    ("bench", "onnx"): ("bench_onnx", "perplexity and latency in onnxruntime, original vs pruned"),
    ("bench", "gguf"): ("bench_gguf", "perplexity and speed in llama.cpp, original vs pruned"),
    ("run", None): ("run", "everything: prune, export, validate, benchmark, report"),
}

_GROUP_HELP = {
    "export": "write a deployable from an HF checkpoint",
    "validate": "check a deployable against the PyTorch model",
    "bench": "measure perplexity and speed",
}


def _command(module: str) -> ModuleType:
    """The command's module; the one import the CLI makes on demand (each imports what it runs)."""
    return importlib.import_module(f"{__package__}.commands.{module}")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and a hint, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        print(f"hint: see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(2)


def _retry_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"--retries takes a whole number >= 0, got {text!r}")
    return int(text)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    parser.add_argument("--log-file", help="also write a plain log to this file")
    parser.add_argument(
        "--retries",
        type=_retry_count,
        default=0,
        help="times to retry reaching the Hugging Face Hub before going offline (default 0)",
    )


def _command_parser(sub: argparse._SubParsersAction, name: str, key: tuple[str, str | None]) -> None:
    module, help_text = COMMANDS[key]
    command = _command(module)
    parser = sub.add_parser(name, help=help_text, description=help_text)
    _add_common(parser)
    command.add_options(parser)
    parser.set_defaults(_run=command.run)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rmexport",
        description="Depth-prune an LLM without training (ReplaceMe) and ship it as ONNX and GGUF.",
    )
    parser.add_argument("--version", action="version", version=f"rmexport {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    # Build only the parser of the command being run (none for ``rmexport --help``).
    wanted = [a for a in argv if not a.startswith("-")][:2]
    for (command, subcommand), (_, help_text) in COMMANDS.items():
        lazy = not wanted or wanted[0] != command or bool(subcommand and wanted[1:2] != [subcommand])
        if subcommand is None:
            if lazy:
                sub.add_parser(command, help=help_text)
            else:
                _command_parser(sub, command, (command, subcommand))
            continue
        if command not in groups:
            group = sub.add_parser(command, help=_GROUP_HELP[command], description=_GROUP_HELP[command])
            groups[command] = group.add_subparsers(dest="subcommand", metavar="FORMAT", required=True)
        if lazy:
            groups[command].add_parser(subcommand, help=help_text)
        else:
            _command_parser(groups[command], subcommand, (command, subcommand))
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handlers: list[logging.Handler] = [
        RichHandler(show_path=False, show_time=False, markup=False, console=Console(stderr=True))
    ]
    if args.log_file:
        file_handler = logging.FileHandler(args.log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file_handler)
    logging.basicConfig(level=logging.WARNING, handlers=handlers, format="%(message)s", force=True)
    for name in ("rmexport", "converters", "validation"):
        logging.getLogger(name).setLevel(level)
    set_quiet(args.quiet)
    route_library_logs(verbose=args.verbose)
    set_retries(args.retries)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return int(e.code or 0)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    _configure_logging(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args._run(args) or 0)
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
