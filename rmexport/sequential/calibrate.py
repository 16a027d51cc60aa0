"""Layer-by-layer calibration: the same distances and float64 sums as ``calib.collect``, one block at a time.

The calibration batches are embedded once. The model's own forward then runs with stand-in
blocks that only record what each block would receive (the causal/padding/sliding masks, the
rotary position embeddings, positions), so masks and positions are built exactly as the HF
model builds them. Then, for block ``k = 0 .. deepest needed``: load block ``k``, run every
batch's hidden states through it, keep the residual stream ``L_k`` and MLP contribution ``M_k``
only as long as a candidate cut still needs them, reduce them to the distance profile and
``CutStatistics`` (float64) exactly as the in-memory pass does, and free the block.

Peak memory is one block's weights plus the hidden states of the calibration set and the
window of ``n + 1`` layers a cut spans; what does not fit the budget goes to memory-mapped files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calib.collect import (
    CutActivations,
    CutStatistics,
    DistanceProfile,
    _accumulate,
    _angular,
    _block_output,
)
from ..calib.tokens import CalibrationSet
from ..errors import CalibrationError
from ..log import get_logger, progress
from .blocks import ModelSkeleton

__all__ = [
    "ActivationStore",
    "StreamedModel",
    "collect_activations_sequential",
    "collect_sequential",
]

log = get_logger(__name__)

# Activations kept in memory up to this fraction of RAM (CPU) or of free GPU memory (CUDA).
ACTIVATION_MEMORY_FRACTION = 0.25


class _StopForward(Exception):
    pass


class ActivationStore:
    """Tensors by key, in memory up to ``budget_bytes``, beyond that in memory-mapped files."""

    def __init__(self, device: torch.device, budget_bytes: int | None = None, offload_dir: str | None = None):
        self.device = device
        self.budget_bytes = _default_budget(device) if budget_bytes is None else budget_bytes
        self._offload_root = offload_dir
        self._dir: Path | None = None
        self._tensors: dict[Any, torch.Tensor] = {}
        self._files: dict[Any, Path] = {}
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.offloaded_bytes = 0

    def put(self, key: Any, tensor: torch.Tensor) -> None:
        self.drop(key)
        size = tensor.numel() * tensor.element_size()
        if self.resident_bytes + size <= self.budget_bytes:
            self._tensors[key] = tensor
            self.resident_bytes += size
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="rmexport-activations-", dir=self._offload_root))
        path = self._dir / f"{len(self._files)}-{abs(hash(key))}.bin"
        tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(path)
        mapped = torch.from_file(str(path), shared=False, size=tensor.numel(), dtype=tensor.dtype)
        self._tensors[key] = mapped.view(tensor.shape)
        self._files[key] = path
        self.offloaded_bytes += size

    def get(self, key: Any) -> torch.Tensor:
        tensor = self._tensors[key]
        return tensor.to(self.device) if key in self._files else tensor

    def __contains__(self, key: Any) -> bool:
        return key in self._tensors

    def drop(self, key: Any) -> None:
        tensor = self._tensors.pop(key, None)
        if tensor is None:
            return
        path = self._files.pop(key, None)
        if path is None:
            self.resident_bytes -= tensor.numel() * tensor.element_size()
        else:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._tensors.clear()
        self._files.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * ACTIVATION_MEMORY_FRACTION)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * ACTIVATION_MEMORY_FRACTION)


class _RecordInputs(nn.Module):
    """Stands in for decoder block ``position`` and records what the model passes to it."""

    def __init__(self, position: int, attention_type: str | None, record: dict, last: bool):
        super().__init__()
        self.position = position
        if attention_type is not None:
            self.attention_type = attention_type
        self._record = record
        self._last = last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        if args:
            raise AssertionError(
                "decoder blocks are expected to get everything but the hidden states by name"
            )
        if self.position == 0:
            self._record["hidden"] = hidden_states
        self._record[self.position] = kwargs
        if self._last:
            raise _StopForward
        return (hidden_states,)


def _layer_inputs(
    skeleton: ModelSkeleton, ids: torch.Tensor, mask: torch.Tensor, positions: int
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Embedded ``ids`` and the keyword arguments of decoder blocks ``0 .. positions-1``."""
    base = skeleton.base
    parent_path, _, attr = skeleton.adapter.layers_path.rpartition(".")
    parent = skeleton.model.get_submodule(parent_path)
    real_blocks = getattr(parent, attr)
    record: dict[Any, Any] = {}
    stand_ins = nn.ModuleList(
        _RecordInputs(
            k,
            getattr(real_blocks[skeleton.layers[k]], "attention_type", None),
            record,
            last=k == positions - 1,
        )
        for k in range(positions)
    )
    setattr(parent, attr, stand_ins)
    try:
        try:
            base(
                input_ids=ids.to(skeleton.device),
                attention_mask=mask.to(skeleton.device),
                use_cache=False,
            )
        except _StopForward:
            pass
    finally:
        setattr(parent, attr, real_blocks)
    return record["hidden"], [record[k] for k in range(positions)]


