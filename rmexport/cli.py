"""The ``rmexport`` command: all of the argument parsing, and the only place that turns an
``RMExportError`` into an exit code.

Each command has ``_add_<command>(parser)`` and ``_run_<command>(args) -> int`` here. The options
themselves are declared once, on the fields of the command's configuration (``rmexport.config``,
``PruneOptions``; see ``rmexport.options``): ``_add_<command>`` builds the parser from them and the run
reads the configuration back, checks it (``rmexport.inputs``) and calls the Python API
(``rmexport.api``) or the stage it names. Only the parser of the command named is built.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import __version__
from .errors import RMExportError
from .hub import set_retries
from .log import route_library_logs, set_quiet

__all__ = ["build_parser", "main", "protocol_from_args", "prune_config", "prune_options", "run_config"]

# (command, subcommand or None) -> (add its arguments, run it, one-line help); filled in below.
COMMANDS: dict[
    tuple[str, str | None],
    tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str],
] = {}

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
    add, run, help_text = COMMANDS[key]
    parser = sub.add_parser(name, help=help_text, description=help_text)
    _add_common(parser)
    add(parser)
    parser.set_defaults(_run=run)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rmexport",
        description="Depth-prune an LLM without training (ReplaceMe) and ship it as ONNX and GGUF.",
    )
    parser.add_argument("--version", action="version", version=f"rmexport {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    # Build only the parser of the command being run (its options import what they list).
    wanted = [a for a in argv if not a.startswith("-")][:2]
    for (command, subcommand), (_, _, help_text) in COMMANDS.items():
        lazy = bool(wanted) and (wanted[0] != command or (subcommand and wanted[1:2] != [subcommand]))
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
    route_library_logs(verbose=args.verbose)
    set_quiet(args.quiet)
    set_retries(args.retries)


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


# --- shared option groups --------------------------------------------------------------------
def _add_prune_options(parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    """The options of ``PruneOptions``, as it declares them; ``defaults`` are another command's."""
    from .options import add_arguments
    from .prune import PruneOptions

    add_arguments(parser, PruneOptions, defaults)
    parser.epilog = (
        "Memory: one calibration pass collects the distance of every candidate cut and the float64 "
        "statistics (2·d² numbers per candidate) that the fit needs. When those do not fit in a quarter "
        "of the memory budget, a first pass measures distances only and a second pass collects statistics "
        "for the best candidates that fit, stopping at the deepest block they need. Quality guard: the "
        "fitted maps are kept only if the "
        "pruned model's loss on 64 set-aside calibration documents is no worse than plain removal of the "
        "same blocks; otherwise plain removal is saved and prune.json says so (guard.kept)."
    )


def prune_options(args: argparse.Namespace, **overrides: Any) -> Any:
    """The ``PruneOptions`` the prune options of ``args`` describe."""
    from .options import from_args
    from .prune import PruneOptions

    given = {"gguf_compatible": not getattr(args, "skip_gguf", True)} | overrides
    return from_args(PruneOptions, args, **given)


def _print_prune_summary(record: Any, out_dir: Path) -> None:
    """The console summary of a prune's ``PruneRecord``."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for cut in record.cuts:
        fit = cut.fit
        console.print(
            f"cut {cut.cut} (original blocks {cut.removed_layers[0]}..{cut.removed_layers[-1]}), "
            f"solver {fit['solver']}, map of the MLP's {fit.get('map', 'output')}: fit error "
            f"{fit['rel_residual']:.4f} vs plain removal "
            f"{fit['rel_residual_plain_removal']:.4f}"
        )
    quality = record.quality
    table = Table(title=f"{record.model.spec}: {record.L} -> {record.N} blocks")
    for column in ("model", "held-out PPL"):
        table.add_column(column)
    table.add_row("original", f"{quality.ppl_original:.2f}")
    table.add_row("plain removal", f"{quality.ppl_plain_removal:.2f}")
    table.add_row(f"pruned ({record.solver['name']})", f"{quality.ppl_pruned:.2f}")
    console.print(table)
    for ood in quality.out_of_domain:
        console.print(
            f"out of domain, {ood.source}: original {ood.ppl_original:.2f}, plain removal "
            f"{ood.ppl_plain_removal:.2f}, pruned {ood.ppl_pruned:.2f}"
        )
    parity = record.fold_parity
    console.print(f"fold parity: max |Δlogit| {parity.max_abs_logit_diff:.2e} (tolerance {parity.atol:.2e})")
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in record.timings_s.items()))
    console.print(
        f"peak RSS {record.peak_rss_mib:.0f} MiB; wrote {out_dir / 'hf'} and {out_dir / 'prune.json'}"
    )


def _add_config(
    parser: argparse.ArgumentParser, cls: type, defaults: Mapping[str, Any] | None = None
) -> None:
    from .options import add_arguments

    add_arguments(parser, cls, defaults)


def _config(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """The config ``cls`` (``rmexport.config``) its declared options in ``args`` describe."""
    from .options import from_args

    return from_args(cls, args, **given)


def _add_speed_options(parser: argparse.ArgumentParser) -> None:
    """The protocol's options, shared by ``rmexport bench gguf`` and ``rmexport bench onnx``."""
    from .speed_settings import SpeedProtocol, SpeedRounds

    group = parser.add_argument_group("speed (llama-bench style: original and pruned alternate)")
    _add_config(group, SpeedProtocol)
    _add_config(group, SpeedRounds)


