"""The block engine: every forward a prune needs, one decoder block at a time.

A *plan* is the model as a sequence of steps, each an original block (with the fitted maps
folded into it, or applied explicitly after its MLP for the fold-parity reference). The original
model, plain removal and the pruned model are three plans over the same blocks. The engine
embeds a set of token batches once (recording the masks and position embeddings that the model
itself builds for its blocks), then walks the original blocks in order: each block is loaded
once (or is already resident), every plan that uses it advances through it, and it is freed.
Plans that agree on their first steps share those activations, so the three held-out
evaluations cost one pass over the common prefix. Activations live in an ``ActivationStore``
(in memory up to the budget, on disk beyond), so a model on disk and a model in memory take the
same path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compute import gpu_indices, gpu_memory_bytes
from ..fold import ATTENTION_SITE, MLP_SITE, fold_map, is_hidden_map, site_module
from ..log import get_logger, progress
from ..measures import log_normalizer, nll_sum
from .budget import MemoryBudget
from .placement import place_blocks
from .store import ActivationStore
from .weights import ModelSkeleton, largest_module_bytes, model_bytes

__all__ = [
    "Batches",
    "Captured",
    "Engine",
    "LogitComparison",
    "Map",
    "Plan",
    "Step",
    "Stream",
    "cut_plan",
    "original_plan",
]

log = get_logger(__name__)

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # (input_ids, attention_mask) per batch


@dataclass(frozen=True, eq=False)
class Map:
    """A fitted map (see ``rmexport.fold.fold_map`` for its shapes and sites); compared by identity."""

    transform: torch.Tensor
    label: str = ""
    site: str = MLP_SITE


@dataclass(frozen=True)
class Captured:
    """What ``Engine.walk`` captured inside one block for one batch (None where not asked for)."""

    mlp: torch.Tensor | None = None  # M: what the MLP adds to the residual stream
    hidden: torch.Tensor | None = None  # H: the input of down_proj
    attention_input: torch.Tensor | None = None  # A: the input of the attention's output projection
    attention_output: torch.Tensor | None = None  # what that projection adds to the stream


@dataclass(frozen=True)
class Step:
    """Original block ``layer`` with ``maps`` folded in (or, ``explicit``, applied after its MLP)."""

    layer: int
    maps: tuple[Map, ...] = ()
    explicit: bool = False


Plan = tuple[Step, ...]


def original_plan(n_layers: int) -> Plan:
    return tuple(Step(j) for j in range(n_layers))


def cut_plan(plan: Plan, cut: tuple[int, int], new_map: Map | None = None) -> Plan:
    """``plan`` without steps ``[start, end)``; ``new_map`` is folded into step ``start - 1``."""
    start, end = cut
    steps = list(plan)
    if new_map is not None:
        folded = steps[start - 1]
        steps[start - 1] = Step(folded.layer, folded.maps + (new_map,), folded.explicit)
    return tuple(steps[:start] + steps[end:])


def explicit(plan: Plan) -> Plan:
    """The same plan with every map applied after its block's MLP instead of folded."""
    return tuple(Step(s.layer, s.maps, explicit=bool(s.maps)) for s in plan)


class _StopForward(Exception):
    pass


class _RecordInputs(nn.Module):
    """Stands in for a decoder block and records what the model passes to blocks of its type."""

    def __init__(self, attention_type: str | None, record: dict, last: bool):
        super().__init__()
        if attention_type is not None:
            self.attention_type = attention_type
        self._type = attention_type
        self._record = record
        self._last = last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        if args:
            raise AssertionError(
                "decoder blocks are expected to get everything but the hidden states by name"
            )
        self._record.setdefault("hidden", hidden_states)
        self._record[self._type] = kwargs
        if self._last:
            raise _StopForward
        return (hidden_states,)


