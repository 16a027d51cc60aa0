"""Sequential repair of the blocks after a cut: each one's ``down_proj`` refitted in closed form.

After the cut, the first blocks that remain see a residual stream they were never trained on.
They are walked in order with the model before the cut (the target) and the pruned model side by
side. Block ``j``'s ``down_proj`` is refitted so that, fed the pruned stream, the block's output
matches the target stream after block ``j``: the least squares of the map of its MLP's hidden
activations (as the hidden map at the cut), shrunk toward the block's own weights by the ridge
strength with the smallest error on the set-aside text. The next block then sees the repaired
stream, so errors are corrected in sequence rather than compounded (GPTQ's order, applied to
depth). Each repaired block is a map of its hidden activations folded into its ``down_proj``:
only weights change.

One walk gives every prefix: ``stages[k]`` is the pruned plan with the first ``k + 1`` blocks
after the cut repaired, for the quality guard to choose from. A block whose own weights fit the
set-aside text best is left as it is, so its stage is the previous one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..calib.collect import CutEnds, accumulate, empty_statistics
from ..calib.engine import Engine, Map, Plan, Step
from ..calib.tokens import CalibrationSet
from ..log import get_logger
from ..records import RepairedBlock
from .solve import ridge_toward

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

    def block_sums(self, target_plan: Plan, pruned: Plan, position: int, features: int):
        """Sums of the block at ``position`` of ``pruned`` fed the pruned stream, toward the target
        stream after the same block (its step of ``target_plan``)."""
        engine, name = self.engine, self.name
        moved = engine.advance(name, self.target, {"t": target_plan}, desc=f"{name}: target")["t"]
        engine.release(self.target)
        self.target = moved
        stats = empty_statistics([0], 1, engine.config.hidden_size, features)[0]
        walking = engine.stream(
            name, {b: engine.store.get(k) for b, k in self.pruned.keys.items()}, self.pruned.done
        )

        def on_block(_position: int, b: int, after: torch.Tensor, mlp, hidden) -> None:
            real = engine.batches[name][b][1].to(after.device).bool()
            target = engine.store.get(self.target.keys[b])
            accumulate(stats, mlp[real], after[real], target[real], features=hidden[real])

        engine.walk(
            name,
            walking,
            pruned,
            until=position,
            mlp_at={position},
            hidden_at={position},
            on_block=on_block,
            desc=f"{name}: block {pruned[position].layer}",
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
        self.engine.release(self.target, self.pruned)
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
    features = engine.config.intermediate_size
    streams = [
        _Streams(engine, name, s.batches, plan, pruned, cut, ends[k] if ends is not None else None)
        for k, (name, s) in enumerate((("repair fit", calibration), ("repair set-aside", set_aside)))
    ]
    stages: list[Plan] = []
    repaired: list[RepairedBlock] = []
    try:
        for k in range(blocks):
            position = start + k
            target_plan = plan[: end + k + 1]
            fit, aside = (s.block_sums(target_plan, pruned, position, features) for s in streams)
            prior = engine.down_proj_weight(pruned[position]).T
            choice = ridge_toward(fit, aside, prior, grid)
            layer = pruned[position].layer
            if choice.alpha != float("inf"):  # at inf the block keeps its own weights: the plan stays
                pruned = (
                    pruned[:position]
                    + (Step(layer, (Map(choice.transform, f"repair {layer}"),)),)
                    + pruned[position + 1 :]
                )
            stages.append(pruned)
            errors = choice.set_aside_rel_residual
            adapter = engine.adapter
            repaired.append(
                RepairedBlock(
                    layer,
                    f"{adapter.layers_path}.{position}.{adapter.down_proj}.weight",
                    None if choice.alpha == float("inf") else choice.alpha,
                    errors[str(choice.alpha)],
                    errors["inf"],
                )
            )
            log.info(
                "repair of block %d: ridge %g toward its own weights, set-aside error %.5f (unrepaired %.5f)",
                layer,
                choice.alpha,
                errors[str(choice.alpha)],
                errors["inf"],
            )
            if k + 1 < blocks:
                for s in streams:
                    s.step(pruned, position)
    finally:
        for s in streams:
            s.close()
    return Repair(stages, repaired, round(time.perf_counter() - started, 2))
