"""Files and folders that appear whole or not at all: written beside their target, then renamed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["replace_dir", "write_json"]


def write_json(path: Path | str, data: Any) -> None:
    """Write ``data`` as indented JSON next to ``path`` and rename it into place, so that a reader
    (or a resumed run) never finds half a file. Values JSON cannot hold are written as strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(staged: Path, target: Path) -> None:
    """Move the finished folder ``staged`` to ``target`` (same filesystem), replacing an earlier
    one; the old folder is moved aside first, so ``target`` is never half old, half new."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old.", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, target)
