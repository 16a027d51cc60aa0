"""The repair of the blocks after the cut: refitted, folded, streamed like the rest, GGUF-native."""

import hashlib
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from converters.gguf_export import export_gguf
from converters.gguf_prune import write_pruned_gguf
from rmexport.arch import adapter_for
from rmexport.calib.engine import LogitComparison, NextTokenLogits
from rmexport.measures import kl_rows
from rmexport.models import resolve
from rmexport.prune import PruneOptions, prune

from .test_prune import TINY_OPTIONS
from .tiny import tiny_config, tiny_tokenizer

# A random model's cut lands at its end, where no block follows: blocks 2-3 are weakened instead, so
# the distance rule cuts them and blocks 4-5 see a stream they were not made for.
CUT = [2, 4]
REPAIR_OPTIONS = TINY_OPTIONS | dict(select="distance", distance_tokens="all", calib_samples=96)


@pytest.fixture(scope="module")
def weakened(tiny_checkpoints, tmp_path_factory):
    path = tmp_path_factory.mktemp("weakened") / "llama"
    shutil.copytree(tiny_checkpoints["llama"], path)
    model = AutoModelForCausalLM.from_pretrained(path)
    adapter = adapter_for(model.config)
    with torch.no_grad():
        for j in range(*CUT):
            block = adapter.block(model, j)
            block.self_attn.o_proj.weight.mul_(0.3)
            adapter.down_proj_module(block).weight.mul_(0.3)
    model.save_pretrained(path)
    return path


def test_the_blocks_after_the_cut_are_refitted_and_folded(weakened, tmp_path):
    record = prune(resolve(str(weakened)), PruneOptions(**REPAIR_OPTIONS), tmp_path)
    assert record.cuts[0].cut == CUT
    repair = record.repair
    assert [b.block for b in repair.blocks] == [4, 5] and repair.kept_blocks == 2  # no guard: all kept
    for repaired in repair.blocks:
        # Each refit lowers the error against the original stream on set-aside text, after the attention
        # and after the block (an unrepaired block is one of the strengths tried, so a broken fit would
        # choose it).
        for refit in (repaired.attention, repaired):
            assert refit.ridge is not None
            assert refit.set_aside_rel_residual < refit.set_aside_rel_residual_unrepaired, refit
    assert record.fold_parity.passed  # the repaired folds included
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    original = load_file(weakened / "model.safetensors")
    maps = load_file(tmp_path / "maps.safetensors")
    for position, repaired in zip((2, 3), repair.blocks, strict=True):
        for module, refit, key in (
            ("mlp.down_proj", repaired, "block"),
            ("self_attn.o_proj", repaired.attention, "attention"),
        ):
            name = f"model.layers.{position}.{module}.weight"
            assert refit.tensor == name
            torch.testing.assert_close(
                saved[name], maps[f"{key}.{repaired.block}.0"].T.to(saved[name].dtype), rtol=0, atol=0
            )
            assert not torch.equal(saved[name], original[f"model.layers.{repaired.block}.{module}.weight"])
    # Every other tensor of the kept blocks is the original's.
    for position, block in ((4, 6), (5, 7)):
        for module in ("mlp.down_proj", "self_attn.o_proj"):
            name = f"model.layers.{position}.{module}.weight"
            assert torch.equal(saved[name], original[f"model.layers.{block}.{module}.weight"])


def test_the_guard_keeps_the_stage_closest_to_the_original_of_those_closer_than_plain_removal(
    weakened, tmp_path
):
    record = prune(
        resolve(str(weakened)), PruneOptions(**(REPAIR_OPTIONS | {"quality_guard": True})), tmp_path
    )
    guard = record.guard
    stages = ["fitted", "repair 1", "repair 2"]
    assert set(guard.mean_kl) == {*stages, "plain_removal"}
    assert set(guard.selection_loss) == {"original", *stages, "plain_removal"}
    for kl in guard.kl_by_source.values():
        assert set(kl) == {*stages, "plain_removal"} and kl["plain_removal"] > 0
    better = [s for s in stages if all(v[s] <= v["plain_removal"] for v in guard.kl_by_source.values())]
    expected = min(better, key=guard.mean_kl.get) if better else "plain_removal"
    assert guard.kept == expected
    assert record.repair.kept_blocks == (int(expected[-1]) if expected.startswith("repair") else 0)


def test_a_repair_that_keeps_a_blocks_own_weights_leaves_the_plan_and_is_scored_once(
    weakened, tmp_path, monkeypatch
):
    from rmexport.replaceme import repair as repair_module
    from rmexport.replaceme.survey import SelectionScorer

    ridge_toward = repair_module.ridge_toward
    monkeypatch.setattr(  # only the block's own weights to choose from
        repair_module,
        "ridge_toward",
        lambda fit, aside, prior, grid: ridge_toward(fit, aside, prior, (float("inf"),)),
    )
    scored: list[list[str]] = []
    losses_and_divergences = SelectionScorer.losses_and_divergences

    def spy(self, plans, **kwargs):
        scored.append(sorted(plans))
        return losses_and_divergences(self, plans, **kwargs)

    monkeypatch.setattr(SelectionScorer, "losses_and_divergences", spy)
    record = prune(
        resolve(str(weakened)), PruneOptions(**(REPAIR_OPTIONS | {"quality_guard": True})), tmp_path
    )
    assert [b.ridge for b in record.repair.blocks] == [None, None]
    guard_calls = [names for names in scored if "original" in names]
    assert guard_calls and all(names == ["fitted", "original", "plain_removal"] for names in guard_calls)
    for kl in record.guard.kl_by_source.values():
        assert kl["repair 1"] == kl["repair 2"] == kl["fitted"]
    assert record.guard.kept in ("fitted", "plain_removal") and record.repair.kept_blocks == 0
    if (tmp_path / "maps.safetensors").exists():  # nothing folded into the blocks after the cut
        assert not any(
            key.startswith(("block.4.", "block.5.")) for key in load_file(tmp_path / "maps.safetensors")
        )


