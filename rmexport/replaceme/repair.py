"""Sequential repair of the blocks after a cut: each one's attention output projection and
``down_proj`` refitted in closed form.

After the cut, the first blocks that remain see a residual stream they were never trained on.
They are walked in order with the model before the cut (the target) and the pruned model side by
side. In block ``j``, first the attention's output projection is refitted so that, fed the pruned
stream, the stream after the attention matches the target's stream after block ``j``'s attention;
then ``down_proj`` so that the block's output matches the target stream after block ``j``. Each is
the least squares of a map of the projection's input (the attention heads' output, the MLP's
hidden activations), as the hidden map at the cut, shrunk toward the block's own weights by the
ridge strength with the smallest error on the set-aside text. The next block then sees the
repaired stream, so errors are corrected in sequence rather than compounded (GPTQ's order, applied
to depth). Each refit is a map folded into the projection it replaces: only weights change.

One walk gives every prefix: ``stages[k]`` is the pruned plan with the first ``k + 1`` blocks
after the cut repaired, for the quality guard to choose from. A block whose own weights fit the
set-aside text best is left as it is, so its stage is the previous one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..calib.collect import CutEnds, CutStatistics, accumulate, empty_statistics
from ..calib.engine import Captured, Engine, Map, Plan, Step, Stream
from ..calib.tokens import CalibrationSet
from ..fold import ATTENTION_SITE, MLP_SITE
from ..log import get_logger
from ..records import RepairedBlock, TensorRefit
from .solve import RidgeChoice, ridge_toward

__all__ = ["REPAIR_GRID", "Repair", "repair_after_cut"]

log = get_logger(__name__)

# Strengths tried for a repaired block (relative, as in RIDGE_GRID): each finite one costs a
# d_ff × d_ff factorization and solve (d_ff 8960 on Qwen2.5-1.5B). Every block repaired so far, on
# both models, chose 0.01 or 0.1; RIDGE_GRID's weaker strengths gave set-aside errors within 0.1 %
# of 0.001's (bench/results/repair-smollm2-135m.json).
REPAIR_GRID = (1e-3, 1e-2, 1e-1, float("inf"))


@dataclass
class Repair:
    stages: list[Plan]  # the pruned plan with 1, 2, … blocks after the cut repaired
    blocks: list[RepairedBlock]
    seconds: float


class _Streams:
    """One set's target and pruned streams, both just before the same block after the cut."""

    def __init__(self, engine: Engine, name: str, batches, plan: Plan, pruned: Plan, cut, ends):
        start, end = cut
        self.engine, self.name = engine, name
        self.target_mid = Stream({})
        embedded = engine.embed(name, batches)  # also records the batches' block arguments
        if ends is None:  # no kept streams: one pass to the cut for both
            both = engine.advance(
                name, embedded, {"t": plan[:end], "p": pruned[:start]}, desc=f"{name}: to the cut"
            )
            engine.release(embedded)
            self.target, self.pruned = both["t"], both["p"]
            return
        if start >= 2:
            engine.release(embedded)
            entering = engine.stream(
                name, {b: engine.store.get(k) for b, k in ends.entering.items()}, plan[: start - 1]
            )
        else:
            entering = embedded
        self.pruned = engine.advance(name, entering, {"p": pruned[:start]}, desc=f"{name}: the cut's map")[
            "p"
        ]
        engine.release(entering)
        self.target = engine.stream(name, {b: engine.store.get(k) for b, k in ends.after.items()}, plan[:end])

    def advance_target(self, target_plan: Plan) -> None:
        """Run the target's next block (the last of ``target_plan``), keeping its stream after the
        attention (the block's output less what its MLP added) beside the stream after it."""
        engine, name = self.engine, self.name
        position = len(target_plan) - 1
        walking = engine.stream(
            name, {b: engine.store.get(k) for b, k in self.target.keys.items()}, self.target.done
        )
        afters: dict[int, object] = {}
        mids: dict[int, object] = {}

        def on_block(_position: int, b: int, after: torch.Tensor, captured: Captured) -> None:
            assert captured.mlp is not None
            afters[b] = engine.stream(name, {b: after}, ()).keys[b]
            mids[b] = engine.stream(name, {b: after - captured.mlp}, ()).keys[b]

        engine.walk(
            name,
            walking,
            target_plan,
            until=position,
            mlp_at={position},
            on_block=on_block,
            desc=f"{name}: target",
        )
        engine.release(self.target, self.target_mid)
        self.target, self.target_mid = Stream(afters, target_plan), Stream(mids, target_plan)

    def sums(self, pruned: Plan, position: int, site: str, features: int) -> CutStatistics:
        """Sums of the block at ``position`` of ``pruned`` fed the pruned stream: at the attention
        site toward the target's stream after the attention, at the MLP site toward the target
        stream after the block."""
        engine, name = self.engine, self.name
        stats = empty_statistics([0], 1, engine.config.hidden_size, features)[0]
        walking = engine.stream(
            name, {b: engine.store.get(k) for b, k in self.pruned.keys.items()}, self.pruned.done
        )

        def on_block(_position: int, b: int, after: torch.Tensor, captured: Captured) -> None:
            real = engine.batches[name][b][1].to(after.device).bool()
            assert captured.mlp is not None
            if site == ATTENTION_SITE:
                assert captured.attention_output is not None and captured.attention_input is not None
                target = engine.store.get(self.target_mid.keys[b])
                mid = after - captured.mlp
                accumulate(
                    stats,
                    captured.attention_output[real],
                    mid[real],
                    target[real],
                    features=captured.attention_input[real],
                )
            else:
                assert captured.hidden is not None
                target = engine.store.get(self.target.keys[b])
                accumulate(
                    stats, captured.mlp[real], after[real], target[real], features=captured.hidden[real]
                )

        engine.walk(
            name,
            walking,
            pruned,
            until=position,
            mlp_at={position},
            hidden_at={position} if site == MLP_SITE else frozenset(),
            attention_at={position} if site == ATTENTION_SITE else frozenset(),
            on_block=on_block,
            desc=f"{name}: block {pruned[position].layer}, {site}",
        )
        return stats

    def step(self, pruned: Plan, position: int) -> None:
        """Run the (now repaired) block at ``position``."""
        moved = self.engine.advance(
            self.name, self.pruned, {"p": pruned[: position + 1]}, desc=f"{self.name}: repaired"
        )
        self.engine.release(self.pruned)
        self.pruned = moved["p"]

    def close(self) -> None:
        self.engine.release(self.target, self.target_mid, self.pruned)
        self.engine.forget(self.name)


