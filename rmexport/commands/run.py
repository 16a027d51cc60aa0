"""``rmexport run``: everything: prune, export, validate, benchmark, report."""

from __future__ import annotations

import argparse

from validation.report import print_summary

from ..config import RUN_PRUNE_DEFAULTS, RunConfig
from ..inputs import check_run_args
from ..options import add_arguments, from_args
from ..pipeline import run_pipeline
from ..speed_settings import SpeedRounds
from .common import add_prune_options, prune_options, speed_rounds

__all__ = ["add_options", "run", "run_config"]


def add_options(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, RunConfig)
    group = parser.add_argument_group("speed benchmarks (original and pruned interleaved, llama-bench style)")
    add_arguments(group, SpeedRounds)
    add_prune_options(parser, RUN_PRUNE_DEFAULTS)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The ``RunConfig`` the arguments of ``rmexport run`` describe."""
    return from_args(RunConfig, args, prune=prune_options(args), speed=speed_rounds(args))


def run(args: argparse.Namespace) -> int:
    config = run_config(args)
    check_run_args(config)
    run_dir, report = run_pipeline(config)
    print_summary(report, run_dir)
    return 0 if report.get("all_checks_passed", False) else 1
