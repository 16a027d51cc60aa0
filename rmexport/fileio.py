"""Small readers and writers of the files every stage shares: a GGUF's header, a checkpoint's provenance.

They sit below method, converters and validation alike, so none of those has to import the model
resolver (``rmexport.models``) to read them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

__all__ = ["PROVENANCE_FILE", "open_gguf", "read_provenance", "write_provenance"]


def open_gguf(path: str | Path) -> Any:
    """``gguf.GGUFReader`` over ``path`` (memory-mapped); ModelLoadError when it is not a whole GGUF."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OverflowError, OSError) as e:
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:160]})",
            hint="the file may be truncated or corrupt; download or convert it again",
        ) from e


PROVENANCE_FILE = "rmexport_source.json"


def write_provenance(checkpoint: Path, info: dict[str, Any]) -> None:
    """Record where a checkpoint came from (source GGUF, kept blocks) beside its config.

    The GGUF writer reads ``gguf_file`` to carry the source file's metadata over.
    """
    (Path(checkpoint) / PROVENANCE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_provenance(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
