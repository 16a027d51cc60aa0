"""The block engine computes what the whole model computes, resident or streamed, and shares work."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rmexport.arch import adapter_for
from rmexport.calib.collect import Trace, accumulate, collect, cut_sums
from rmexport.calib.engine import Engine, Map, Step, cut_plan, explicit, original_plan
from rmexport.calib.store import ActivationStore
from rmexport.calib.tokens import calibration_batches
from rmexport.calib.weights import ModelSkeleton
from rmexport.fold import fold_map
from rmexport.measures import angular_distance
from rmexport.models import load_tokenizer, resolve
from rmexport.replaceme.apply import remove_blocks
from rmexport.replaceme.checks import FOLD_PARITY_RTOL, plain_removal, run_checks
from rmexport.replaceme.select import candidate_starts
from rmexport.replaceme.survey import SelectionScorer

from .conftest import FAMILIES

STREAMING = ["llama", "qwen2", "gemma3"]


def _engine(checkpoint, *, resident: bool, activation_bytes: int = 2**30) -> Engine:
    skeleton = ModelSkeleton(checkpoint, resident=resident)
    return Engine(skeleton, ActivationStore(torch.device("cpu"), activation_bytes))


def _hf(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _hf_nll(model, windows) -> float:
    with torch.inference_mode():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1].double()
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, windows[:, 1:, None]).squeeze(-1)
    return float(nll.mean())


def _random_windows(vocab: int, rows: int = 3, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_checks_equal_whole_model_forwards(family, tiny_checkpoints):
    """Original, plain removal and pruned perplexity from one streamed pass equal transformers'
    own forwards of the three models, for every family."""
    checkpoint = tiny_checkpoints[family]
    model = _hf(checkpoint)
    adapter = adapter_for(model.config)
    d = model.config.hidden_size
    generator = torch.Generator().manual_seed(1)
    transform = torch.eye(d) + torch.randn(d, d, generator=generator, dtype=torch.float64) / d**0.5
    if not adapter.dense_fold:  # a diagonal map, strong enough to matter behind the norm
        transform = 0.2 + 3 * torch.rand(d, generator=generator, dtype=torch.float64)
    windows = _random_windows(model.config.vocab_size, rows=5)
    final = cut_plan(original_plan(8), (3, 5), Map(transform))

    engine = _engine(checkpoint, resident=False)
    try:
        checks = run_checks(engine, final, windows, parity_windows=2)
    finally:
        engine.close()

    expected_original = _hf_nll(model, windows)
    remove_blocks(model, adapter, (3, 5))
    expected_removal = _hf_nll(model, windows)
    fold_map(adapter, adapter.block(model, 2), transform)
    expected_pruned = _hf_nll(model, windows)
    assert checks.tokens == windows[:, 1:].numel()
    assert math.log(checks.ppl_original) == pytest.approx(expected_original, rel=1e-6)
    assert math.log(checks.ppl_plain_removal) == pytest.approx(expected_removal, rel=1e-6)
    assert math.log(checks.ppl_pruned) == pytest.approx(expected_pruned, rel=1e-6)
    assert abs(expected_pruned - expected_removal) > 1e-4  # the map matters
    assert checks.parity_passed and checks.parity_max_abs_logit > 0


def test_resident_streamed_and_spilled_runs_agree(tiny_checkpoints):
    checkpoint = tiny_checkpoints["qwen2"]
    windows = _random_windows(300, rows=6)
    final = cut_plan(original_plan(8), (2, 4), Map(torch.eye(64, dtype=torch.float64) * 1.1))
    results = []
    for resident, budget in ((True, 2**30), (False, 2**30), (False, 0)):
        engine = _engine(checkpoint, resident=resident, activation_bytes=budget)
        try:
            results.append(run_checks(engine, final, windows, parity_windows=1))
            if budget == 0:
                assert engine.store.offloaded_bytes > 0 and engine.store.peak_resident_bytes == 0
            if not resident:  # nothing stays loaded once a pass is over
                assert all(p.device.type == "meta" for p in engine.skeleton.model.parameters())
        finally:
            engine.close()
    assert results[0] == results[1] == results[2]


def test_plans_share_their_common_prefix(tiny_checkpoints):
    """Blocks 0..2 are shared by all three plans and run once; block 3 runs folded and unfolded."""
    engine = _engine(tiny_checkpoints["llama"], resident=True)
    calls: dict[int, int] = {}
    for j, block in enumerate(engine.adapter.blocks(engine.skeleton.model)):
        block.register_forward_pre_hook(lambda *_args, j=j: calls.__setitem__(j, calls.get(j, 0) + 1))
    final = cut_plan(original_plan(8), (4, 6), Map(torch.eye(64, dtype=torch.float64)))
    windows = _random_windows(300, rows=2)
    batches = [(windows, torch.ones_like(windows))]
    stream = engine.embed("w", batches)
    plans = {"original": original_plan(8), "removal": plain_removal(final), "pruned": final}
    ends = engine.advance("w", stream, plans)
    assert [calls[j] for j in range(8)] == [1, 1, 1, 2, 1, 1, 3, 3]
    assert {name: s.done for name, s in ends.items()} == plans
    engine.release(stream, *ends.values())
    assert engine.store.resident_bytes == 0
    engine.close()


def test_explicit_plan_applies_maps_after_the_mlp():
    plan = cut_plan(original_plan(6), (2, 4), Map(torch.eye(3), "t"))
    assert [s.layer for s in plan] == [0, 1, 4, 5]
    assert plan[1].maps and not plan[1].explicit
    assert explicit(plan)[1] == Step(1, plan[1].maps, explicit=True)
    assert plain_removal(plan) == tuple(Step(j) for j in (0, 1, 4, 5))


def _reference_statistics(model, adapter, calibration, n, starts):
    """Distances and sums from hooks on the whole transformers model (no engine involved)."""
    outputs, mlps = {}, {}
    handles = []
    for j, block in enumerate(adapter.blocks(model)):
        handles.append(
            block.register_forward_hook(
                lambda _m, _i, out, j=j: outputs.__setitem__(j, out[0] if isinstance(out, tuple) else out)
            )
        )
        handles.append(
            adapter.mlp_output_module(block).register_forward_hook(
                lambda _m, _i, out, j=j: mlps.__setitem__(j, out)
            )
        )
    distances = dict.fromkeys(starts, 0.0)
    from rmexport.calib.collect import empty_statistics

    stats = empty_statistics(starts, n, model.config.hidden_size)
    count = 0
    with torch.inference_mode():
        for ids, mask in calibration.batches:
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.bool()
            count += int(real.sum())
            for s in starts:
                before, after = outputs[s - 1], outputs[s + n - 1]
                distances[s] += float(angular_distance(before[real], after[real]).sum())
                accumulate(stats[s], mlps[s - 1][real], before[real], after[real])
    for h in handles:
        h.remove()
    return {s: v / count for s, v in distances.items()}, stats


@pytest.mark.parametrize("family", STREAMING)
def test_calibration_statistics_equal_hooks_on_the_whole_model(family, tiny_checkpoints, builtin_corpus):
    checkpoint = tiny_checkpoints[family]
    tokenizer = load_tokenizer(resolve(str(checkpoint)))
    calibration = calibration_batches(builtin_corpus, tokenizer, n_samples=24, seq_len=32, batch_size=8)
    model = _hf(checkpoint)
    n, starts = 3, candidate_starts(8, 3)
    distances, expected = _reference_statistics(model, adapter_for(model.config), calibration, n, starts)
    engine = _engine(checkpoint, resident=False, activation_bytes=0)
    try:
        profile, stats = collect(engine, original_plan(8), calibration, n=n, starts=starts, stats_for=starts)
    finally:
        engine.close()
    got = profile.mean("all")
    for s in starts:
        assert got[s] == pytest.approx(distances[s], rel=1e-6)
        torch.testing.assert_close(stats[s].gram, expected[s].gram, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats[s].cross, expected[s].cross, rtol=1e-6, atol=1e-6)
        assert stats[s].tokens == expected[s].tokens > 0


def test_selection_losses_equal_transformers_on_the_trial_models(tiny_checkpoints, builtin_corpus):
    checkpoint = tiny_checkpoints["llama"]
    tokenizer = load_tokenizer(resolve(str(checkpoint)))
    selection = calibration_batches(builtin_corpus, tokenizer, n_samples=16, seq_len=32, batch_size=8)
    d = 64
    maps = {s: torch.eye(d, dtype=torch.float64) * (1 + 0.1 * s) for s in (1, 3, 5)}
    engine = _engine(checkpoint, resident=True)
    scorer = SelectionScorer(engine, selection)
    try:
        losses = scorer.trial_losses(original_plan(8), 2, maps, [1, 3, 5])
        again = scorer.trial_losses(original_plan(8), 2, maps, [3])  # reuses the cached prefix
    finally:
        scorer.close()
        engine.close()
    assert again[3] == losses[3]
    for s in (1, 3, 5):
        model = _hf(checkpoint)
        adapter = adapter_for(model.config)
        fold_map(adapter, adapter.block(model, s - 1), maps[s])
        remove_blocks(model, adapter, (s, s + 2))
        total, count = 0.0, 0
        with torch.inference_mode():
            for ids, mask in selection.batches:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].double()
                nll = torch.logsumexp(logits, -1) - logits.gather(-1, ids[:, 1:, None]).squeeze(-1)
                real = mask[:, 1:].bool()
                total += float(nll[real].sum())
                count += int(real.sum())
        assert losses[s] == pytest.approx(total / count, rel=1e-6)


def test_the_budget_reserves_the_largest_module_and_halves_the_rest(tiny_checkpoints, default_checkpoint):
    from rmexport.calib.budget import MemoryBudget
    from rmexport.calib.weights import CheckpointReader, largest_module_bytes, model_bytes

    for checkpoint in (tiny_checkpoints["llama"], default_checkpoint):
        reader = CheckpointReader(checkpoint)
        block = sum(reader.numel(n) for n in reader.names() if n.startswith("model.layers.0.")) * 4
        embedding = reader.numel("model.embed_tokens.weight") * 4
        assert largest_module_bytes(checkpoint, "model.layers") == max(block, embedding)
    # SmolLM2: a 49,152 x 576 embedding outweighs a block.
    weights = model_bytes(default_checkpoint)
    largest = largest_module_bytes(default_checkpoint, "model.layers")
    assert largest == 49152 * 576 * 4
    for total in (weights // 2, 4 * weights):
        budget = MemoryBudget(total)
        held = weights if budget.weights_resident(weights) else largest
        assert budget.weights_resident(weights) is (total == 4 * weights)
        parts = budget.describe(weights, largest)
        assert parts["stats_budget_bytes"] == parts["activation_budget_bytes"] == (total - held) // 2
        assert held + parts["stats_budget_bytes"] + parts["activation_budget_bytes"] <= total
    assert MemoryBudget(largest // 2).activation_bytes(weights, largest) == 0  # never negative


def _output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hidden_statistics_equal_hooks_on_the_whole_model(family, tiny_checkpoints, builtin_corpus):
    """The sums over down_proj's input, for two sets in one streamed pass, equal hooks on transformers."""
    checkpoint = tiny_checkpoints[family]
    tokenizer = load_tokenizer(resolve(str(checkpoint)))
    sets = [
        calibration_batches(builtin_corpus, tokenizer, n_samples=n, seq_len=32, batch_size=8) for n in (24, 8)
    ]
    cut = (3, 6)
    model = _hf(checkpoint)
    adapter = adapter_for(model.config)
    seen = {}
    blocks = adapter.blocks(model)
    handles = [
        blocks[cut[0] - 1].register_forward_hook(
            lambda _m, _i, out: seen.__setitem__("before", _output(out))
        ),
        blocks[cut[1] - 1].register_forward_hook(lambda _m, _i, out: seen.__setitem__("after", _output(out))),
        adapter.down_proj_module(blocks[cut[0] - 1]).register_forward_hook(
            lambda _m, inputs, out: seen.update(hidden=inputs[0], mlp=out)
        ),
    ]
    from rmexport.calib.collect import empty_statistics

    d, d_ff = model.config.hidden_size, model.config.intermediate_size
    expected = [empty_statistics([cut[0]], 3, d, d_ff)[cut[0]] for _ in sets]
    with torch.inference_mode():
        for acc, one in zip(expected, sets, strict=True):
            for ids, mask in one.batches:
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)
                r = mask.bool()
                accumulate(
                    acc, seen["mlp"][r], seen["before"][r], seen["after"][r], features=seen["hidden"][r]
                )
    for handle in handles:
        handle.remove()
    engine = _engine(checkpoint, resident=False, activation_bytes=0)
    try:
        got = [one.hidden for one in cut_sums(engine, original_plan(8), sets, cut, hidden=True)]
    finally:
        engine.close()
    for acc, ref in zip(got, expected, strict=True):
        assert acc.gram.shape == (d_ff, d_ff) and acc.cross.shape == (d_ff, d)
        torch.testing.assert_close(acc.gram, ref.gram, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(acc.cross, ref.cross, rtol=1e-6, atol=1e-6)
        assert acc.tokens == ref.tokens > 0 and acc.target_energy == pytest.approx(ref.target_energy)


def test_checks_with_a_hidden_map_equal_the_folded_model(tiny_checkpoints):
    """A d_ff×d map replaces down_proj: the engine's pruned perplexity is transformers' on the
    folded model, and fold parity compares it with the map applied to down_proj's input."""
    checkpoint = tiny_checkpoints["llama"]
    model = _hf(checkpoint)
    adapter = adapter_for(model.config)
    weight = adapter.down_proj_module(adapter.block(model, 2)).weight.detach().double()
    generator = torch.Generator().manual_seed(3)
    hidden_map = weight.T + 0.05 * torch.randn(weight.T.shape, generator=generator, dtype=torch.float64)
    windows = _random_windows(model.config.vocab_size, rows=4)
    final = cut_plan(original_plan(8), (3, 5), Map(hidden_map))
    engine = _engine(checkpoint, resident=True)
    try:
        checks = run_checks(engine, final, windows, parity_windows=2)
        assert torch.equal(engine.down_proj_weight(final[2]), hidden_map.T.float().double())
    finally:
        engine.close()
    remove_blocks(model, adapter, (3, 5))
    fold_map(adapter, adapter.block(model, 2), hidden_map)
    assert math.log(checks.ppl_pruned) == pytest.approx(_hf_nll(model, windows), rel=1e-6)
    assert checks.parity_passed and checks.parity_max_abs_logit_diff > 0


def _bfloat16_checks(checkpoint, final, windows):
    engine = Engine(
        ModelSkeleton(checkpoint, resident=True, compute_dtype=torch.bfloat16),
        ActivationStore(torch.device("cpu"), 2**30),
    )
    try:
        return run_checks(engine, final, windows, parity_windows=2)
    finally:
        engine.close()


def test_fold_parity_in_bfloat16_passes_rounding_and_fails_a_wrong_fold(tiny_checkpoints, monkeypatch):
    """In bfloat16 the folded weights are rounded, so parity allows the dtype's rounding; a fold of
    the wrong map (here its transpose) still fails."""
    checkpoint = tiny_checkpoints["llama"]
    config = _hf(checkpoint).config
    d = config.hidden_size
    generator = torch.Generator().manual_seed(1)
    transform = torch.eye(d) + torch.randn(d, d, generator=generator, dtype=torch.float64) / d**0.5
    windows = _random_windows(config.vocab_size, rows=5)
    final = cut_plan(original_plan(8), (3, 5), Map(transform))

    checks = _bfloat16_checks(checkpoint, final, windows)
    assert checks.parity_rtol == 8 * torch.finfo(torch.bfloat16).eps > FOLD_PARITY_RTOL
    assert checks.parity_passed and checks.parity_max_abs_logit_diff > 0

    import rmexport.calib.engine as engine_module

    monkeypatch.setattr(
        engine_module, "fold_map", lambda adapter, block, t, site: fold_map(adapter, block, t.T, site)
    )
    assert not _bfloat16_checks(checkpoint, final, windows).parity_passed


@pytest.mark.parametrize(("cut", "surveyed"), [((1, 4), None), ((3, 6), None), ((3, 6), [0, 2])])
def test_cut_sums_resumed_from_a_trace_equal_a_fresh_pass(cut, surveyed, tiny_checkpoints, builtin_corpus):
    """The survey's pass keeps the stream after every block; the chosen cut's sums, run from it
    through the one block before the cut (and, for the batches a survey of a share did not read,
    from the embeddings), are what a pass from the embeddings gives: the same bytes where the trace
    holds every batch. Releasing the trace leaves nothing of it in the store."""
    checkpoint = tiny_checkpoints["qwen2"]
    tokenizer = load_tokenizer(resolve(str(checkpoint)))
    calibration, set_aside = (
        calibration_batches(builtin_corpus, tokenizer, n_samples=n, seq_len=32, batch_size=8) for n in (32, 8)
    )
    assert len(calibration.batches) >= 3
    plan, n = original_plan(8), cut[1] - cut[0]
    ids = surveyed or list(range(len(calibration.batches)))
    engine = _engine(checkpoint, resident=True)
    try:
        fresh = cut_sums(engine, plan, [calibration, set_aside], cut, hidden=True)
        trace = Trace(engine, plan, calibration, ids)
        starts = candidate_starts(len(plan), n)
        collect(engine, plan, calibration.subset(ids), n=n, starts=starts, stats_for=starts, trace=trace)
        assert trace.holds(plan, calibration, cut) == ids and not trace.holds(plan, set_aside, cut)
        resumed = cut_sums(engine, plan, [calibration, set_aside], cut, hidden=True, trace=trace)
        trace.release()
        assert engine.store.resident_bytes == 0 and not engine.store._tensors
    finally:
        engine.close()
    for got, ref in zip(resumed, fresh, strict=True):
        for a, b in ((got.output, ref.output), (got.hidden, ref.hidden)):
            assert a.tokens == b.tokens > 0
            if surveyed is None:
                assert torch.equal(a.gram, b.gram) and torch.equal(a.cross, b.cross)
                assert (a.target_energy, a.stream_energy) == (b.target_energy, b.stream_energy)
            else:  # the same sums added in another order
                torch.testing.assert_close(a.gram, b.gram, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(a.cross, b.cross, rtol=1e-12, atol=1e-12)
                assert a.stream_energy == pytest.approx(b.stream_energy, rel=1e-12)
