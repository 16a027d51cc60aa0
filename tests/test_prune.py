"""Pruning end to end: tiny models of every family, a planted cut, and the real default model."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rmexport.arch import ADAPTERS, adapter_for
from rmexport.models import read_provenance, resolve
from rmexport.prune import PruneOptions, prune
from rmexport.records import PruneRecord

from .conftest import FAMILIES

# Random tiny models: the guard would judge noise, and fold parity must see the fitted maps.
TINY_OPTIONS = dict(
    ratio=0.25,
    calib_samples=48,
    seq_len=32,
    batch_size=8,
    eval_tokens=1024,
    ood_tokens=1024,
    parity_windows=1,
    quality_guard=False,
    selection_samples=16,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_tiny_model_saves_an_ordinary_smaller_checkpoint(family, tiny_checkpoints, tmp_path):
    record = prune(resolve(str(tiny_checkpoints[family])), PruneOptions(**TINY_OPTIONS), tmp_path)
    assert isinstance(record, PruneRecord)
    assert record.L == 8 and record.n == 2 and record.N == 6
    assert record.fold_parity.passed
    assert record.fold_parity.max_abs_logit_diff <= record.fold_parity.atol

    saved = json.loads((tmp_path / "prune.json").read_text())
    assert saved == record.to_json()
    assert PruneRecord.from_json(saved).to_json() == saved  # prune.json reads back as the typed record
    # Peak RSS as each stage ended: every stage, never decreasing, at most the final peak.
    after = saved["peak_rss_mib_after_stage"]
    assert list(after) == list(saved["timings_s"]) and list(after.values()) == sorted(after.values())
    assert 0 < after["load"] and after["save"] <= saved["peak_rss_mib"]
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
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), min_new_tokens=6, max_new_tokens=6, do_sample=False
    )
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
    record = prune(resolve(str(path)), options, tmp_path / "out").to_json()
    assert record["cuts"][0]["cut"] == [4, 6]


def test_loss_rule_picks_the_lowest_selection_loss_of_the_shortlist(tiny_checkpoints, tmp_path):
    """On a random model the loss itself is meaningless; the mechanics are what can be pinned."""
    import shutil

    path = tmp_path / "planted"
    shutil.copytree(tiny_checkpoints["llama"], path)
    _plant_near_identity_blocks(path, [4, 5])
    record = prune(
        resolve(str(path)), PruneOptions(**(TINY_OPTIONS | {"select": "loss"})), tmp_path / "out"
    ).to_json()
    table = record["cuts"][0]["scores"]["selection_loss"]
    assert len(table) == 5
    assert record["cuts"][0]["cut"][0] == int(min(table, key=lambda s: (table[s], int(s))))
    assert "4" in table  # the planted cut is the best by fit, so it is on the shortlist


def test_two_cuts_remove_the_requested_number_of_blocks(tiny_checkpoints, tmp_path):
    options = PruneOptions(**(TINY_OPTIONS | {"layers": 3, "blocks": 2}))
    record = prune(resolve(str(tiny_checkpoints["qwen3"])), options, tmp_path).to_json()
    removed = sorted(i for c in record["cuts"] for i in c["removed_layers"])
    assert len(removed) == 3 and len(set(removed)) == 3 and 0 not in removed
    assert record["kept_layers"] == [i for i in range(8) if i not in removed]
    assert record["fold_parity"]["passed"]


def test_same_inputs_give_the_same_cut_map_and_files(tiny_checkpoints, tmp_path):
    options = PruneOptions(**TINY_OPTIONS)
    first = prune(resolve(str(tiny_checkpoints["mistral"])), options, tmp_path / "a").to_json()
    second = prune(resolve(str(tiny_checkpoints["mistral"])), options, tmp_path / "b").to_json()
    assert first["cuts"][0]["cut"] == second["cuts"][0]["cut"]
    a = load_file(tmp_path / "a" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "b" / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a/hf/model.safetensors").read_bytes() == (
        tmp_path / "b/hf/model.safetensors"
    ).read_bytes()


def test_the_original_perplexities_are_measured_once_per_model(tiny_checkpoints, tmp_path, monkeypatch):
    source = resolve(str(tiny_checkpoints["llama"]))
    float32 = TINY_OPTIONS | {"compute_dtype": "float32"}

    def run(name: str, cache: str, **changes) -> dict:
        monkeypatch.setenv("RMEXPORT_CACHE", str(tmp_path / cache))
        return prune(source, PruneOptions(**(float32 | changes)), tmp_path / name).to_json()

    def originals(record: dict) -> list[float]:
        quality = record["quality"]
        return [quality["ppl_original"]] + [q["ppl_original"] for q in quality["out_of_domain"]]

    first = run("first", "cache")
    other_cut = run("other-cut", "cache", ratio=0.5)
    measured_again = run("measured-again", "fresh-cache", ratio=0.5)
    in_bfloat16 = run("bfloat16", "cache", compute_dtype="bfloat16")
    assert not first["quality"]["original_reused"] and other_cut["quality"]["original_reused"]
    assert other_cut["kept_layers"] != first["kept_layers"]
    # Measured beside other plans or alone, the original's perplexity is the same number.
    assert originals(first) == originals(other_cut) == originals(measured_again)
    assert not measured_again["quality"]["original_reused"]
    assert not in_bfloat16["quality"]["original_reused"] and in_bfloat16["compute"]["dtype"] == "bfloat16"


def test_cosine_solver_starts_from_lstsq_and_keeps_its_best_epoch(tiny_checkpoints, tmp_path):
    options = PruneOptions(**(TINY_OPTIONS | {"solver": "cosine"}))
    record = prune(resolve(str(tiny_checkpoints["llama"])), options, tmp_path).to_json()
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
    # Calibrated on the default mixture, the map also beats plain removal on the other kinds of text.
    assert [q["source"] for q in quality["out_of_domain"]] == ["docs", "dialogue"]
    for other in quality["out_of_domain"]:
        assert other["ppl_original"] < other["ppl_pruned"] < other["ppl_plain_removal"], other
    assert record["fold_parity"]["passed"]

    model = AutoModelForCausalLM.from_pretrained(out_dir / "hf", dtype=torch.float32)
    assert model.config.num_hidden_layers == 22 and len(model.model.layers) == 22
    provenance = read_provenance(out_dir / "hf")
    assert provenance["gguf_file"].endswith(".gguf") and len(provenance["kept_layers"]) == 22


def test_a_budget_smaller_than_the_model_streams_and_gives_the_same_prune(tiny_checkpoints, tmp_path):
    from rmexport.cli import main

    common = ["prune", str(tiny_checkpoints["qwen2"]), "--calib-samples", "48", "--seq-len", "32"]
    common += ["--eval-tokens", "1024", "--no-quality-guard", "--map", "output"]
    assert main([*common, "--out", str(tmp_path / "resident")]) == 0
    # Above the smallest budget the CLI accepts (one block plus two candidates' statistics), below
    # what keeps the weights resident or every candidate's statistics.
    assert main([*common, "--out", str(tmp_path / "streamed"), "--memory-budget", "512KiB"]) == 0
    resident, streamed = (
        json.loads((tmp_path / d / "prune.json").read_text()) for d in ("resident", "streamed")
    )
    assert resident["memory"]["weights_resident"] and not streamed["memory"]["weights_resident"]
    assert streamed["memory"]["budget_bytes"] == 512 * 1024
    # Whether the original's perplexities were measured or reused (the streamed prune reuses the
    # resident one's) is not part of the result.
    streamed["quality"].pop("original_reused"), resident["quality"].pop("original_reused")
    for key in ("kept_layers", "quality", "fold_parity"):
        assert streamed[key] == resident[key], key
    # Too small a budget for every candidate's statistics: distances first, then the closest only.
    for ours, theirs in zip(streamed["cuts"], resident["cuts"], strict=True):
        assert ours["cut"] == theirs["cut"] and ours["fit"] == theirs["fit"]
        assert ours["scores"]["distance_all"] == theirs["scores"]["distance_all"]
        assert len(ours["scores"]["fit_rel_residual"]) < len(theirs["scores"]["fit_rel_residual"])
    a = (tmp_path / "resident" / "hf" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "streamed" / "hf" / "model.safetensors").read_bytes()


def test_quality_guard_keeps_plain_removal_when_the_map_is_further_from_the_original(
    tiny_checkpoints, tmp_path
):
    """A map fitted on 12 short documents of a random model against 16 set-aside ones: whichever is closer
    to the original (KL) on every source's set-aside text is what gets saved, and the record says which."""
    options = PruneOptions(**(TINY_OPTIONS | {"quality_guard": True, "calib_samples": 12}))
    record = prune(resolve(str(tiny_checkpoints["llama"])), options, tmp_path).to_json()
    guard = record["guard"]
    wins = all(kl["fitted"] <= kl["plain_removal"] for kl in guard["kl_by_source"].values())
    better = "fitted" if wins else "plain_removal"
    assert guard["kept"] == better
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    original = load_file(tiny_checkpoints["llama"] / "model.safetensors")
    start = record["cuts"][0]["cut"][0]
    name = f"model.layers.{start - 1}.mlp.down_proj.weight"
    assert torch.equal(saved[name], original[name]) == (better == "plain_removal")