def _moved(value: Any, device: torch.device) -> Any:
    """``value`` (a block's keyword arguments: tensors, tuples of them) with its tensors on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device) for v in value)
    return value


def _spread_blocks(skeleton: ModelSkeleton, gpus: list[int], reserved: int) -> None:
    """Place the resident blocks over ``gpus`` (accelerate's device map), the first GPU keeping the
    embedding, final norm and LM head and ``reserved`` bytes of activations; where they do not all fit,
    the blocks stream one at a time to the first GPU instead."""
    blocks = skeleton.adapter.blocks(skeleton.model)
    in_blocks = {id(p) for p in blocks.parameters()}
    element = torch.tensor([], dtype=skeleton.compute_dtype).element_size()
    outside = element * sum(p.numel() for p in skeleton.model.parameters() if id(p) not in in_blocks)
    memory = {i: gpu_memory_bytes(i) for i in gpus}
    placed = place_blocks(blocks, memory, skeleton.compute_dtype, reserved=outside + reserved)
    if placed is None:
        log.warning("the blocks do not fit on %d GPUs at once; streaming them one at a time", len(gpus))
        skeleton.resident = False
        return
    skeleton.block_devices = {skeleton.block_path(i): device for i, device in enumerate(placed)}
    counts = {str(d): sum(1 for p in placed if p == d) for d in dict.fromkeys(placed)}
    log.info("blocks placed over %d GPUs: %s", len(gpus), ", ".join(f"{n} on {d}" for d, n in counts.items()))


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@dataclass
class Stream:
    """Hidden states of some batches, all at the same point of a plan (``done`` steps run)."""

    keys: dict[int, Any]  # batch index -> store key
    done: Plan = ()


@dataclass
class _Branch:
    """Plans that agree on every step so far, and the store key of their shared activations."""

    key: Any
    plans: list[str]
    position: int  # steps of these plans already run
    owned: bool = True  # created by this walk, so it may be dropped once unused


@dataclass
class Engine:
    """Forwards of token batches through plans over ``skeleton``'s blocks."""

    skeleton: ModelSkeleton
    store: ActivationStore
    batches: dict[str, Batches] = field(default_factory=dict)
    weights_bytes: int = 0  # the checkpoint's tensors in the compute dtype (set by ``open``)
    largest_module_bytes: int = 0  # the largest module a streamed pass holds at once
    _kwargs: dict[tuple[str, int], dict[str | None, dict[str, Any]]] = field(default_factory=dict)
    _counter: int = 0

    @classmethod
    def open(
        cls,
        checkpoint: str | Path,
        budget: MemoryBudget,
        *,
        device: str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
    ) -> Engine:
        """The engine over a local checkpoint: weights resident when they fit the budget."""
        weights = model_bytes(checkpoint, compute_dtype)
        skeleton = ModelSkeleton(
            checkpoint, device=device, compute_dtype=compute_dtype, resident=budget.weights_resident(weights)
        )
        largest = largest_module_bytes(checkpoint, skeleton.adapter.layers_path, compute_dtype)
        activations = budget.activation_bytes(weights, largest)
        gpus = gpu_indices(device)
        if skeleton.resident and len(gpus) > 1:
            activations = min(activations, gpu_memory_bytes(gpus[0]) // 2)  # they stay on the first GPU
            _spread_blocks(skeleton, gpus, reserved=activations)
        store = ActivationStore(torch.device(device), activations)
        return cls(skeleton, store, weights_bytes=weights, largest_module_bytes=largest)

    @property
    def adapter(self):
        return self.skeleton.adapter

    @property
    def config(self):
        return self.skeleton.config

    @property
    def n_layers(self) -> int:
        return self.skeleton.n_layers

    def _new_key(self, tag: str) -> tuple[str, int]:
        self._counter += 1
        return (tag, self._counter)

    def _attention_types(self) -> list[str | None]:
        blocks = self.adapter.blocks(self.skeleton.model)
        return list(dict.fromkeys(getattr(block, "attention_type", None) for block in blocks))

    # --- embedding ------------------------------------------------------------------------
    def embed(self, name: str, batches: Batches) -> Stream:
        """Embed ``batches`` and record each attention type's block arguments for them."""
        self.batches[name] = batches
        skeleton = self.skeleton
        parent_path, _, attr = self.adapter.layers_path.rpartition(".")
        parent = skeleton.model.get_submodule(parent_path)
        real_blocks = getattr(parent, attr)
        types = self._attention_types()
        keys: dict[int, Any] = {}
        skeleton.load_embedding()
        try:
            for b, (ids, mask) in enumerate(batches):
                record: dict[Any, Any] = {}
                stand_ins = nn.ModuleList(
                    _RecordInputs(t, record, last=k == len(types) - 1) for k, t in enumerate(types)
                )
                setattr(parent, attr, stand_ins)
                try:
                    with torch.inference_mode(), contextlib.suppress(_StopForward):
                        skeleton.base(
                            input_ids=ids.to(skeleton.device),
                            attention_mask=mask.to(skeleton.device),
                            use_cache=False,
                        )
                finally:
                    setattr(parent, attr, real_blocks)
                self._kwargs[(name, b)] = {t: record[t] for t in types}
                keys[b] = self._new_key(name)
                self.store.put(keys[b], record["hidden"])
        finally:
            skeleton.free(skeleton.embedding_path)
        return Stream(keys)

    def stream(self, name: str, states: dict[int, torch.Tensor], done: Plan) -> Stream:
        """A stream of ``name``'s batches from hidden states after ``done`` (stored anew)."""
        keys = {}
        for b, state in states.items():
            keys[b] = self._new_key(name)
            self.store.put(keys[b], state)
        return Stream(keys, done)

    def release(self, *streams: Stream) -> None:
        for stream in streams:
            for key in stream.keys.values():
                self.store.drop(key)

    def forget(self, name: str) -> None:
        """Drop the batches and block arguments recorded for ``name``."""
        for b in range(len(self.batches.pop(name, []))):
            self._kwargs.pop((name, b), None)

    # --- running blocks -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _variant(self, block: nn.Module, step: Step) -> Iterator[None]:
        """``block`` as ``step`` wants it: maps folded in, or applied after the module they replace."""
        if not step.maps:
            yield
            return
        adapter = self.adapter
        targets = {site: site_module(adapter, block, site) for site in {m.site for m in step.maps}}
        originals = {site: module.weight.data.clone() for site, module in targets.items()}
        handles = []
        try:
            for site, module in targets.items():
                maps = tuple(m for m in step.maps if m.site == site)
                if step.explicit:
                    handles.append(module.register_forward_hook(_apply_maps(maps)))
                else:
                    for m in maps:
                        fold_map(adapter, block, m.transform, site)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for site, module in targets.items():
                module.weight.data.copy_(originals[site])

    def _run_block(self, name: str, b: int, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        kwargs = self._kwargs[(name, b)][getattr(block, "attention_type", None)]
        device = next(block.parameters()).device
        if device == hidden.device:
            return _block_output(block(hidden, **kwargs))
        # A block placed on another GPU: its inputs go there, its output comes back.
        output = _block_output(block(hidden.to(device), **_moved(kwargs, device)))
        return output.to(hidden.device)

    def advance(
        self,
        name: str,
        stream: Stream,
        plans: dict[str, Plan],
        *,
        only: dict[str, set[int]] | None = None,
        desc: str = "Forward",
    ) -> dict[str, Stream]:
        """Run every plan from ``stream`` (whose ``done`` steps each plan starts with) to its end.

        ``only`` restricts a plan to some batches. Plans that share steps share the work. The
        input stream is left untouched; each plan gets a stream of its own."""
        start = len(stream.done)
        for plan_name, plan in plans.items():
            if plan[:start] != stream.done:
                raise ValueError(f"plan {plan_name!r} does not continue the stream")
        branches: dict[int, list[_Branch]] = {}
        for b, key in stream.keys.items():
            wanted = [p for p in plans if only is None or p not in only or b in only[p]]
            if wanted:
                branches[b] = [_Branch(key, wanted, start, owned=False)]
        layers = sorted({step.layer for plan in plans.values() for step in plan[start:]})
        with torch.inference_mode():
            for layer in progress(layers, desc=desc, total=len(layers)):
                block = self.skeleton.load_block(layer)
                try:
                    for b in branches:
                        branches[b] = self._advance_branches(name, b, block, layer, branches[b], plans)
                finally:
                    self.skeleton.free_block(layer)
        result: dict[str, Stream] = {p: Stream({}, plans[p]) for p in plans}
        for b, group in branches.items():
            for branch in group:
                for i, plan_name in enumerate(branch.plans):
                    if branch.owned and i == 0:
                        result[plan_name].keys[b] = branch.key
                    else:  # plans that never diverged each get their own key for the same tensor
                        copy = self._new_key(name)
                        self.store.put(copy, self.store.get(branch.key))
                        result[plan_name].keys[b] = copy
        return result

    def _advance_branches(
        self, name: str, b: int, block: nn.Module, layer: int, group: list[_Branch], plans: dict[str, Plan]
    ) -> list[_Branch]:
        out: list[_Branch] = []
        for branch in group:
            by_step: dict[Step | None, list[str]] = {}
            for plan_name in branch.plans:
                plan = plans[plan_name]
                step = plan[branch.position] if branch.position < len(plan) else None
                by_step.setdefault(step if step is not None and step.layer == layer else None, []).append(
                    plan_name
                )
            if None in by_step:
                out.append(_Branch(branch.key, by_step.pop(None), branch.position, branch.owned))
            for step, names in by_step.items():
                with self._variant(block, step):
                    hidden = self._run_block(name, b, block, self.store.get(branch.key))
                key = self._new_key(name)
                self.store.put(key, hidden)
                out.append(_Branch(key, names, branch.position + 1))
            if branch.owned and all(o.key != branch.key for o in out):
                self.store.drop(branch.key)
        return out

    def walk(
        self,
        name: str,
        stream: Stream,
        plan: Plan,
        *,
        until: int,
        on_block: Callable[[int, int, torch.Tensor, Captured], None],
        mlp_at: set[int] = frozenset(),
        hidden_at: set[int] = frozenset(),
        attention_at: set[int] = frozenset(),
        desc: str = "Calibrating",
    ) -> None:
        """Run steps ``len(stream.done) .. until`` of ``plan`` and call ``on_block(position, batch,
        L, captured)`` after each, with ``captured`` holding the MLP's contribution where
        ``position`` is in ``mlp_at``, the input of ``down_proj`` (the MLP's hidden activations)
        where it is in ``hidden_at``, and the attention output projection's input and output where
        it is in ``attention_at``. Consumes ``stream``, whose ``done`` steps must begin ``plan``."""
        first = len(stream.done)
        if plan[:first] != stream.done:
            raise ValueError("the stream is not at a point of this plan")
        captured: dict[str, torch.Tensor] = {}
        device = self.skeleton.device

        def on_mlp(_module, _inputs, output):
            captured["mlp"] = output.detach().to(device)

        def on_down_proj(_module, inputs, _output):
            captured["hidden"] = inputs[0].detach().to(device)

        def on_attention_output(_module, inputs, output):
            captured["attention_input"] = inputs[0].detach().to(device)
            captured["attention_output"] = output.detach().to(device)

        with torch.inference_mode():
            for position in progress(range(first, until + 1), desc=desc, total=until + 1 - first):
                step = plan[position]
                block = self.skeleton.load_block(step.layer)
                hooks = [
                    (self.adapter.mlp_output_module, on_mlp, mlp_at),
                    (self.adapter.down_proj_module, on_down_proj, hidden_at),
                    (self.adapter.attention_output_module, on_attention_output, attention_at),
                ]
                handles = []
                try:
                    with self._variant(block, step):
                        for module, hook, at in hooks:
                            if position in at:
                                handles.append(module(block).register_forward_hook(hook))
                        for b, key in stream.keys.items():
                            hidden = self._run_block(name, b, block, self.store.get(key))
                            self.store.put(key, hidden)
                            on_block(position, b, hidden, Captured(**captured))
                            captured.clear()
                finally:
                    for handle in handles:
                        handle.remove()
                    self.skeleton.free_block(step.layer)
        self.release(stream)

    def down_proj_weight(self, step: Step) -> torch.Tensor:
        """``down_proj``'s weight ([d, d_ff], float64) of ``step``'s block, its maps folded in."""
        return self._weight(step, self.adapter.down_proj_module)

    def attention_output_weight(self, step: Step) -> torch.Tensor:
        """The attention output projection's weight ([d, d_attn], float64), its maps folded in."""
        return self._weight(step, self.adapter.attention_output_module)

    def _weight(self, step: Step, module: Callable[[nn.Module], nn.Module]) -> torch.Tensor:
        block = self.skeleton.load_block(step.layer)
        try:
            with self._variant(block, step):
                return module(block).weight.detach().to(torch.float64).clone()
        finally:
            self.skeleton.free_block(step.layer)

    # --- the LM head ----------------------------------------------------------------------------
    def head_pass(
        self,
        name: str,
        streams: dict[str, Stream],
        *,
        targets: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        compare: list[tuple[str, str]] = (),
        kl: bool = False,
        on_logits: Callable[[str, int, torch.Tensor], None] | None = None,
        chunk_bytes: int = 256 * 2**20,
        desc: str = "LM head",
    ) -> tuple[dict[str, tuple[float, int]], dict[tuple[str, str], LogitComparison]]:
        """Next-token loss of each stream, and how far apart the logits of pairs are.

        ``targets(b)`` gives batch ``b``'s token ids and a mask of the predictions that count
        (position ``t`` predicts token ``t + 1``). Logits are computed a few positions at a time,
        so memory does not grow with vocabulary × batch, and one stream at a time: only the pairs
        of ``compare`` hold two streams' logits at once. Returns ``{stream: (Σ nll, count)}`` and,
        for each pair ``(a, b)`` of ``compare``, a ``LogitComparison`` of ``a`` against ``b`` over
        the batches both hold: their largest difference, or with ``kl`` their KL divergence.
        ``on_logits(stream, b, logits)`` receives every position's logits, chunk by chunk."""
        norm, head = self.skeleton.load_head()
        vocab = head.weight.shape[0]
        cap = getattr(self.config, "final_logit_softcapping", None)
        losses = {s: (0.0, 0) for s in streams}
        diffs = {pair: LogitComparison(kl=kl) for pair in compare}
        batches = sorted({b for s in streams.values() for b in s.keys})
        try:
            with torch.inference_mode():
                for b in progress(batches, desc=desc, total=len(batches)):
                    ids, counted = targets(b)
                    present = [s for s in streams if b in streams[s].keys]
                    normed = {s: norm(self.store.get(streams[s].keys[b])) for s in present}
                    rows, predicted = ids.shape[0], ids.shape[1] - 1
                    end = ids.shape[1] if on_logits else predicted  # the last position predicts nothing
                    step = max(1, chunk_bytes // max(1, rows * vocab * 8))  # logits and one temporary
                    for lo in range(0, end, step):
                        hi = min(end, lo + step)
                        held: dict[str, NextTokenLogits] = {}  # what a comparison still waits for
                        for i, s in enumerate(present):
                            logits = NextTokenLogits(self._logits(head, normed[s][:, lo:hi], cap))
                            if on_logits:
                                on_logits(s, b, logits.logits.float().cpu())
                            losses[s] = _add_nll(losses[s], logits, ids, counted, lo, min(hi, predicted))
                            held[s] = logits
                            del logits
                            for a, ref in compare:
                                if s in (a, ref) and a in held and ref in held:
                                    diffs[(a, ref)].add(
                                        held[a], held[ref], counted[:, lo : min(hi, predicted)]
                                    )
                            later = present[i + 1 :]
                            held = {k: v for k, v in held.items() if _awaited(k, later, compare)}
        finally:
            self.skeleton.free(f"{self.skeleton.base_path}.norm")
            self.skeleton.free("lm_head")
        return losses, diffs

    @staticmethod
    def _logits(head: nn.Module, hidden: torch.Tensor, cap: float | None) -> torch.Tensor:
        logits = head(hidden).float()
        return torch.tanh(logits / cap) * cap if cap else logits

    def logits(
        self, plan: Plan, sequences: list[list[int]], desc: str = "Reference logits"
    ) -> list[torch.Tensor]:
        """Every position's float32 logits of ``plan`` for a few token sequences (one batch each)."""
        batches = [(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)) for ids in sequences]
        stream = self.embed("logits", batches)
        ends: dict[str, Stream] = {}
        pieces: dict[int, list[torch.Tensor]] = {b: [] for b in range(len(batches))}
        try:
            ends = self.advance("logits", stream, {"model": plan}, desc=desc)
            self.head_pass(
                "logits",
                ends,
                targets=lambda b: (batches[b][0], batches[b][1][:, 1:].bool()),
                on_logits=lambda _s, b, chunk: pieces[b].append(chunk),
                desc=f"{desc}: LM head",
            )
        finally:
            self.release(stream, *ends.values())
            self.forget("logits")
        return [torch.cat(pieces[b], dim=1)[0] for b in range(len(batches))]

    def close(self) -> None:
        self.store.close()
        self.skeleton.close()


class NextTokenLogits:
    """One chunk of a stream's logits, with what the loss and the KL comparisons derive from them
    made once however many comparisons read it: the log-normalizer, and as a reference the
    probabilities."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self._normalizer: torch.Tensor | None = None
        self._probabilities: torch.Tensor | None = None

    @property
    def normalizer(self) -> torch.Tensor:
        """``logsumexp`` of every position's logits, float64."""
        if self._normalizer is None:
            self._normalizer = log_normalizer(self.logits)
        return self._normalizer

    @property
    def probabilities(self) -> torch.Tensor:
        if self._probabilities is None:
            self._probabilities = (self.logits - self.normalizer.to(self.logits.dtype).unsqueeze(-1)).exp_()
        return self._probabilities


def _add_nll(
    so_far: tuple[float, int],
    logits: NextTokenLogits,
    ids: torch.Tensor,
    counted: torch.Tensor,
    lo: int,
    hi: int,
) -> tuple[float, int]:
    """``so_far`` plus the loss of positions ``lo .. hi`` (``logits`` starts at ``lo``)."""
    if hi <= lo:
        return so_far
    n = hi - lo
    nll, count = nll_sum(
        logits.logits[:, :n], ids[:, lo + 1 : hi + 1], counted[:, lo:hi], logits.normalizer[:, :n]
    )
    return so_far[0] + nll, so_far[1] + count


def _awaited(stream: str, later: list[str], compare: list[tuple[str, str]]) -> bool:
    """Whether a comparison pairs ``stream`` with one of the ``later`` streams."""
    return any((a == stream and ref in later) or (ref == stream and a in later) for a, ref in compare)


@dataclass
class LogitComparison:
    """Logits of one stream against a reference stream's at the same positions: the largest
    difference and the largest reference logit over every position or, ``kl``, the summed
    KL(reference ‖ stream) of the next-token distributions over the counted predictions (one or
    the other: on a large vocabulary each costs more than the head's matmul)."""

    kl: bool = False
    max_abs_difference: float = 0.0
    max_abs_reference: float = 0.0
    kl_sum: float = 0.0
    kl_count: int = 0

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / max(self.kl_count, 1)

    def add(self, logits: NextTokenLogits, reference: NextTokenLogits, counted: torch.Tensor) -> None:
        """One chunk of positions; ``counted`` marks its predictions that count (it may be shorter
        than the chunk, whose last position predicts nothing)."""
        if not self.kl:
            inf = float("inf")
            difference = float(torch.linalg.vector_norm(logits.logits - reference.logits, inf))
            self.max_abs_difference = max(self.max_abs_difference, difference)
            self.max_abs_reference = max(
                self.max_abs_reference, float(torch.linalg.vector_norm(reference.logits, inf))
            )
            return
        n = counted.shape[1]
        counted = counted.to(logits.logits.device)
        # KL(p ‖ q) = Σ p (log p - log q) = Σ p (reference - logits) - log Z_reference + log Z_logits:
        # the reference's probabilities are shared by every stream compared with it, and the
        # normalizers by the loss; the differences of logits are small, so float32 sums keep ~1e-6.
        weighted = (reference.probabilities[:, :n] * (reference.logits[:, :n] - logits.logits[:, :n])).sum(-1)
        per_position = weighted.double() - reference.normalizer[:, :n] + logits.normalizer[:, :n]
        self.kl_sum += float(per_position[counted].sum())
        self.kl_count += int(counted.sum())


def _apply_maps(maps: tuple[Map, ...]):
    """A forward hook on the module ``maps`` replace (``down_proj``, Gemma's post-MLP norm, or the
    attention's output projection) that applies them to its output in float64: the reference the
    folded weights are checked against."""

    def hook(module, inputs, output):
        mapped = output.to(torch.float64)
        for m in maps:
            t = m.transform.to(device=output.device, dtype=torch.float64)
            if t.dim() == 1:
                mapped = mapped * t
            elif m.site == ATTENTION_SITE or is_hidden_map(t, tuple(module.weight.shape)):
                mapped = inputs[0].to(torch.float64) @ t
            else:
                mapped = mapped @ t
        return mapped.to(output.dtype)

    return hook