def speed_rounds(args: argparse.Namespace) -> Any:
    from .speed_settings import SpeedRounds

    return _config(SpeedRounds, args)


def protocol_from_args(args: argparse.Namespace) -> Any:
    """The ``SpeedProtocol`` the options describe (ConfigError for impossible values)."""
    from .speed_settings import SpeedProtocol

    return _config(SpeedProtocol, args, rounds=speed_rounds(args))


# --- prune ------------------------------------------------------------------------------------
def _add_prune(parser: argparse.ArgumentParser) -> None:
    from .config import PruneConfig

    _add_config(parser, PruneConfig)
    _add_prune_options(parser)


def prune_config(args: argparse.Namespace) -> Any:
    """The ``PruneConfig`` the arguments of ``rmexport prune`` describe."""
    from .config import PruneConfig

    return _config(PruneConfig, args, prune=prune_options(args))


def _run_prune(args: argparse.Namespace) -> int:
    from .inputs import check_prune_args
    from .lock import hold_folder
    from .models import resolve
    from .prune import prune

    config = prune_config(args)
    check_prune_args(config)
    with hold_folder(config.out, "--out"):
        record = prune(resolve(config.model), config.prune, config.out)
    _print_prune_summary(record, config.out)
    return 0


# --- export -----------------------------------------------------------------------------------
def _add_export_onnx(parser: argparse.ArgumentParser) -> None:
    from .config import ExportONNXConfig

    parser.add_argument("checkpoint", help="HF checkpoint directory (original or pruned), alias or .gguf")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically when done)")
    _add_config(parser, ExportONNXConfig)


def _run_export_onnx(args: argparse.Namespace) -> int:
    from .api import export_onnx
    from .config import ExportONNXConfig
    from .inputs import check_export_onnx_args

    check_export_onnx_args(args.checkpoint, args.out)
    config = _config(ExportONNXConfig, args)
    print(export_onnx(args.checkpoint, args.out, config).path)
    return 0


def _add_export_gguf(parser: argparse.ArgumentParser) -> None:
    from .config import ExportGGUFConfig

    parser.add_argument("checkpoint", metavar="CKPT", help="HF checkpoint directory (or model alias / .gguf)")
    parser.add_argument("--out", required=True, help="GGUF file to write")
    _add_config(parser, ExportGGUFConfig)


def _run_export_gguf(args: argparse.Namespace) -> int:
    from .api import export_gguf
    from .config import ExportGGUFConfig
    from .inputs import check_export_gguf_args

    check_export_gguf_args(args.checkpoint, args.out)
    info = export_gguf(args.checkpoint, args.out, _config(ExportGGUFConfig, args)).info
    types = ", ".join(f"{k}×{v}" for k, v in info["tensor_types"].items())
    size = info["size_bytes"] / 2**20
    print(f"{info['file']}  {size:.1f} MiB  {info['block_count']} blocks  tensors: {types}")
    return 0


# --- validate ---------------------------------------------------------------------------------
def _add_validate_onnx(parser: argparse.ArgumentParser) -> None:
    from .config import ValidateONNXConfig

    _add_config(parser, ValidateONNXConfig)


