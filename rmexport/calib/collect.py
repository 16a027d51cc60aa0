"""Stream calibration batches through the model and keep only what the method needs.

Hooks on the decoder blocks record the residual stream ``L_j`` after each block and the MLP's
contribution ``M_j`` to it. The forward stops right after the deepest block any candidate needs
(no later blocks, no final norm, no LM head). Per batch, the activations are reduced to:

* the angular distance between ``L_{s-1}`` and ``L_{s+n-1}`` for every candidate start ``s``,
  over the last real token of each sequence and over all real tokens;
* for every candidate whose statistics are requested, the float64 sums
  ``A = Σ MᵀM``, ``B = Σ Mᵀ·target`` with ``M = M_{s-1}`` and ``target = L_{s+n-1} − L_{s-1} + M``,
  plus ``Σ‖target‖²`` and ``Σ‖L_{s+n-1}‖²`` (for the residual of the fit and of plain removal).

Nothing else is kept, so memory does not grow with the amount of calibration data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch import ArchAdapter
from ..errors import CalibrationError
from ..log import progress
from .tokens import CalibrationSet

__all__ = [
    "CutActivations",
    "CutStatistics",
    "DistanceProfile",
    "capture",
    "collect",
    "collect_activations",
]


class _StopForward(Exception):
    """Raised by the hook of the deepest needed block to skip the rest of the model."""


@dataclass
class CutStatistics:
    """Streaming sums for one candidate cut ``[start, start + n)``; see the module docstring."""

    start: int
    n: int
    gram: torch.Tensor  # A, d×d float64
    cross: torch.Tensor  # B, d×d float64
    target_energy: float = 0.0  # Σ‖target‖²
    stream_energy: float = 0.0  # Σ‖L_{s+n-1}‖²
    tokens: int = 0

    @property
    def cut(self) -> tuple[int, int]:
        return (self.start, self.start + self.n)


@dataclass
class DistanceProfile:
    """Mean angular distance per candidate start, over last tokens and over all real tokens."""

    n: int
    starts: list[int]
    last_sum: dict[int, float] = field(default_factory=dict)
    last_count: int = 0
    all_sum: dict[int, float] = field(default_factory=dict)
    all_count: int = 0

    def mean(self, tokens: str) -> dict[int, float]:
        sums, count = (self.last_sum, self.last_count) if tokens == "last" else (self.all_sum, self.all_count)
        return {s: sums.get(s, 0.0) / max(count, 1) for s in self.starts}


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture(
    model: nn.Module,
    adapter: ArchAdapter,
    residual_layers: set[int],
    mlp_layers: set[int],
    stop_early: bool = True,
) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Record block outputs (``residual[j]``) and MLP contributions (``mlp[j]``) during forwards.

    With ``stop_early`` the forward is cut short after the deepest recorded block (callers run
    it through ``_run_until_stop``).
    """
    store: dict[str, dict[int, torch.Tensor]] = {"residual": {}, "mlp": {}}
    deepest = max(residual_layers | mlp_layers)
    blocks = adapter.blocks(model)
    handles = []

    def on_block(j: int):
        def hook(_module, _inputs, output):
            if j in residual_layers:
                store["residual"][j] = _block_output(output).detach()
            if stop_early and j == deepest:
                raise _StopForward

        return hook

    def on_mlp(j: int):
        def hook(_module, _inputs, output):
            store["mlp"][j] = output.detach()

        return hook

    try:
        for j in sorted(residual_layers | {deepest}):
            handles.append(blocks[j].register_forward_hook(on_block(j)))
        for j in sorted(mlp_layers):
            handles.append(adapter.mlp_output_module(blocks[j]).register_forward_hook(on_mlp(j)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _run_until_stop(model: nn.Module, adapter: ArchAdapter, ids: torch.Tensor, mask: torch.Tensor) -> None:
    base = model.get_submodule(adapter.layers_path.rpartition(".")[0])
    device = next(model.parameters()).device
    with torch.inference_mode(), contextlib.suppress(_StopForward):
        base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)


def _angular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def collect(
    model: nn.Module,
    adapter: ArchAdapter,
    calibration: CalibrationSet,
    *,
    n: int,
    starts: list[int],
    stats_for: list[int],
    desc: str = "Calibrating",
) -> tuple[DistanceProfile, dict[int, CutStatistics]]:
    """One pass: the distance profile of every ``start`` and the sums of every ``stats_for`` start."""
    d = model.config.hidden_size
    profile = DistanceProfile(n=n, starts=list(starts))
    stats = {
        s: CutStatistics(s, n, torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64))
        for s in stats_for
    }
    residual_layers = {s - 1 for s in starts} | {s + n - 1 for s in starts}
    mlp_layers = {s - 1 for s in stats_for}
    with capture(model, adapter, residual_layers, mlp_layers) as store:
        for ids, mask in progress(calibration.batches, desc=desc, total=len(calibration.batches)):
            _run_until_stop(model, adapter, ids, mask)
            real = mask.bool().to(next(iter(store["residual"].values())).device)
            last = real.sum(dim=1) - 1
            rows = torch.arange(ids.shape[0])
            for s in starts:
                # With accelerate's device_map the two blocks may sit on different devices.
                before = store["residual"][s - 1]
                after = store["residual"][s + n - 1].to(before.device)
                real = real.to(before.device)
                last = last.to(before.device)
                profile.last_sum[s] = profile.last_sum.get(s, 0.0) + float(
                    _angular(before[rows, last], after[rows, last]).sum()
                )
                profile.all_sum[s] = profile.all_sum.get(s, 0.0) + float(
                    _angular(before[real], after[real]).sum()
                )
            profile.last_count += int(ids.shape[0])
            profile.all_count += int(real.sum())
            for s, acc in stats.items():
                before = store["residual"][s - 1]
                here = real.to(before.device)
                _accumulate(
                    acc,
                    store["mlp"][s - 1][here],
                    before[here],
                    store["residual"][s + n - 1].to(before.device)[here],
                )
            store["residual"].clear()
            store["mlp"].clear()
    for acc in stats.values():
        if not (torch.isfinite(acc.gram).all() and torch.isfinite(acc.cross).all()):
            raise CalibrationError(
                f"non-finite statistics for cut {acc.cut}",
                hint="check the weights, or use --compute-dtype float32",
            )
    return profile, stats