def test_the_default_map_refits_down_proj_with_a_ridge_chosen_on_set_aside_text(tiny_checkpoints, tmp_path):
    record = prune(resolve(str(tiny_checkpoints["llama"])), PruneOptions(**TINY_OPTIONS), tmp_path).to_json()
    fit = record["cuts"][0]["fit"]
    assert record["solver"]["map"] == fit["map"] == "hidden"
    errors = {a: e for a, e in fit["set_aside_rel_residual"].items() if e is not None}
    assert "inf" in errors and errors[str(fit["ridge_toward_T"])] == min(errors.values())
    assert fit["set_aside_tokens"] > 0 and record["fold_parity"]["passed"]
    start = record["cuts"][0]["cut"][0]
    maps = load_file(tmp_path / "maps.safetensors")
    hidden_map = maps[f"block.{start - 1}.0"]
    assert hidden_map.shape == (128, 64)  # d_ff × d
    saved = load_file(tmp_path / "hf" / "model.safetensors")[f"model.layers.{start - 1}.mlp.down_proj.weight"]
    torch.testing.assert_close(saved, hidden_map.T.to(saved.dtype), rtol=0, atol=0)


def test_the_output_map_where_a_hidden_one_cannot_be_fitted(tiny_checkpoints, tmp_path):
    """Gemma's MLP output passes a norm; a budget too small for d_ff² sums: T, and the reason."""
    gemma = prune(
        resolve(str(tiny_checkpoints["gemma3"])), PruneOptions(**TINY_OPTIONS), tmp_path / "g"
    ).to_json()
    assert gemma["cuts"][0]["fit"]["map"] == "output" and "norm" in gemma["cuts"][0]["fit"]["map_note"]
    options = PruneOptions(**(TINY_OPTIONS | {"memory_budget": "256KiB"}))
    small = prune(resolve(str(tiny_checkpoints["llama"])), options, tmp_path / "s").to_json()
    assert small["cuts"][0]["fit"]["map"] == "output"
    assert "--memory-budget" in small["cuts"][0]["fit"]["map_note"]
    assert load_file(tmp_path / "s" / "maps.safetensors")[
        f"block.{small['cuts'][0]['cut'][0] - 1}.0"
    ].shape == (
        64,
        64,
    )


@pytest.mark.parametrize("map_space", ["hidden", "output"])
def test_a_survey_of_a_share_chooses_the_cut_and_the_fit_reads_every_document(
    map_space, tiny_checkpoints, tmp_path
):
    options = PruneOptions(**(TINY_OPTIONS | {"survey_samples": 16, "map_space": map_space}))
    record = prune(resolve(str(tiny_checkpoints["llama"])), options, tmp_path).to_json()
    cut = record["cuts"][0]
    assert cut["fit"]["map"] == map_space
    assert 0 < cut["scores"]["tokens"] < cut["fit"]["tokens"] == record["calibration"]["tokens"]
    assert record["fold_parity"]["passed"]
