"""Shared measurements: angular distance, next-token loss, perplexity and KL divergence.

The bottom of the project, next to ``errors`` and ``log``: method (calibration's cut distances,
the engine's held-out loss) and validation (perplexity in every runtime, parity's KL) compute
these the same way by calling this module. It imports only torch, numpy and math. Everything is
computed in float64 (the sum of exponentials in the logits' dtype, see ``token_nll``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["angular_distance", "kl_rows", "log_normalizer", "nll_sum", "perplexity", "token_nll"]


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cosine similarity) / π between the last-axis vectors of ``a`` and ``b``, in [0, 1]."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last axis, in float64 (no full log-softmax is held).

    The exponentials are summed in the logits' own dtype (float32) after subtracting each row's
    maximum: every term is at most 1 and the sum at least 1, so float32 keeps it to ~1e-7 relative,
    and a float64 copy of every logit (slower than the LM head's matmul itself) is never made."""
    peak = logits.max(-1, keepdim=True).values
    sum_exp = (logits - peak).exp_().sum(-1)
    return sum_exp.double().log() + peak.squeeze(-1).double()


def token_nll(
    logits: torch.Tensor, targets: torch.Tensor, normalizer: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative log-likelihood of each target id under the logits at its position, in float64:
    ``logsumexp(logits) - logits[target]``. ``logits [..., V]``, ``targets [...]``; ``normalizer``:
    the logits' ``log_normalizer`` where the caller already has it."""
    logits = torch.as_tensor(logits)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if normalizer is None:
        normalizer = log_normalizer(logits)
    picked = logits.gather(-1, targets.to(logits.device).unsqueeze(-1)).squeeze(-1)
    return normalizer - picked.double()


def nll_sum(
    logits: torch.Tensor,
    targets: torch.Tensor,
    counted: torch.Tensor | None = None,
    normalizer: torch.Tensor | None = None,
) -> tuple[float, int]:
    """Summed ``token_nll`` and how many predictions it sums (only the ``counted`` ones, a bool
    mask shaped like ``targets``, when given)."""
    nll = token_nll(logits, targets, normalizer)
    if counted is None:
        return float(nll.sum()), int(nll.numel())
    counted = counted.to(nll.device)
    return float(nll[counted].sum()), int(counted.sum())


def perplexity(nll: float, count: int) -> float:
    """exp of the mean negative log-likelihood."""
    return math.exp(nll / count)


def kl_rows(ref_logits: np.ndarray | torch.Tensor, logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """KL(softmax(ref) ‖ softmax(logits)) of every row (last axis), in float64."""
    ref = torch.as_tensor(ref_logits).double()
    p = torch.log_softmax(ref, -1)
    q = torch.log_softmax(torch.as_tensor(logits).double(), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()
