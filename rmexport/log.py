"""Logging and progress helpers. Nothing is configured at import; only the CLI installs handlers."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["get_logger", "progress", "progress_enabled", "set_quiet"]

T = TypeVar("T")
_quiet = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


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
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, **kwargs)
