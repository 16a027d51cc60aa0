"""Perplexity over fixed held-out windows, the same computation for every backend.

A backend supplies ``forward(ids) -> logits`` for a batch of windows ``[B, T]`` (torch or
numpy, ``[B, T, V]``). Row ``r`` of the windows is BOS followed by ``T - 1`` held-out tokens;
the logits at position ``t`` predict token ``t + 1``, so each window predicts ``T - 1`` tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmexport.log import progress
from rmexport.measures import nll_sum
from rmexport.measures import perplexity as perplexity_of

__all__ = [
    "PerplexityResult",
    "measured_here",
    "perplexity",
    "torch_forward",
    "window_nll",
    "windows_digest",
]

Forward = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float
    n_tokens: int
    n_windows: int


def windows_digest(windows: torch.Tensor) -> str:
    """A short hash of the token ids, so a perplexity measured earlier is reused only on the same windows."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def measured_here(
    measured_path: str | Path, measured_digest: str | None, path: Path, windows: torch.Tensor
) -> bool:
    """Whether a measurement made on ``measured_path`` over windows of ``measured_digest`` was made on
    ``path`` and these windows: only then may a benchmark use it instead of measuring again."""
    return Path(measured_path).resolve() == Path(path).resolve() and measured_digest == windows_digest(
        windows
    )


def window_nll(logits: Any, ids: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids[:, 1:]`` under ``logits[:, :-1]`` (float64), and its count."""
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    return nll_sum(logits[:, :-1], ids[:, 1:])


def perplexity(
    forward: Forward, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity"
) -> PerplexityResult:
    total_nll, total_tokens = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for start in progress(starts, desc=desc, total=len(starts)):
        batch = windows[start : start + batch_size]
        nll, count = window_nll(forward(batch), batch)
        total_nll += nll
        total_tokens += count
    return PerplexityResult(
        perplexity_of(total_nll, total_tokens), total_nll / total_tokens, total_tokens, int(windows.shape[0])
    )


def torch_forward(model: torch.nn.Module) -> Forward:
    """``forward`` for a transformers causal LM (no cache, float32 logits)."""
    device = next(model.parameters()).device

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = model(input_ids=ids.to(device), use_cache=False)
        return out.logits.float().cpu()

    return forward