def repair_after_cut(
    engine: Engine,
    plan: Plan,
    pruned: Plan,
    cut: tuple[int, int],
    calibration: CalibrationSet,
    set_aside: CalibrationSet,
    blocks: int,
    *,
    ends: list[CutEnds] | None = None,
    grid: tuple[float, ...] = REPAIR_GRID,
) -> Repair:
    """Repair up to ``blocks`` blocks after ``cut`` of ``plan`` (``pruned`` is ``plan`` cut there,
    its map folded in), fitted on ``calibration`` with strengths chosen on ``set_aside`` from
    ``grid`` (which holds ``inf``: the block as it was, so a repair never fits worse there). ``ends``
    are the two sets' streams around the cut kept by the map's pass; without them the walk starts
    with a pass from the embeddings to the cut."""
    started = time.perf_counter()
    start, end = cut
    blocks = min(blocks, len(pruned) - start)
    streams = [
        _Streams(engine, name, s.batches, plan, pruned, cut, ends[k] if ends is not None else None)
        for k, (name, s) in enumerate((("repair fit", calibration), ("repair set-aside", set_aside)))
    ]
    stages: list[Plan] = []
    repaired: list[RepairedBlock] = []
    adapter = engine.adapter
    try:
        for k in range(blocks):
            position = start + k
            layer = pruned[position].layer
            for s in streams:
                s.advance_target(plan[: end + k + 1])
            prior = engine.attention_output_weight(pruned[position]).T
            attention = _refit(streams, pruned, position, ATTENTION_SITE, prior, grid)
            pruned = _with_map(pruned, position, attention, f"repair {layer} attention", ATTENTION_SITE)
            prior = engine.down_proj_weight(pruned[position]).T
            mlp = _refit(streams, pruned, position, MLP_SITE, prior, grid)
            pruned = _with_map(pruned, position, mlp, f"repair {layer}", MLP_SITE)
            stages.append(pruned)
            prefix = f"{adapter.layers_path}.{position}."
            attention_refit = _refit_record(f"{prefix}{adapter.attention_output}.weight", attention)
            mlp_refit = _refit_record(f"{prefix}{adapter.down_proj}.weight", mlp)
            repaired.append(
                RepairedBlock(
                    layer,
                    mlp_refit.tensor,
                    mlp_refit.ridge,
                    mlp_refit.set_aside_rel_residual,
                    mlp_refit.set_aside_rel_residual_unrepaired,
                    attention=attention_refit,
                )
            )
            for name, r in (("attention output", attention_refit), ("down_proj", mlp_refit)):
                log.info(
                    "repair of block %d's %s: ridge %s toward its own weights, set-aside error %.5f "
                    "(unrepaired %.5f)",
                    layer,
                    name,
                    "∞" if r.ridge is None else f"{r.ridge:g}",
                    r.set_aside_rel_residual,
                    r.set_aside_rel_residual_unrepaired,
                )
            if k + 1 < blocks:
                for s in streams:
                    s.step(pruned, position)
    finally:
        for s in streams:
            s.close()
    return Repair(stages, repaired, round(time.perf_counter() - started, 2))


def _refit(
    streams: list[_Streams],
    pruned: Plan,
    position: int,
    site: str,
    prior: torch.Tensor,
    grid: tuple[float, ...],
) -> RidgeChoice:
    fit, aside = (s.sums(pruned, position, site, prior.shape[0]) for s in streams)
    return ridge_toward(fit, aside, prior, grid)


def _with_map(pruned: Plan, position: int, choice: RidgeChoice, label: str, site: str) -> Plan:
    """``pruned`` with the refit folded into the step at ``position``; at ∞ the block keeps its own
    weights and the plan stays as it was."""
    if choice.alpha == float("inf"):
        return pruned
    step = pruned[position]
    new = Step(step.layer, step.maps + (Map(choice.transform, label, site),), step.explicit)
    return pruned[:position] + (new,) + pruned[position + 1 :]


def _refit_record(tensor: str, choice: RidgeChoice) -> TensorRefit:
    errors = choice.set_aside_rel_residual
    ridge = None if choice.alpha == float("inf") else choice.alpha
    return TensorRefit(tensor, ridge, errors[str(choice.alpha)], errors["inf"])
