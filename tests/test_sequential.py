"""Layer-by-layer pruning gives what the in-memory pass gives: distances, sums, cut, saved weights."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rmexport.arch import adapter_for
from rmexport.calib.collect import collect, collect_activations
from rmexport.calib.tokens import calibration_batches
from rmexport.errors import ConfigError
from rmexport.models import load_model, load_tokenizer, read_provenance, resolve
from rmexport.prune import PruneOptions, prune
from rmexport.prune_sequential import prune_sequential
from rmexport.replaceme.select import candidate_starts
from rmexport.sequential.blocks import CheckpointReader, ModelSkeleton
from rmexport.sequential.calibrate import ActivationStore, collect_activations_sequential, collect_sequential
from validation.bench_pipeline import write_random_checkpoint

TINY_OPTIONS = dict(ratio=0.25, calib_samples=48, seq_len=32, batch_size=8, eval_tokens=512, parity_windows=1)
SEQUENTIAL_FAMILIES = ["llama", "qwen2", "gemma3"]


def _weights(directory):
    tensors = {}
    for shard in CheckpointReader(directory).shards:
        tensors |= load_file(directory / shard)
    return tensors


def _assert_same_surveys(memory, sequential):
    (profile_a, stats_a), (profile_b, stats_b) = memory, sequential
    assert profile_a.starts == profile_b.starts
    assert profile_a.last_count == profile_b.last_count and profile_a.all_count == profile_b.all_count
    for tokens in ("last", "all"):
        a, b = profile_a.mean(tokens), profile_b.mean(tokens)
        assert all(abs(a[s] - b[s]) <= 1e-9 * max(1.0, abs(a[s])) for s in a), (a, b)
    assert stats_a.keys() == stats_b.keys()
    for s in stats_a:
        x, y = stats_a[s], stats_b[s]
        assert x.tokens == y.tokens > 0
        torch.testing.assert_close(y.gram, x.gram, rtol=1e-9, atol=1e-9 * float(x.gram.abs().max()))
        torch.testing.assert_close(y.cross, x.cross, rtol=1e-9, atol=1e-9 * float(x.cross.abs().max()))
        assert y.target_energy == pytest.approx(x.target_energy, rel=1e-9)
        assert y.stream_energy == pytest.approx(x.stream_energy, rel=1e-9)


def _tiny_calibration(checkpoint, samples=24):
    from rmexport.calib.corpus import load_corpus

    tokenizer = load_tokenizer(resolve(str(checkpoint)))
    return calibration_batches(load_corpus("builtin"), tokenizer, n_samples=samples, seq_len=32, batch_size=8)


@pytest.mark.parametrize("family", SEQUENTIAL_FAMILIES)
def test_block_by_block_statistics_equal_the_in_memory_pass(family, tiny_checkpoints):
    checkpoint = tiny_checkpoints[family]
    calibration = _tiny_calibration(checkpoint)
    model = load_model(resolve(str(checkpoint)), dtype=torch.float32)
    adapter = adapter_for(model.config)
    n = 3
    starts = candidate_starts(8, n)
    memory = collect(model, adapter, calibration, n=n, starts=starts, stats_for=starts[::2])
    skeleton = ModelSkeleton(checkpoint)
    sequential = collect_sequential(skeleton, calibration, n=n, starts=starts, stats_for=starts[::2])
    _assert_same_surveys(memory, sequential)
    # No block's weights stay in memory afterwards.
    assert all(p.device.type == "meta" for p in adapter.blocks(skeleton.model).parameters())


def test_offloaded_activations_give_the_same_statistics(tiny_checkpoints):
    checkpoint = tiny_checkpoints["llama"]
    calibration = _tiny_calibration(checkpoint, samples=16)
    starts = candidate_starts(8, 2)
    in_memory = collect_sequential(
        ModelSkeleton(checkpoint), calibration, n=2, starts=starts, stats_for=starts
    )
    store = ActivationStore(torch.device("cpu"), budget_bytes=0)
    try:
        offloaded = collect_sequential(
            ModelSkeleton(checkpoint), calibration, n=2, starts=starts, stats_for=starts, store=store
        )
        assert store.offloaded_bytes > 0 and store.resident_bytes == 0
    finally:
        store.close()
    _assert_same_surveys(in_memory, offloaded)


@pytest.mark.parametrize("family", SEQUENTIAL_FAMILIES)
def test_sequential_prune_writes_the_in_memory_checkpoint(family, tiny_checkpoints, tmp_path):
    source = resolve(str(tiny_checkpoints[family]))
    options = PruneOptions(**(TINY_OPTIONS | ({"layers": 3, "blocks": 2} if family == "qwen2" else {})))
    expected = prune(source, options, tmp_path / "memory")
    record = prune_sequential(source, options, tmp_path / "sequential", run_checks=False)

    assert [c["cut"] for c in record["cuts"]] == [c["cut"] for c in expected["cuts"]]
    assert record["kept_layers"] == expected["kept_layers"]
    for ours, theirs in zip(record["cuts"], expected["cuts"], strict=True):
        assert ours["fit"]["rel_residual"] == pytest.approx(theirs["fit"]["rel_residual"], rel=1e-6)
        for key in ("distance_last", "distance_all", "fit_rel_residual"):
            a, b = ours["scores"][key], theirs["scores"][key]
            assert a.keys() == b.keys() and all(a[s] == pytest.approx(b[s], abs=2e-6) for s in a)
    assert record["fold_parity"]["passed"] is None and "skipped" in record["quality"]
    assert set(expected) <= set(record)

    ours, theirs = _weights(tmp_path / "sequential" / "hf"), _weights(tmp_path / "memory" / "hf")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "sequential" / "hf" / "config.json").read_text())
    assert config == json.loads((tmp_path / "memory" / "hf" / "config.json").read_text())
    assert read_provenance(tmp_path / "sequential" / "hf")["kept_layers"] == record["kept_layers"]

    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "sequential" / "hf", dtype=torch.float32)
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "memory" / "hf", dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 24))
    with torch.inference_mode():
        torch.testing.assert_close(streamed(ids).logits, in_memory(ids).logits, atol=1e-4, rtol=0)


def test_sharded_bf16_checkpoint_streams_shard_by_shard(tiny_checkpoints, tmp_path):
    shape = dict(
        hidden_size=64,
        num_hidden_layers=8,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
    )
    checkpoint = write_random_checkpoint(tmp_path / "source", shape, tiny_checkpoints["llama"])
    assert len(CheckpointReader(checkpoint).shards) == 4
    source = resolve(str(checkpoint))
    options = PruneOptions(**TINY_OPTIONS)
    expected = prune(source, options, tmp_path / "memory")
    record = prune_sequential(source, options, tmp_path / "sequential", run_checks=True)
    assert record["kept_layers"] == expected["kept_layers"]
    assert record["fold_parity"]["passed"]
    assert record["quality"] == pytest.approx(expected["quality"], rel=1e-6)
    out = tmp_path / "sequential" / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(CheckpointReader(out).shards)
    ours, theirs = _weights(out), _weights(tmp_path / "memory" / "hf")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], theirs[k]) for k in ours)


def test_selection_by_loss_is_refused(tiny_checkpoints, tmp_path):
    options = PruneOptions(**(TINY_OPTIONS | {"select": "loss"}))
    with pytest.raises(ConfigError, match="select loss"):
        prune_sequential(resolve(str(tiny_checkpoints["llama"])), options, tmp_path)
    assert not (tmp_path / "hf").exists()


def test_real_default_model_layer_by_layer(default_checkpoint, tmp_path):
    """SmolLM2-135M, a few documents: the same cut, sums, weights and logits as the in-memory prune."""
    options = PruneOptions(ratio=0.25, calib_samples=16, seq_len=128, batch_size=8, eval_tokens=512)
    source = resolve(str(default_checkpoint))
    expected = prune(source, options, tmp_path / "memory")
    record = prune_sequential(source, options, tmp_path / "sequential", run_checks=False)
    assert record["L"] == 30 and record["N"] == 22
    assert record["cuts"][0]["cut"] == expected["cuts"][0]["cut"]
    for key in ("distance_last", "distance_all", "fit_rel_residual", "removal_rel_residual"):
        a, b = record["cuts"][0]["scores"][key], expected["cuts"][0]["scores"][key]
        assert all(a[s] == pytest.approx(b[s], abs=2e-6) for s in a)
    ours, theirs = _weights(tmp_path / "sequential" / "hf"), _weights(tmp_path / "memory" / "hf")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "sequential" / "hf", dtype=torch.float32)
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "memory" / "hf", dtype=torch.float32)
    ids = torch.randint(0, 49152, (1, 64))
    with torch.inference_mode():
        torch.testing.assert_close(streamed(ids).logits, in_memory(ids).logits, atol=1e-4, rtol=0)
    assert read_provenance(tmp_path / "sequential" / "hf")["gguf_file"].endswith(".gguf")


def test_distance_rule_takes_one_pass_and_the_same_cut(tiny_checkpoints, tmp_path):
    source = resolve(str(tiny_checkpoints["gemma3"]))
    options = PruneOptions(**(TINY_OPTIONS | {"select": "distance", "distance_tokens": "all"}))
    expected = prune(source, options, tmp_path / "memory")
    record = prune_sequential(source, options, tmp_path / "sequential", run_checks=False)
    ours, theirs = record["cuts"][0], expected["cuts"][0]
    assert ours["cut"] == theirs["cut"]
    assert ours["fit"]["rel_residual"] == pytest.approx(theirs["fit"]["rel_residual"], rel=1e-9)
    # Only the chosen cut's sums were accumulated.
    assert list(ours["scores"]["fit_rel_residual"]) == [str(ours["cut"][0])]
    a, b = _weights(tmp_path / "sequential" / "hf"), _weights(tmp_path / "memory" / "hf")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_device_map_loading_matches_plain_loading(tiny_checkpoints):
    from rmexport.sequential.placement import load_model_with_device_map, model_devices

    source = resolve(str(tiny_checkpoints["llama"]))
    placed = load_model_with_device_map(source, device_map="auto")
    assert model_devices(placed) == ["cuda:0"] if torch.cuda.is_available() else ["cpu"]
    plain = load_model(source, dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 16))
    with torch.inference_mode():
        torch.testing.assert_close(placed(ids.to(placed.device)).logits.cpu(), plain(ids).logits)
    with pytest.raises(ConfigError):
        load_model_with_device_map(source, device_map="everywhere")


def test_cosine_solver_gets_the_same_activations_block_by_block(tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints["llama"]
    calibration = _tiny_calibration(checkpoint, samples=16)
    model = load_model(resolve(str(checkpoint)), dtype=torch.float32)
    memory = collect_activations(model, adapter_for(model.config), calibration, (3, 5))
    sequential = collect_activations_sequential(ModelSkeleton(checkpoint), calibration, (3, 5))
    for name in ("mlp", "bypass", "after"):
        torch.testing.assert_close(getattr(sequential, name), getattr(memory, name), rtol=1e-5, atol=1e-5)

    options = PruneOptions(**(TINY_OPTIONS | {"solver": "cosine"}))
    record = prune_sequential(resolve(str(checkpoint)), options, tmp_path / "sequential", run_checks=False)
    fit = record["cuts"][0]["fit"]
    assert fit["solver"] == "cosine" and "validation_curve" not in fit
    assert fit["loss_curve"][fit["best_epoch"]] == min(fit["loss_curve"])
