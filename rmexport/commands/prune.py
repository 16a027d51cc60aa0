"""``rmexport prune``: remove a block of layers, fit and fold the linear map, save an HF checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..config import PruneConfig
from ..inputs import check_prune_args
from ..lock import hold_folder
from ..models import resolve
from ..options import add_arguments, from_args
from ..prune import prune
from ..records import PruneRecord
from .common import add_prune_options, prune_options

__all__ = ["add_options", "prune_config", "run"]


def add_options(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, PruneConfig)
    add_prune_options(parser)


def prune_config(args: argparse.Namespace) -> PruneConfig:
    """The ``PruneConfig`` the arguments of ``rmexport prune`` describe."""
    return from_args(PruneConfig, args, prune=prune_options(args))


def run(args: argparse.Namespace) -> int:
    config = prune_config(args)
    check_prune_args(config)
    with hold_folder(config.out, "--out"):
        record = prune(resolve(config.model), config.prune, config.out)
    _print_summary(record, config.out)
    return 0


def _print_summary(record: PruneRecord, out_dir: Path) -> None:
    """The console summary of a prune's ``PruneRecord``."""
    console = Console()
    for cut in record.cuts:
        fit = cut.fit
        console.print(
            f"cut [{cut.cut[0]}, {cut.cut[1]}) (original blocks "
            f"{cut.removed_layers[0]}–{cut.removed_layers[-1]}), "
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
    table.add_row(f"pruned ({record.kept_words})", f"{quality.ppl_pruned:.2f}")
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
