"""The solvers of a cut's map, by name: what ``--solver`` offers.

A solver is a module with one class that follows ``Solver`` (``base.py``); adding one is that module
plus its line in ``SOLVERS`` below.
"""

from __future__ import annotations

from .base import FitInputs, Solver
from .cosine import CosineSolver
from .lstsq import LeastSquares

__all__ = ["SOLVERS", "FitInputs", "Solver", "solver_named"]

SOLVERS: dict[str, Solver] = {
    LeastSquares.name: LeastSquares(),
    CosineSolver.name: CosineSolver(),
}


def solver_named(name: str) -> Solver:
    return SOLVERS[name]