def _accumulate(acc: CutStatistics, mlp_out: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> None:
    m = mlp_out.to(torch.float64)
    gram = m.T @ m
    acc.gram += gram.cpu()
    acc.cross += (m.T @ (after.to(torch.float64) - before.to(torch.float64))).cpu() + gram.cpu()
    target = after.to(torch.float64) - before.to(torch.float64) + m
    acc.target_energy += float((target * target).sum())
    acc.stream_energy += float(after.to(torch.float64).pow(2).sum())
    acc.tokens += int(m.shape[0])


@dataclass
class CutActivations:
    """Every real token's activations around one cut, float32, for solvers that need them raw.

    After folding T, the stream leaving block ``s-1`` is ``bypass + mlp·T``; the fit wants it
    to match ``after``, the stream the removed blocks produced."""

    mlp: torch.Tensor  # M_{s-1}
    bypass: torch.Tensor  # L_{s-1} − M_{s-1}
    after: torch.Tensor  # L_{s+n-1}

    @classmethod
    def from_batches(cls, mlp: list[torch.Tensor], before: list[torch.Tensor], after: list[torch.Tensor]):
        m = torch.cat(mlp)
        return cls(m, torch.cat(before) - m, torch.cat(after))

    @property
    def target(self) -> torch.Tensor:
        """What ``mlp·T`` alone must reproduce (the least-squares target)."""
        return self.after - self.bypass


def collect_activations(
    model: nn.Module,
    adapter: ArchAdapter,
    calibration: CalibrationSet,
    cut: tuple[int, int],
    desc: str = "Collecting",
) -> CutActivations:
    start, end = cut
    mlp, before, after = [], [], []
    with capture(model, adapter, {start - 1, end - 1}, {start - 1}) as store:
        for ids, mask in progress(calibration.batches, desc=desc, total=len(calibration.batches)):
            _run_until_stop(model, adapter, ids, mask)
            real = mask.bool()
            mlp.append(store["mlp"][start - 1][real].float().cpu())
            before.append(store["residual"][start - 1][real].float().cpu())
            after.append(store["residual"][end - 1][real].float().cpu())
            store["residual"].clear()
            store["mlp"].clear()
    return CutActivations.from_batches(mlp, before, after)