def test_a_logit_comparison_sums_the_kl_of_the_counted_predictions():
    generator = torch.Generator().manual_seed(0)
    reference, logits = (torch.randn(2, 5, 11, generator=generator) * 3 for _ in range(2))
    counted = torch.tensor([[True, False, True, True], [False, True, True, False]])  # 4 of 5 predict
    by_kl, by_difference = LogitComparison(kl=True), LogitComparison()
    for comparison in (by_kl, by_difference):
        for chunk in (slice(0, 3), slice(3, None)):
            ours, theirs = NextTokenLogits(logits[:, chunk]), NextTokenLogits(reference[:, chunk])
            comparison.add(ours, theirs, counted[:, chunk])
    expected = kl_rows(reference[:, :4][counted], logits[:, :4][counted])
    assert by_kl.kl_count == 5
    assert by_kl.mean_kl == pytest.approx(float(expected.mean()), rel=1e-5)
    assert by_difference.max_abs_difference == pytest.approx(float((logits - reference).abs().max()))
    assert by_difference.max_abs_reference == pytest.approx(float(reference.abs().max()))


def test_no_repair_is_recorded_with_its_reason(tiny_checkpoints, tmp_path):
    at_the_end = prune(resolve(str(tiny_checkpoints["llama"])), PruneOptions(**TINY_OPTIONS), tmp_path / "e")
    assert at_the_end.cuts[0].cut[1] == 8 and at_the_end.repair.blocks == []
    assert at_the_end.repair.note == "no block follows the cut"
    skipped = prune(
        resolve(str(tiny_checkpoints["llama"])),
        PruneOptions(**(TINY_OPTIONS | {"repair_blocks": 0})),
        tmp_path / "s",
    )
    assert skipped.repair is None


def test_a_streamed_repair_gives_the_same_weights_as_a_resident_one(weakened, tmp_path):
    options = REPAIR_OPTIONS | {"compute_dtype": "float32"}
    resident = prune(resolve(str(weakened)), PruneOptions(**options), tmp_path / "r")
    # Weights streamed from disk block by block, the d_ff² sums still within the budget.
    streamed = prune(
        resolve(str(weakened)), PruneOptions(**(options | {"memory_budget": "2MiB"})), tmp_path / "s"
    )
    assert resident.memory["weights_resident"] and not streamed.memory["weights_resident"]
    assert [b.block for b in streamed.repair.blocks] == [4, 5]
    assert streamed.repair.blocks == resident.repair.blocks
    a = (tmp_path / "r" / "hf" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "s" / "hf" / "model.safetensors").read_bytes()


def _sha(t: gguf.ReaderTensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()


def test_gguf_native_requantizes_the_repaired_tensors_and_copies_every_other_byte(builtin_corpus, tmp_path):
    tokenizer = tiny_tokenizer(builtin_corpus.pool[:300])
    config = tiny_config("llama", len(tokenizer))
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    source = export_gguf(tmp_path / "hf", tmp_path / "q8.gguf", "q8_0")
    g = torch.Generator().manual_seed(1)
    cut_map = torch.eye(64) + 0.1 * torch.randn(64, 64, generator=g)
    repairs = {b: 0.05 * torch.randn(128, 64, generator=g) for b in (3, 4)}  # new down_proj of blocks 3, 4
    attention = {b: 0.05 * torch.randn(64, 64, generator=g) for b in (3, 4)}  # and their new o_proj
    kept = [0, 1, 3, 4, 5]
    record = write_pruned_gguf(
        source,
        tmp_path / "pruned.gguf",
        kept,
        {1: [cut_map]} | {b: [t] for b, t in repairs.items()},
        attention_folds={b: [t] for b, t in attention.items()},
        dense_fold=True,
    )
    changed = {"blk.1.ffn_down.weight", "blk.2.ffn_down.weight", "blk.3.ffn_down.weight"}
    changed |= {"blk.2.attn_output.weight", "blk.3.attn_output.weight"}
    assert set(record.folded) == changed and record.requantized == 5
    before = {t.name: t for t in gguf.GGUFReader(str(source)).tensors}
    after = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "pruned.gguf")).tensors}
    assert len(after) == record.copied + 5
    for name, t in after.items():
        origin = before[record.tensors[name].source]
        if name in changed:
            assert _sha(t) != _sha(origin), name
            continue
        assert t.tensor_type == origin.tensor_type and _sha(t) == _sha(origin), name
    repaired = np.asarray(
        gguf.quants.dequantize(after["blk.2.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    )
    np.testing.assert_allclose(repaired.reshape(64, 128), repairs[3].T.numpy(), atol=2e-3)
    replaced = np.asarray(
        gguf.quants.dequantize(after["blk.2.attn_output.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    )
    np.testing.assert_allclose(replaced.reshape(64, 64), attention[3].T.numpy(), atol=2e-3)
