"""Logging and progress helpers. Nothing is configured at import; only the CLI installs handlers."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["get_logger", "progress", "progress_enabled", "route_library_logs", "set_quiet"]

T = TypeVar("T")
_quiet = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


# Third-party loggers and the levels their records reach the user at. urllib3 only says that it
# retries a connection: rmexport says once, itself, that the hub cannot be reached.
_LIBRARY_LEVELS = {
    "urllib3": logging.ERROR,
    "huggingface_hub": logging.WARNING,
    "transformers": logging.WARNING,
    "datasets": logging.WARNING,
    "filelock": logging.WARNING,
    "httpx": logging.WARNING,
    "py.warnings": logging.WARNING,
}


# Warnings about the libraries' own internals, which a user cannot act on: debug level.
_INTERNAL_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_INTERNAL_WARNING_NAMES = ("TracerWarning",)  # torch.jit's, raised while tracing the ONNX export


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    internal = issubclass(category, _INTERNAL_WARNINGS) or category.__name__ in _INTERNAL_WARNING_NAMES
    logging.getLogger("py.warnings").log(
        logging.DEBUG if internal else logging.WARNING, "%s: %s", category.__name__, message
    )


class _MistralRegexOnlyForMistral(logging.Filter):
    """transformers 4.57.3 and later warn that a local tokenizer has Mistral's incorrect regex for
    every checkpoint a 4.57.3 or later wrote, whatever its family (their check of the writer's
    version lets only older ones through). The warning is kept for the Mistral families it is about."""

    _message = re.compile(r"The tokenizer you are loading from '(.+?)' with an incorrect regex pattern")
    _mistral_types = frozenset({"mistral", "mistral3", "ministral", "pixtral", "voxtral"})

    def filter(self, record: logging.LogRecord) -> bool:
        match = self._message.match(record.getMessage())
        if match is None:
            return True
        try:
            config = json.loads((Path(match[1]) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return True
        return not isinstance(config, dict) or config.get("model_type") in self._mistral_types


def route_library_logs(verbose: bool = False) -> None:
    """Send third-party log records and ``warnings.warn`` through the root logger's handlers
    only (the CLI's), each once, a warning as one line: the libraries' own stderr handlers are
    removed."""
    warnings.showwarning = _show_warning
    for name, level in _LIBRARY_LEVELS.items():
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.DEBUG if verbose and name != "urllib3" else level)
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    tokenizer_logger = logging.getLogger("transformers.tokenization_utils_base")
    if not any(isinstance(f, _MistralRegexOnlyForMistral) for f in tokenizer_logger.filters):
        tokenizer_logger.addFilter(_MistralRegexOnlyForMistral())
    # transformers installs its handler on import and stops propagation; undo both.
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    if not progress_enabled():  # its bars ("Loading checkpoint shards") would land in logs as lines
        transformers_logging.disable_progress_bar()


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def progress_enabled() -> bool:
    if _quiet or os.environ.get("RMEXPORT_NO_PROGRESS") == "1":
        return False
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kwargs) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on interactive terminals; a plain iterator otherwise."""
    if not progress_enabled():
        yield from iterable
        return

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, **kwargs)
