"""The one way to import a dependency that only some installs have (the ``cpu``/``gpu``/``hub`` extras).

Everything else is imported at the top of its module, but for the few libraries every install has that a
``--help`` must not pay for (transformers, optimum, onnx, the hub client, ...; see docs/development.md), which
the function using them imports. A dependency here is imported on first use, and its absence is a one-line
error that says what to install, never a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ToolchainError

__all__ = ["optional_import"]


def optional_import(module: str, *, package: str, needed_for: str) -> ModuleType:
    """``module``, or ToolchainError naming the pip ``package`` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ToolchainError(
            f"{needed_for} needs the {package!r} package, which is not installed",
            hint=f"pip install {package}",
        ) from e
