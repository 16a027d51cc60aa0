"""Pruning end to end: tiny models of every family, a planted cut, and the real default model."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rmexport.arch import ADAPTERS, adapter_for
from rmexport.models import read_provenance, resolve
from rmexport.prune import PruneOptions, prune

from .conftest import FAMILIES

TINY_OPTIONS = dict(
    ratio=0.25, calib_samples=48, seq_len=32, batch_size=8, eval_tokens=1024, parity_windows=1
)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_tiny_model_saves_an_ordinary_smaller_checkpoint(family, tiny_checkpoints, tmp_path):
    record = prune(resolve(str(tiny_checkpoints[family])), PruneOptions(**TINY_OPTIONS), tmp_path)
    assert record["L"] == 8 and record["n"] == 2 and record["N"] == 6
    assert record["fold_parity"]["passed"]
    assert record["fold_parity"]["max_abs_logit_diff"] <= record["fold_parity"]["atol"]

    saved = json.loads((tmp_path / "prune.json").read_text())
    assert saved["kept_layers"] == record["kept_layers"]
    (start, end) = saved["cuts"][0]["cut"]
    assert saved["kept_layers"] == [i for i in range(8) if not start <= i < end]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    adapter = adapter_for(model.config)
    assert adapter is ADAPTERS[family]
    assert model.config.num_hidden_layers == len(adapter.blocks(model)) == 6
    assert [b.self_attn.layer_idx for b in adapter.blocks(model)] == list(range(6))
    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[family])
    if getattr(original.config, "layer_types", None):
        expected = [original.config.layer_types[i] for i in saved["kept_layers"]]
        assert model.config.layer_types == expected
        if hasattr(adapter.blocks(model)[0].self_attn, "is_sliding"):
            flags = [b.self_attn.is_sliding for b in adapter.blocks(model)]
            assert flags == [t == "sliding_attention" for t in expected]
    assert read_provenance(tmp_path / "hf")["kept_layers"] == saved["kept_layers"]
    # The reloaded model generates through its KV cache with the renumbered blocks.
    ids = torch.randint(3, 200, (1, 12))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 18)


def _plant_near_identity_blocks(path, blocks):
    model = AutoModelForCausalLM.from_pretrained(path)
    adapter = adapter_for(model.config)
    with torch.no_grad():
        for j in blocks:
            block = adapter.block(model, j)
            block.self_attn.o_proj.weight.mul_(1e-3)
            adapter.down_proj_module(block).weight.mul_(1e-3)
    model.save_pretrained(path)


@pytest.mark.parametrize("rule", ["distance", "fit"])
def test_a_planted_easy_cut_is_found(rule, tiny_checkpoints, tmp_path):
    import shutil

    path = tmp_path / "planted"
    shutil.copytree(tiny_checkpoints["llama"], path)
    _plant_near_identity_blocks(path, [4, 5])
    options = PruneOptions(**(TINY_OPTIONS | {"select": rule, "distance_tokens": "all"}))
    record = prune(resolve(str(path)), options, tmp_path / "out")
    assert record["cuts"][0]["cut"] == [4, 6]


def test_loss_rule_tries_the_shortlist_and_restores_the_model(tiny_checkpoints, tmp_path):
    """On a random model the loss itself is meaningless; the mechanics are what can be pinned."""
    import shutil

    from transformers import AutoTokenizer

    from rmexport.calib.tokens import calibration_batches
    from rmexport.replaceme.survey import WholeModel, selection_loss, survey_candidates

    path = tmp_path / "planted"
    shutil.copytree(tiny_checkpoints["llama"], path)
    _plant_near_identity_blocks(path, [4, 5])
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    adapter = adapter_for(model.config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    from rmexport.calib.corpus import load_corpus

    corpus = load_corpus("builtin")
    calibration = calibration_batches(corpus, tokenizer, n_samples=48, seq_len=32, batch_size=8)
    selection = calibration_batches(corpus, tokenizer, n_samples=16, seq_len=32, batch_size=8, offset=48)
    survey = survey_candidates(WholeModel(model, adapter), calibration, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = selection_loss(model, adapter, survey, [1, 4], selection)
    after = model.state_dict()
    assert set(losses) == {1, 4}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.num_hidden_layers == 8 and len(adapter.blocks(model)) == 8
    assert [b.self_attn.layer_idx for b in adapter.blocks(model)] == list(range(8))
    # Removing the near-identity blocks (with their map) barely changes the loss; another cut does.
    from rmexport.replaceme.survey import _mean_loss

    original = _mean_loss(model, selection)
    assert abs(losses[4] - original) < 0.01 * original
    assert abs(losses[1] - original) > abs(losses[4] - original)

    record = prune(resolve(str(path)), PruneOptions(**(TINY_OPTIONS | {"select": "loss"})), tmp_path / "out")
    table = record["cuts"][0]["scores"]["selection_loss"]
    assert len(table) == 5
    assert record["cuts"][0]["cut"][0] == int(min(table, key=lambda s: (table[s], int(s))))


def test_two_cuts_remove_the_requested_number_of_blocks(tiny_checkpoints, tmp_path):
    options = PruneOptions(**(TINY_OPTIONS | {"layers": 3, "blocks": 2}))
    record = prune(resolve(str(tiny_checkpoints["qwen3"])), options, tmp_path)
    removed = sorted(i for c in record["cuts"] for i in c["removed_layers"])
    assert len(removed) == 3 and len(set(removed)) == 3 and 0 not in removed
    assert record["kept_layers"] == [i for i in range(8) if i not in removed]
    assert record["fold_parity"]["passed"]


def test_same_inputs_give_the_same_cut_map_and_files(tiny_checkpoints, tmp_path):
    options = PruneOptions(**TINY_OPTIONS)
    first = prune(resolve(str(tiny_checkpoints["mistral"])), options, tmp_path / "a")
    second = prune(resolve(str(tiny_checkpoints["mistral"])), options, tmp_path / "b")
    assert first["cuts"][0]["cut"] == second["cuts"][0]["cut"]
    a = load_file(tmp_path / "a" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "b" / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a/hf/model.safetensors").read_bytes() == (
        tmp_path / "b/hf/model.safetensors"
    ).read_bytes()


def test_cosine_solver_starts_from_lstsq_and_keeps_its_best_epoch(tiny_checkpoints, tmp_path):
    options = PruneOptions(**(TINY_OPTIONS | {"solver": "cosine"}))
    record = prune(resolve(str(tiny_checkpoints["llama"])), options, tmp_path)
    fit = record["cuts"][0]["fit"]
    assert fit["solver"] == "cosine"
    validation = fit["validation_curve"]
    assert len(validation) == len(fit["loss_curve"]) == fit["epochs"] + 1
    assert validation[fit["best_epoch"]] == min(validation) <= validation[0]
    assert fit["stopped"] in ("validation", "tolerance", "max_epochs")
    assert record["fold_parity"]["passed"]


def test_real_default_model_prune(pruned_default_run, default_checkpoint):
    """SmolLM2-135M at 0.25: the fitted map beats plain removal of the same blocks, parity holds."""
    out_dir, record = pruned_default_run
    assert record["L"] == 30 and record["n"] == 8 and record["N"] == 22
    quality = record["quality"]
    assert quality["ppl_pruned"] < 0.9 * quality["ppl_plain_removal"], quality
    assert quality["ppl_original"] < quality["ppl_pruned"]
    assert 5 < quality["ppl_original"] < 60
    assert record["fold_parity"]["passed"]

    model = AutoModelForCausalLM.from_pretrained(out_dir / "hf", dtype=torch.float32)
    assert model.config.num_hidden_layers == 22 and len(model.model.layers) == 22
    provenance = read_provenance(out_dir / "hf")
    assert provenance["gguf_file"].endswith(".gguf") and len(provenance["kept_layers"]) == 22


def test_cli_layer_by_layer_path_matches_the_in_memory_path(tiny_checkpoints, tmp_path):
    from rmexport.cli import main

    common = [
        "prune",
        str(tiny_checkpoints["qwen2"]),
        "--calib-samples",
        "48",
        "--seq-len",
        "32",
        "--eval-tokens",
        "1024",
    ]
    assert main([*common, "--out", str(tmp_path / "mem"), "--layer-by-layer", "off"]) == 0
    assert main([*common, "--out", str(tmp_path / "seq"), "--layer-by-layer", "on"]) == 0
    mem, seq = (json.loads((tmp_path / d / "prune.json").read_text()) for d in ("mem", "seq"))
    assert mem["cuts"][0]["cut"] == seq["cuts"][0]["cut"]
    a = load_file(tmp_path / "mem" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "seq" / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