# callback(start, batch_index, before=L_{s-1}, after=L_{s+n-1}, mlp=M_{s-1} or None, real mask)
CutCallback = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], None]


def _stream(
    skeleton: ModelSkeleton,
    calibration: CalibrationSet,
    *,
    n: int,
    starts: list[int],
    mlp_starts: list[int],
    on_cut: CutCallback,
    desc: str,
    store: ActivationStore,
    keep: bool = False,
) -> None:
    """Run the calibration set block by block and call ``on_cut`` for every (start, batch) once
    the block that closes the cut has run. ``starts`` index blocks of the skeleton's model.
    With ``keep``, every ``("L", k, b)`` and ``("M", k, b)`` stays in ``store`` afterwards."""
    residual_positions = {s - 1 for s in starts} | {s + n - 1 for s in starts}
    mlp_positions = {s - 1 for s in mlp_starts}
    deepest = max(residual_positions | mlp_positions)
    # After which block each kept tensor can be dropped.
    last_use: dict[tuple[str, int], int] = {}
    for s in starts:
        for key in (("L", s - 1), ("L", s + n - 1)):
            last_use[key] = max(last_use.get(key, -1), s + n - 1)
    for s in mlp_starts:
        last_use[("M", s - 1)] = max(last_use.get(("M", s - 1), -1), s + n - 1)
    ending_at: dict[int, list[int]] = {}
    for s in starts:
        ending_at.setdefault(s + n - 1, []).append(s)

    kwargs_per_batch: list[list[dict[str, Any]]] = []
    masks: list[torch.Tensor] = []
    embed_path = f"{skeleton.base_path}.embed_tokens"
    skeleton.load_embedding()
    try:
        for b, (ids, mask) in enumerate(calibration.batches):
            hidden, kwargs = _layer_inputs(skeleton, ids, mask, deepest + 1)
            store.put(("H", b), hidden)
            kwargs_per_batch.append(kwargs)
            masks.append(mask.bool().to(skeleton.device))
    finally:
        skeleton.free(embed_path)

    captured: dict[str, torch.Tensor] = {}

    def on_mlp(_module, _inputs, output):
        captured["mlp"] = output.detach()

    for k in progress(range(deepest + 1), desc=desc, total=deepest + 1):
        layer_idx = skeleton.layers[k]
        block = skeleton.load_block(layer_idx)
        handle = None
        if k in mlp_positions:
            handle = skeleton.adapter.mlp_output_module(block).register_forward_hook(on_mlp)
        try:
            for b in range(len(calibration.batches)):
                hidden = _block_output(block(store.get(("H", b)), **kwargs_per_batch[b][k]))
                store.put(("H", b), hidden)
                if k in residual_positions:
                    store.put(("L", k, b), hidden)
                if k in mlp_positions:
                    store.put(("M", k, b), captured.pop("mlp"))
                for s in ending_at.get(k, []):
                    mlp = store.get(("M", s - 1, b)) if ("M", s - 1, b) in store else None
                    on_cut(s, b, store.get(("L", s - 1, b)), hidden, mlp, masks[b])
        finally:
            if handle is not None:
                handle.remove()
            skeleton.free_block(layer_idx)
        for (kind, position), last in last_use.items():
            if last == k and not keep:
                for b in range(len(calibration.batches)):
                    store.drop((kind, position, b))
        log.debug("block %d (original %d) done", k, layer_idx)


def collect_sequential(
    skeleton: ModelSkeleton,
    calibration: CalibrationSet,
    *,
    n: int,
    starts: list[int],
    stats_for: list[int],
    desc: str = "Calibrating",
    store: ActivationStore | None = None,
) -> tuple[DistanceProfile, dict[int, CutStatistics]]:
    """``calib.collect.collect`` computed block by block: the same profile and float64 sums."""
    d = skeleton.config.hidden_size
    profile = DistanceProfile(n=n, starts=list(starts))
    stats = {
        s: CutStatistics(s, n, torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64))
        for s in stats_for
    }

    def on_cut(s, _b, before, after, mlp, real):
        _add_distances(profile, s, before, after, real)
        if s in stats:
            _accumulate(stats[s], mlp[real], before[real], after[real])

    own_store = store is None
    store = store or ActivationStore(skeleton.device)
    try:
        with torch.inference_mode():
            _stream(
                skeleton,
                calibration,
                n=n,
                starts=list(starts),
                mlp_starts=list(stats_for),
                on_cut=on_cut,
                desc=desc,
                store=store,
            )
    finally:
        if own_store:
            store.close()
    _count_tokens(profile, calibration)
    _check_finite(stats)
    return profile, stats


