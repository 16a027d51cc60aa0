"""A memory budget below what one block needs is refused before any work, naming the smallest
that works; that smallest budget itself prunes."""

from __future__ import annotations

import json
import re

from rmexport.cli import main

from .test_cli_fuzz import PRUNE_FAST, one_line_error

PRUNE_ARGS = PRUNE_FAST.split() + ["--ratio", "0.5", "--ood-data", "none"]


def test_memory_budget_minimum_is_refused_below_and_works_at(tiny_checkpoints, tmp_path, capsys):
    """The refusal names the smallest budget in bytes; one byte less is refused before any work,
    that budget itself prunes (weights streamed, activations spilled)."""
    llama = str(tiny_checkpoints["llama"])
    assert main(["prune", llama, "--out", str(tmp_path / "p"), *PRUNE_ARGS, "--memory-budget", "1KB"]) == 2
    first = one_line_error(capsys.readouterr().err)
    minimum = int(re.search(r"smallest that works, (\d+) bytes", first).group(1))
    assert not tmp_path.joinpath("p").exists()
    below = ["prune", llama, "--out", str(tmp_path / "p"), *PRUNE_ARGS, "--memory-budget", str(minimum - 1)]
    assert main(below) == 2
    assert f"{minimum} bytes" in capsys.readouterr().err and not any(tmp_path.iterdir())
    assert main(below[:-1] + [str(minimum)]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "p" / "prune.json").read_text())["memory"]["budget_bytes"] == minimum
