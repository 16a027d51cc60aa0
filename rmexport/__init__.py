"""rmexport: training-free depth pruning (ReplaceMe) shipped as validated ONNX and GGUF.

The Python API (``rmexport.api``) is imported on first use, so that ``import rmexport`` (which every
module's ``from rmexport import __version__`` runs) loads nothing else.
"""

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_API = {
    "prune": "rmexport.api",
    "export_gguf": "rmexport.api",
    "export_onnx": "rmexport.api",
    "run": "rmexport.api",
    "PruneResult": "rmexport.api",
    "GGUFExport": "rmexport.api",
    "ONNXExport": "rmexport.api",
    "RunResult": "rmexport.api",
    "PruneOptions": "rmexport.prune",
    "ExportGGUFConfig": "rmexport.config",
    "ExportONNXConfig": "rmexport.config",
    "RunConfig": "rmexport.config",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'rmexport' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule ``rmexport.prune`` would bind it as the package's ``prune``, hiding the
    API function of that name: API names are never bound to submodules (``sys.modules`` has them)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
