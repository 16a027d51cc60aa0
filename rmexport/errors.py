"""Every exception rmexport raises on purpose. The CLI turns these into one-line errors."""

from __future__ import annotations

__all__ = [
    "RMExportError",
    "ConfigError",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "CalibrationError",
    "ExportError",
    "ToolchainError",
    "DiskFullError",
    "OutputBusyError",
    "ParityError",
    "ShapeMismatchError",
    "ToleranceError",
]


class RMExportError(Exception):
    """Base class: a failure the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = 2

    def __init__(self, msg: str, *, hint: str | None = None):
        super().__init__(msg)
        self.hint = hint


class ConfigError(RMExportError, ValueError):
    """Bad command-line or config values (ratio out of range, unknown option value...)."""


class ModelLoadError(RMExportError):
    """The model could not be found, reached or read."""


class UnsupportedArchitectureError(RMExportError):
    """No adapter is registered for the model's architecture."""


class CalibrationError(RMExportError):
    """Calibration data is unusable: too short, NaN/inf statistics, singular system."""


class ExportError(RMExportError):
    """A converter could not represent the model (unmappable tensor, unsupported type)."""


class ToolchainError(RMExportError):
    """A runtime (onnxruntime, llama.cpp) or tool is missing or too old."""


class DiskFullError(RMExportError):
    """A write ran out of disk space; what it had written is removed."""


class OutputBusyError(RMExportError):
    """Another live rmexport process holds the output folder."""


class ParityError(RMExportError):
    """A deployable does not compute what the pruned PyTorch model computes."""

    exit_code = 1


class ShapeMismatchError(ParityError):
    """Outputs of the two backends do not even have the same shape."""


class ToleranceError(ParityError):
    """Outputs differ by more than the stated tolerance."""
