"""Each option is declared once, on its config's field: the command line, the defaults and the
per-value checks all come from that declaration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rmexport.cli import build_parser
from rmexport.commands.prune import prune_config
from rmexport.commands.run import run_config
from rmexport.config import BenchGGUFConfig, PruneConfig, RunConfig, ValidateGGUFConfig
from rmexport.errors import ConfigError
from rmexport.options import check_bounds, declared
from rmexport.prune import PruneOptions


def _parse(*argv: str):
    return build_parser(list(argv)).parse_args(list(argv))


def test_the_command_lines_defaults_are_the_configs():
    assert prune_config(_parse("prune", "--out", "o")) == PruneConfig(out=Path("o"))
    # A run that exports a GGUF asks for cuts llama.cpp runs (the CLI derives it from --skip-gguf).
    gguf_cuts = dataclasses.replace(RunConfig().prune, gguf_compatible=True)
    assert run_config(_parse("run")) == RunConfig(prune=gguf_cuts)


def test_every_prune_option_is_a_flag_with_help():
    flags = [opt.flag for _, opt in declared(PruneOptions)]
    assert len(flags) == len(set(flags)) and all(f.startswith("--") for f in flags)
    assert all(opt.help for _, opt in declared(PruneOptions))
    internal = {f.name for f in dataclasses.fields(PruneOptions)} - {
        f.name for f, _ in declared(PruneOptions)
    }
    assert internal == {"parity_windows", "loss_candidates", "gguf_compatible", "cosine"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (PruneOptions(calib_samples=0), "--calib-samples must be at least 1"),
        (PruneOptions(seq_len=4), "--seq-len must be at least 8"),
        (PruneOptions(eval_tokens=100), "--eval-tokens must be at least 512"),
        (PruneOptions(alpha=float("nan")), "--alpha must be a finite number"),
        (PruneOptions(alpha=-1.0), "--alpha must be at least 0"),
        (PruneOptions(layers=0), "--layers must be at least 1"),
        (PruneOptions(map_space="input"), "unknown --map 'input'"),
        (ValidateGGUFConfig(gguf_file="m.gguf", reference="ckpt", tokens=1), "--tokens must be at least 2"),
        (BenchGGUFConfig(original="a", pruned="b", window=0), "--window must be at least 1"),
    ],
)
def test_a_value_out_of_its_bounds_names_its_flag(config, message):
    with pytest.raises(ConfigError, match=message):
        check_bounds(config)


def test_bounds_that_depend_on_another_option():
    check_bounds(PruneOptions(ood_data=(), ood_tokens=0))  # no out-of-domain text: no tokens needed
    check_bounds(PruneOptions(ratio=None, layers=3))  # --layers instead of --ratio
