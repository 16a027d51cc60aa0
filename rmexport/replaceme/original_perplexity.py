"""The original model's held-out perplexities, measured once per model and reused by every prune.

The original is the same model for every ratio, cut and solver, so its perplexity on the same
windows is the same number each time: the first prune measures it with the checks, later prunes
read it back and run the checks without the original's blocks after the cut and its LM head
pass. The key is everything that can change the number: the checkpoint's content, the token ids
of the windows, the device type and forward dtype, and the torch and rmexport versions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .. import __version__
from ..atomic import write_json
from ..compute import Compute
from ..fileio import content_fingerprint

__all__ = ["OriginalPerplexities"]


class OriginalPerplexities:
    """Stored perplexities of one checkpoint, computed as ``compute`` computes, under ``folder``."""

    def __init__(self, checkpoint: str | Path, compute: Compute, folder: Path):
        self._model = {
            "checkpoint": content_fingerprint(checkpoint),
            "device": torch.device(compute.device).type,
            "dtype": compute.dtype_name,
            "torch": torch.__version__,
            "rmexport": __version__,
        }
        self._folder = folder

    def _path(self, windows: torch.Tensor) -> Path:
        ids = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        key = json.dumps(self._model | {"windows": ids, "shape": list(windows.shape)}, sort_keys=True)
        return self._folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def get(self, windows: torch.Tensor) -> float | None:
        path = self._path(windows)
        try:
            return float(json.loads(path.read_text())["perplexity"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, windows: torch.Tensor, perplexity: float) -> None:
        write_json(self._path(windows), self._model | {"perplexity": perplexity})
