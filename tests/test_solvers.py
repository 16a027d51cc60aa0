"""Adding a solver is one class and one registration line: here plain removal, as a solver."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch

from rmexport.cli import build_parser, main
from rmexport.replaceme.solve import CosineSettings, FitResult
from rmexport.replaceme.solvers import SOLVERS, FitInputs


class Identity:
    """Plain removal of the cut's blocks: the map is the identity, whatever the statistics say."""

    name: ClassVar[str] = "identity"
    judged_on_set_aside: ClassVar[bool] = False

    def fit(self, given: FitInputs) -> FitResult:
        start = given.least_squares
        identity = torch.eye(start.shape[0]) if start.ndim == 2 else torch.ones(start.shape[0])
        return FitResult(identity.to(torch.float64), self.name, {})

    def settings(self, cosine: CosineSettings) -> dict[str, Any]:
        return {}

    def log_fit(self, details: dict[str, Any]) -> None:
        return None


@pytest.fixture
def identity_solver(monkeypatch):
    monkeypatch.setitem(SOLVERS, Identity.name, Identity())


def test_a_registered_solver_is_a_choice_of_the_command_line(identity_solver, capsys):
    argv = ["prune", "--help"]
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(argv)
    assert "{lstsq,cosine,identity}" in capsys.readouterr().out


def test_identity_solver_prunes_like_plain_removal(identity_solver, tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = ["prune", str(tiny_checkpoints["llama"]), "--out", str(out), "--solver", "identity"]
    argv += ["--map", "output", "--no-quality-guard", "--ood-data", "none", "--selection-samples", "8"]
    argv += ["--calib-samples", "16", "--seq-len", "32", "--eval-tokens", "512"]
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "prune.json").read_text())
    assert record["solver"]["name"] == "identity"
    fit = record["cuts"][0]["fit"]
    assert fit["solver"] == "identity"
    assert fit["rel_residual"] == pytest.approx(fit["rel_residual_plain_removal"], rel=1e-9)
    quality = record["quality"]
    assert quality["ppl_pruned"] == pytest.approx(quality["ppl_plain_removal"], rel=1e-3)


def test_an_unknown_solver_is_one_line_exit_2(tiny_checkpoints, tmp_path, capsys):
    argv = ["prune", str(tiny_checkpoints["llama"]), "--out", str(tmp_path / "p"), "--solver", "identity"]
    assert main(argv) == 2
    assert "invalid choice: 'identity'" in capsys.readouterr().err