def _run_validate_onnx(args: argparse.Namespace) -> int:
    from validation.onnx_parity import compare_onnx, format_table, print_table

    from .atomic import write_json
    from .config import ValidateONNXConfig
    from .errors import ToleranceError
    from .inputs import check_validate_onnx_args

    config = _config(ValidateONNXConfig, args)
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


def _add_validate_gguf(parser: argparse.ArgumentParser) -> None:
    from .config import ValidateGGUFConfig

    _add_config(parser, ValidateGGUFConfig)


def _run_validate_gguf(args: argparse.Namespace) -> int:
    from validation.gguf_parity import compare_gguf, format_table

    from .atomic import write_json
    from .config import ValidateGGUFConfig
    from .errors import ToleranceError
    from .inputs import check_validate_gguf_args

    config = _config(ValidateGGUFConfig, args)
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


# --- bench ------------------------------------------------------------------------------------
def _add_bench_onnx(parser: argparse.ArgumentParser) -> None:
    from .config import BenchONNXConfig

    _add_config(parser, BenchONNXConfig)
    _add_speed_options(parser)


def _run_bench_onnx(args: argparse.Namespace) -> int:
    from validation.onnx_bench import format_table, measure_onnx

    from .atomic import write_json
    from .config import BenchONNXConfig
    from .inputs import check_bench_onnx_args

    config = _config(BenchONNXConfig, args, protocol=protocol_from_args(args))
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


def _add_bench_gguf(parser: argparse.ArgumentParser) -> None:
    from .config import BenchGGUFConfig

    _add_config(parser, BenchGGUFConfig)
    _add_speed_options(parser)


def _run_bench_gguf(args: argparse.Namespace) -> int:
    from converters.gguf_export import export_gguf
    from validation.gguf_bench import bench_gguf, format_table

    from .atomic import write_json
    from .config import BenchGGUFConfig
    from .inputs import check_bench_gguf_args

    config = _config(BenchGGUFConfig, args, protocol=protocol_from_args(args))
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


# --- run --------------------------------------------------------------------------------------
def _add_run(parser: argparse.ArgumentParser) -> None:
    from .config import RUN_PRUNE_DEFAULTS, RunConfig
    from .speed_settings import SpeedRounds

    _add_config(parser, RunConfig)
    group = parser.add_argument_group("speed benchmarks (original and pruned interleaved, llama-bench style)")
    _add_config(group, SpeedRounds)
    _add_prune_options(parser, RUN_PRUNE_DEFAULTS)


def run_config(args: argparse.Namespace) -> Any:
    """The ``RunConfig`` the arguments of ``rmexport run`` describe."""
    from .config import RunConfig

    return _config(RunConfig, args, prune=prune_options(args), speed=speed_rounds(args))


def _run_run(args: argparse.Namespace) -> int:
    from validation.report import print_summary

    from .inputs import check_run_args
    from .pipeline import run_pipeline

    config = run_config(args)
    check_run_args(config)
    run_dir, report = run_pipeline(config)
    print_summary(report, run_dir)
    return 0 if report.get("all_checks_passed", False) else 1


COMMANDS.update(
    {
        ("prune", None): (
            _add_prune,
            _run_prune,
            "remove a block of layers, fit and fold the linear map, save an HF checkpoint",
        ),
        ("export", "onnx"): (_add_export_onnx, _run_export_onnx, "HF checkpoint -> ONNX with KV cache"),
        ("export", "gguf"): (_add_export_gguf, _run_export_gguf, "HF checkpoint -> GGUF for llama.cpp"),
        ("validate", "onnx"): (
            _add_validate_onnx,
            _run_validate_onnx,
            "onnxruntime vs PyTorch on held-out prompts",
        ),
        ("validate", "gguf"): (
            _add_validate_gguf,
            _run_validate_gguf,
            "llama.cpp vs PyTorch on held-out prompts",
        ),
        ("bench", "onnx"): (
            _add_bench_onnx,
            _run_bench_onnx,
            "perplexity and latency in onnxruntime, original vs pruned",
        ),
        ("bench", "gguf"): (
            _add_bench_gguf,
            _run_bench_gguf,
            "perplexity and speed in llama.cpp, original vs pruned",
        ),
        ("run", None): (_add_run, _run_run, "everything: prune, export, validate, benchmark, report"),
    }
)


if __name__ == "__main__":
    sys.exit(main())