def _add_distances(
    profile: DistanceProfile, s: int, before: torch.Tensor, after: torch.Tensor, real: torch.Tensor
) -> None:
    last = real.sum(dim=1) - 1
    rows = torch.arange(real.shape[0], device=real.device)
    profile.last_sum[s] = profile.last_sum.get(s, 0.0) + float(
        _angular(before[rows, last], after[rows, last]).sum()
    )
    profile.all_sum[s] = profile.all_sum.get(s, 0.0) + float(_angular(before[real], after[real]).sum())


def _count_tokens(profile: DistanceProfile, calibration: CalibrationSet) -> None:
    for ids, mask in calibration.batches:
        profile.last_count += int(ids.shape[0])
        profile.all_count += int(mask.bool().sum())


def _check_finite(stats: dict[int, CutStatistics]) -> None:
    for acc in stats.values():
        if not (torch.isfinite(acc.gram).all() and torch.isfinite(acc.cross).all()):
            raise CalibrationError(
                f"non-finite statistics for cut {acc.cut}", hint="use a float32 compute dtype"
            )


def collect_activations_sequential(
    skeleton: ModelSkeleton, calibration: CalibrationSet, cut: tuple[int, int], desc: str = "Collecting"
) -> CutActivations:
    """``calib.collect.collect_activations`` block by block."""
    start, end = cut
    mlp: dict[int, torch.Tensor] = {}
    before: dict[int, torch.Tensor] = {}
    after: dict[int, torch.Tensor] = {}

    def on_cut(_s, b, stream_before, stream_after, mlp_out, real):
        mlp[b] = mlp_out[real].float().cpu()
        before[b] = stream_before[real].float().cpu()
        after[b] = stream_after[real].float().cpu()

    store = ActivationStore(skeleton.device)
    try:
        with torch.inference_mode():
            _stream(
                skeleton,
                calibration,
                n=end - start,
                starts=[start],
                mlp_starts=[start],
                on_cut=on_cut,
                desc=desc,
                store=store,
            )
    finally:
        store.close()
    order = sorted(mlp)
    return CutActivations.from_batches(
        [mlp[b] for b in order], [before[b] for b in order], [after[b] for b in order]
    )


def _distances_then_chosen_sums(
    skeleton: ModelSkeleton,
    calibration: CalibrationSet,
    n: int,
    starts: list[int],
    distance_tokens: str,
    desc: str,
) -> tuple[DistanceProfile, dict[int, CutStatistics]]:
    """One pass for the distance rule: distances of every candidate while the activations the
    sums need are kept (offloaded beyond the budget); then the sums of the closest cut only."""
    profile = DistanceProfile(n=n, starts=list(starts))

    def on_cut(s, _b, before, after, _mlp, real):
        _add_distances(profile, s, before, after, real)

    store = ActivationStore(skeleton.device)
    try:
        with torch.inference_mode():
            _stream(
                skeleton,
                calibration,
                n=n,
                starts=list(starts),
                mlp_starts=list(starts),
                on_cut=on_cut,
                desc=desc,
                store=store,
                keep=True,
            )
            _count_tokens(profile, calibration)
            distances = profile.mean(distance_tokens)
            chosen = min(distances, key=lambda s: (distances[s], s))
            d = skeleton.config.hidden_size
            acc = CutStatistics(
                chosen, n, torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
            )
            for b, (_ids, mask) in enumerate(calibration.batches):
                real = mask.bool().to(skeleton.device)
                _accumulate(
                    acc,
                    store.get(("M", chosen - 1, b))[real],
                    store.get(("L", chosen - 1, b))[real],
                    store.get(("L", chosen + n - 1, b))[real],
                )
    finally:
        store.close()
    _check_finite({chosen: acc})
    return profile, {chosen: acc}


class StreamedModel:
    """A ``replaceme.survey.CalibrationSource`` that holds one block at a time."""

    def __init__(self, skeleton: ModelSkeleton):
        self.skeleton = skeleton

    @property
    def adapter(self):
        return self.skeleton.adapter

    @property
    def n_blocks(self) -> int:
        return len(self.skeleton.layers)

    @property
    def hidden_size(self) -> int:
        return self.skeleton.config.hidden_size

    def collect(self, calibration, *, n, starts, stats_for, desc):
        return collect_sequential(
            self.skeleton, calibration, n=n, starts=starts, stats_for=stats_for, desc=desc
        )

    def collect_activations(self, calibration, cut, desc):
        return collect_activations_sequential(self.skeleton, calibration, cut, desc=desc)

    def closest_by_distance(self, calibration, *, n, starts, distance_tokens, desc):
        return _distances_then_chosen_sums(self.skeleton, calibration, n, starts, distance_tokens, desc)
