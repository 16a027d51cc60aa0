"""The speed protocol, the FLOP ideal and the report's speed section (tiny models, real runtimes).

No test here asserts a timing threshold: they check the structure and the invariants that a
broken protocol would violate (alternation, round bounds, spread order, ideal = hand count,
a slowdown failing the checks, every linked image written).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from rmexport.cli import main
from rmexport.errors import ConfigError
from rmexport.records import PruneRecord
from rmexport.sysinfo import describe_machine
from validation.flops import IdealSpeedup, ModelShape, attended_keys, ideal_speedups, phase_flops
from validation.gguf_bench import GGUFBench, GGUFQuality, GGUFTypeBench
from validation.report import StageOutputs
from validation.speed import (
    Phase,
    SpeedProtocol,
    SpeedRounds,
    SpeedRun,
    Spread,
    format_phases,
    measure_speed,
    median_rel_se,
    spread,
)

TINY = SpeedProtocol(
    prompt_tokens=(16,), gen_tokens=4, rounds=SpeedRounds(warmup=1, min_rounds=2, max_rounds=3)
)

# Tiny config (tests/tiny.py): hidden 64, intermediate 128, 4 heads, 2 KV heads, head_dim 16.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=320,
)


def _phases(seconds: dict, log: list | None = None, role: str = "") -> dict[str, Phase]:
    """Phases whose steps "take" the given seconds (a number, or a function called per repetition);
    a ``tgN`` phase has N steps sharing them. ``log`` records every step as (role, phase, k)."""

    def make(name: str, value):
        steps = int(name[2:]) if name.startswith("tg") else 1
        state: dict = {}

        def reset() -> None:
            state["total"] = value() if callable(value) else value

        def step(k: int) -> float:
            if log is not None:
                log.append((role, name, k))
            return state["total"] / steps

        return Phase(step=step, steps=steps, reset=reset)

    return {name: make(name, value) for name, value in seconds.items()}


# --- protocol ------------------------------------------------------------------------------
def test_rounds_interleave_and_stop_once_every_median_is_precise():
    log: list = []
    protocol = SpeedProtocol(
        prompt_tokens=(8, 16), gen_tokens=4, rounds=SpeedRounds(warmup=2, min_rounds=3, max_rounds=9)
    )
    original = _phases({"pp8": 0.02, "pp16": 0.04, "tg4": 0.01}, log, "original")
    pruned = _phases({"pp8": 0.01, "pp16": 0.02, "tg4": 0.008}, log, "pruned")
    result = measure_speed(original, pruned, protocol)
    # Constant times: the median has no spread, so every phase stops at the minimum.
    assert result.rounds == 3 and result.settled is True
    assert list(result.phases) == ["pp8", "pp16", "tg4"]
    assert all(e.rounds == 3 and e.settled and e.speedup.rel_se == 0 for e in result.phases.values())
    assert result.order == [[r, p] for r in (1, 2, 3) for p in result.phases]
    # Turns in A B B A order: a prompt round is original, pruned, pruned, original; generation
    # alternates in turns of ceil(4 / 8) = 1 step, the lead swapping at every turn.
    # Warm-up: 2 turns per model of every phase (a prompt; tg4's first eighth, 1 token), untimed.
    warmup_steps = 2 * 2 * (1 + 1 + 1)
    assert [(role, phase) for role, phase, _ in log[:6]] == [
        (role, phase) for phase in ("pp8", "pp16", "tg4") for role in ("original", "pruned")
    ]
    timed = log[warmup_steps:]
    assert len(timed) == 3 * 2 * (2 + 2 + 4)
    pp8 = [role for role, phase, _ in timed if phase == "pp8"]
    assert pp8 == ["original", "pruned", "pruned", "original"] * 3
    tg = [(role, k) for role, phase, k in timed if phase == "tg4"]
    assert tg[:8] == [("original", 0), ("pruned", 0), ("pruned", 1), ("original", 1)] + [
        ("original", 2),
        ("pruned", 2),
        ("pruned", 3),
        ("original", 3),
    ]
    pp16 = result.phases["pp16"]
    assert pp16.original.tokens_per_s.median == pytest.approx(16 / 0.04)
    assert pp16.original.seconds == pytest.approx([2 * 0.04] * 3)  # two prompts per round
    assert pp16.speedup.median == pytest.approx(2.0) and pp16.speedup.rounds == [2.0] * 3
    assert result.phases["tg4"].speedup.median == pytest.approx(1.25)
    assert pp16.ideal is None and result.slower_than_original is None  # until the ideals are in


def test_a_noisy_phase_keeps_being_timed_after_the_precise_ones_stop():
    state = {"k": 0}

    def drifting() -> float:  # the pruned model gets 10 % faster every round
        state["k"] += 1
        return 0.01 / 1.1 ** state["k"]

    protocol = SpeedProtocol(
        prompt_tokens=(8,), gen_tokens=2, rounds=SpeedRounds(warmup=0, min_rounds=2, max_rounds=6)
    )
    result = measure_speed(
        _phases({"pp8": 0.01, "tg2": 0.01}), _phases({"pp8": drifting, "tg2": 0.01}), protocol
    )
    assert result.rounds == 6 and result.settled is False
    pp8, tg2 = result.phases["pp8"], result.phases["tg2"]
    assert pp8.rounds == 6 and not pp8.settled and pp8.speedup.rel_se > protocol.rounds.rel_tol
    assert tg2.rounds == 3 and tg2.settled  # three rounds are the fewest that estimate a spread
    s = pp8.speedup
    assert s.min <= s.q1 <= s.median <= s.q3 <= s.max
    assert s.rounds == sorted(s.rounds) and s.max > 1.1**10  # faster every repetition


# The keys of a bench's "speed" and of each of its phases, in their order: the report reads them.
SPEED_KEYS = [
    "protocol",
    "rounds",
    "settled",
    "order",
    "load_average",
    "phases",
    "settings",
    "slower_than_original",
]
PHASE_KEYS = [
    "kind", "tokens", "original", "pruned", "speedup", "rounds", "settled", "ideal", "flops",
    "measured_over_ideal", "slower_than_original", "above_ideal",
]  # fmt: skip


def test_a_speed_run_round_trips_through_json_as_the_benches_extend_it():
    protocol = SpeedProtocol(
        prompt_tokens=(16,), gen_tokens=4, rounds=SpeedRounds(warmup=0, min_rounds=3, max_rounds=3)
    )
    run = measure_speed(_phases({"pp16": 0.02, "tg4": 0.02}), _phases({"pp16": 0.01, "tg4": 0.03}), protocol)
    timed = json.loads(json.dumps(run.to_json()))
    assert list(timed) == SPEED_KEYS[:6] and list(timed["phases"]["tg4"]) == PHASE_KEYS[:7]
    assert list(timed["phases"]["tg4"]["speedup"]) == ["median", "min", "max", "q1", "q3", "rounds", "rel_se"]
    assert SpeedRun.from_json(timed) == run

    ideals = ideal_speedups(
        ModelShape.from_config(TINY_CONFIG),
        ModelShape.from_config(TINY_CONFIG | {"num_hidden_layers": 6}),
        protocol.phases,
    )
    settings = {"n_threads": 1}
    typed = replace(run, settings=settings).with_ideal(ideals)  # as both benches extend it
    extended = json.loads(json.dumps(typed.to_json()))
    assert list(extended) == SPEED_KEYS and list(extended["phases"]["pp16"]) == PHASE_KEYS
    assert typed.slower_than_original == ["tg4"] and typed.phases["pp16"].above_ideal is True
    assert typed.phases["pp16"].flops == ideals["pp16"].flops
    assert SpeedRun.from_json(extended) == typed
    assert format_phases(SpeedRun.from_json(extended)) == format_phases(typed)
    assert "SLOWER THAN ORIGINAL" in "\n".join(format_phases(typed))


def test_median_standard_error_and_spread():
    assert median_rel_se([1.0, 1.0]) == float("inf")  # too few rounds to judge
    assert median_rel_se([1.3, 1.3, 1.3]) == 0
    # Three or four rounds: sigma from the range, so a single stalled round keeps the phase going.
    assert median_rel_se([1.0, 2.0, 3.0]) == pytest.approx(1.2533 * (2 / 1.693) / 3**0.5 / 2)
    assert median_rel_se([1.30, 1.31, 1.30, 5.0]) > 0.5
    # From five rounds on, one stalled round does not move it: the spread is the median absolute deviation.
    assert median_rel_se([1.30, 1.31, 1.29, 1.30, 5.0]) == median_rel_se([1.30, 1.31, 1.29, 1.30, 1.32])
    assert spread([3.0, 1.0, 2.0, 4.0]) == Spread(median=2.5, min=1.0, max=4.0, q1=1.75, q3=3.25)
    assert spread([5.0]) == Spread(median=5.0, min=5.0, max=5.0, q1=5.0, q3=5.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_rounds=0),
        dict(min_rounds=5, max_rounds=4),
        dict(gen_tokens=0),
        dict(prompt_tokens=()),
        dict(rel_tol=0),
    ],
)
def test_impossible_protocols_are_config_errors(kwargs):
    phases = {k: v for k, v in kwargs.items() if k in ("prompt_tokens", "gen_tokens")}
    rounds = {k: v for k, v in kwargs.items() if k not in phases}
    with pytest.raises(ConfigError):
        SpeedProtocol(**phases, rounds=SpeedRounds(**rounds))


def test_protocol_needs_the_same_phases_for_both_models():
    with pytest.raises(ConfigError, match="phases"):
        measure_speed(_phases({"pp16": 1.0}), _phases({"pp16": 1.0, "tg4": 1.0}), TINY)


# --- the ideal -----------------------------------------------------------------------------
def test_ideal_equals_a_hand_count_for_the_tiny_config():
    shape = ModelShape.from_config(TINY_CONFIG)
    # Per block and token: q 64x64, k and v 64x32 each, o 64x64, gate/up/down 64x128: 36864 MACs.
    linear = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    per_key = 2 * 2 * 4 * 16  # q.k and p.v over 4 heads of 16
    head = 2 * 64 * 320
    assert linear == 73728 and per_key == 256 and head == 40960
    # tg2 from an empty cache: step 1 attends 1 key, step 2 attends 2; the head runs twice.
    assert phase_flops(shape, "generation", 2)["total"] == 8 * (2 * linear + 3 * per_key) + 2 * head
    # pp3: keys 1 + 2 + 3; the head once (last position) or three times (every position).
    assert (
        phase_flops(shape, "prompt", 3, head_positions="last")["total"]
        == 8 * (3 * linear + 6 * per_key) + head
    )
    assert (
        phase_flops(shape, "prompt", 3, head_positions="all")["total"]
        == 8 * (3 * linear + 6 * per_key) + 3 * head
    )
    pruned = ModelShape.from_config(TINY_CONFIG | {"num_hidden_layers": 6})
    ideal = ideal_speedups(shape, pruned, {"pp3": 3, "tg2": 2})
    assert ideal["tg2"].ideal == pytest.approx(
        (8 * (2 * linear + 3 * per_key) + 2 * head) / (6 * (2 * linear + 3 * per_key) + 2 * head)
    )
    assert ideal["pp3"].ideal == pytest.approx(
        (8 * (3 * linear + 6 * per_key) + head) / (6 * (3 * linear + 6 * per_key) + head)
    )
    assert (ideal["pp3"].head_positions, ideal["tg2"].head_positions) == ("last", "all")
    assert ideal["tg2"].flops["pruned"] == phase_flops(pruned, "generation", 2)


def test_sliding_window_caps_the_attended_keys():
    assert attended_keys(5, None) == 15 and attended_keys(5, 2) == 1 + 2 + 2 + 2 + 2
    config = TINY_CONFIG | {
        "num_hidden_layers": 2,
        "sliding_window": 2,
        "layer_types": ["sliding_attention", "full_attention"],
    }
    flops = phase_flops(ModelShape.from_config(config), "prompt", 5)
    assert flops["blocks_attention"] == 256 * (9 + 15)


def test_smollm2_135m_decode_ideal_is_well_below_l_over_n():
    """The issue's numbers: 30 -> 22 blocks, L/N 1.36; decode runs the 49k head for every token."""
    config = dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    )
    ideal = ideal_speedups(
        ModelShape.from_config(config),
        ModelShape.from_config(config | {"num_hidden_layers": 22}),
        {"pp512": 512, "tg128": 128},
    )
    assert ideal["tg128"].ideal == pytest.approx(1.27, abs=0.01)
    assert 1.34 < ideal["pp512"].ideal < 30 / 22
    tg = ideal["tg128"].flops["original"]
    assert 0.19 < tg["lm_head"] / tg["total"] < 0.22  # "a fifth of the work"


def test_gguf_metadata_gives_the_same_shape_as_the_config(tiny_checkpoints, tmp_path):
    from converters.gguf_export import export_gguf

    for family in ("llama", "gemma3"):
        config = json.loads((tiny_checkpoints[family] / "config.json").read_text())
        path = export_gguf(tiny_checkpoints[family], tmp_path / f"{family}.gguf", "f16")
        assert ModelShape.from_gguf(path) == ModelShape.from_config(config), family


# --- the runtimes, with tiny models --------------------------------------------------------
@pytest.fixture(scope="module")
def pruned_llama(tiny_checkpoints, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmexport.arch import adapter_for
    from rmexport.replaceme.apply import remove_blocks

    original = tiny_checkpoints["llama"]
    out = tmp_path_factory.mktemp("speed") / "pruned"
    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    remove_blocks(model, adapter_for(model.config), (4, 6))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(original).save_pretrained(out)
    return out


def _check_speed_result(result: SpeedRun, protocol: SpeedProtocol, ideals: dict[str, IdealSpeedup]) -> None:
    assert protocol.rounds.min_rounds <= result.rounds <= protocol.rounds.max_rounds
    assert result.settled or result.rounds == protocol.rounds.max_rounds
    assert len(result.order) == sum(e.rounds for e in result.phases.values())
    assert list(result.phases) == list(protocol.phases)
    assert result.protocol["threads"] >= 1
    for phase, entry in result.phases.items():
        for stats in (entry.speedup, entry.original.tokens_per_s, entry.pruned.tokens_per_s):
            assert 0 < stats.min <= stats.median <= stats.max
        assert len(entry.speedup.rounds) == len(entry.original.seconds) == entry.rounds
        assert protocol.rounds.min_rounds <= entry.rounds <= result.rounds
        assert entry.ideal == pytest.approx(ideals[phase].ideal)
        assert entry.measured_over_ideal == pytest.approx(entry.speedup.median / entry.ideal)
        assert entry.slower_than_original == (entry.speedup.median < 1)
    assert result.slower_than_original == [p for p, e in result.phases.items() if e.slower_than_original]


def test_llama_cpp_speed_alternates_and_carries_the_ideal(tiny_checkpoints, pruned_llama, tmp_path):
    from converters.gguf_export import export_gguf
    from validation.gguf_bench import measure_speed as gguf_speed
    from validation.gguf_bench import speed

    original = export_gguf(tiny_checkpoints["llama"], tmp_path / "o.gguf", "f16")
    pruned = export_gguf(pruned_llama, tmp_path / "p.gguf", "f16")
    run = gguf_speed(original, pruned, TINY)
    result = json.loads(json.dumps(run.to_json()))
    assert SpeedRun.from_json(result) == run and list(result) == SPEED_KEYS
    ideals = ideal_speedups(
        ModelShape.from_config(json.loads((tiny_checkpoints["llama"] / "config.json").read_text())),
        ModelShape.from_config(json.loads((pruned_llama / "config.json").read_text())),
        TINY.phases,
        prompt_head="last",
    )
    _check_speed_result(run, TINY, ideals)
    settings = run.settings
    assert settings["n_ctx_requested"] == 16 + 4 and settings["n_threads"] >= 1
    assert settings["n_ctx"]["original"] == settings["n_ctx"]["pruned"] >= 16 + 4  # same settings
    assert 1 < run.phases["pp16"].ideal < 8 / 6
    quick = replace(TINY, rounds=SpeedRounds(warmup=0, min_rounds=1, max_rounds=1))
    assert list(speed(original, pruned, quick)) == SPEED_KEYS  # the JSON rmexport.frontier stores


def test_onnxruntime_speed_counts_the_head_on_every_prompt_position(tiny_checkpoints, pruned_llama, tmp_path):
    from converters.onnx_export import export_onnx
    from validation.onnx_bench import OnnxBench, OnnxQuality, format_table, measure_onnx, onnx_quality

    original = export_onnx(tiny_checkpoints["llama"], tmp_path / "o")
    pruned = export_onnx(pruned_llama, tmp_path / "p")
    protocol = SpeedProtocol(
        prompt_tokens=(8, 16), gen_tokens=4, rounds=SpeedRounds(warmup=1, min_rounds=2, max_rounds=3)
    )
    result = measure_onnx(original, pruned, eval_tokens=64, window=32, protocol=protocol)
    config = json.loads((original / "config.json").read_text())
    ideals = ideal_speedups(
        ModelShape.from_config(config),
        ModelShape.from_config(config | {"num_hidden_layers": 6}),
        protocol.phases,
        prompt_head="all",  # the optimum graph returns logits for every position
    )
    _check_speed_result(result.speed, protocol, ideals)
    assert result.models["pruned"].ppl > 0 and result.machine.threads == result.threads
    assert result.models["pruned"].num_hidden_layers == 6 and result.eval.tokens > 0
    assert "pp16" in format_table(result)
    data = json.loads(json.dumps(result.to_json()))
    assert list(data) == [
        "backend",
        "eval",
        "threads",
        "machine",
        "models",
        "ppl_ratio",
        "size_ratio",
        "speed",
    ]
    assert list(data["models"]["original"]) == [
        "onnx_dir", "num_hidden_layers", "providers", "size_bytes", "ppl", "mean_nll", "tokens", "windows",
        "windows_sha256",
    ]  # fmt: skip
    assert OnnxBench.from_json(data) == result

    # The original's perplexity, measured once per model, is reused on the same export and windows.
    measured = onnx_quality(original, eval_tokens=64, window=32)
    assert measured.ppl == pytest.approx(result.models["original"].ppl, rel=1e-6)
    marked = replace(measured, ppl=-1.0)  # a value no measurement gives: shows which one the bench used
    quick = replace(protocol, prompt_tokens=(8,), rounds=replace(protocol.rounds, min_rounds=1, max_rounds=1))
    stored = OnnxQuality.from_json(json.loads(json.dumps(marked.to_json())))  # as the pipeline reads it back
    reused = measure_onnx(
        original, pruned, eval_tokens=64, window=32, protocol=quick, original_perplexity=stored
    )
    assert reused.models["original"].ppl == -1.0 and reused.models["pruned"].ppl > 0
    other_windows = measure_onnx(
        original, pruned, eval_tokens=96, window=32, protocol=quick, original_perplexity=marked
    )
    assert other_windows.models["original"].ppl > 0


def test_cli_rejects_an_impossible_protocol(tiny_checkpoints, capsys):
    ckpt = str(tiny_checkpoints["llama"])
    code = main(
        ["bench", "gguf", "--original", ckpt, "--pruned", ckpt, "--min-rounds", "4", "--max-rounds", "2"]
    )
    assert code == 2 and "min rounds" in capsys.readouterr().err


# --- the report ----------------------------------------------------------------------------
def _prune_record() -> PruneRecord:
    scores = {
        "candidates": [1, 2],
        "distance_last": {"1": 0.2, "2": 0.1},
        "distance_all": {"1": 0.3, "2": 0.2},
    }
    return PruneRecord.from_json(
        {
            "model": {
                "spec": "tiny",
                "kind": "local",
                "location": "/tiny",
                "architecture": "LlamaForCausalLM",
                "family": "llama",
                "hidden_size": 64,
            },
            "L": 8,
            "n": 2,
            "N": 6,
            "ratio": 0.25,
            "kept_layers": [0, 1, 4, 5, 6, 7],
            "cuts": [
                {
                    "cut": [2, 4],
                    "removed_layers": [2, 3],
                    "fit": {"solver": "lstsq", "rel_residual": 0.1, "rel_residual_plain_removal": 0.2},
                    "scores": scores,
                }
            ],
            "selection": {"rule": "distance"},
            "solver": {"name": "lstsq"},
            "calibration": {
                "documents": 4,
                "source": "builtin",
                "packed": True,
                "tokens": 128,
                "sha256": "0",
            },
            "evaluation": {"tokens": 64, "source": "builtin", "window": 32},
            "fold_parity": {
                "max_abs_logit_diff": 1e-6,
                "max_abs_logit": 10.0,
                "atol": 1e-4,
                "tokens": 64,
                "passed": True,
            },
            "quality": {"ppl_original": 10.0, "ppl_plain_removal": 20.0, "ppl_pruned": 12.0},
            "guard": {"judged_on": None, "kept": "fitted"},
            "tokenizer_parity": {},
            "memory": {},
            "saved_dtype": "float32",
            "versions": {},
        }
    )


def _speed_run(pruned_tg: float | Callable[[], float], ideal: bool = True) -> SpeedRun:
    protocol = SpeedProtocol(
        prompt_tokens=(16,), gen_tokens=4, rounds=SpeedRounds(warmup=0, min_rounds=3, max_rounds=3)
    )
    run = measure_speed(
        _phases({"pp16": 0.02, "tg4": 0.02}), _phases({"pp16": 0.01, "tg4": pruned_tg}), protocol
    )
    if not ideal:
        return run
    shape = ModelShape.from_config(TINY_CONFIG)
    pruned = ModelShape.from_config(TINY_CONFIG | {"num_hidden_layers": 6})
    return replace(run, settings={"n_threads": 1}).with_ideal(ideal_speedups(shape, pruned, protocol.phases))


def _gguf_bench(speed: SpeedRun) -> dict[str, GGUFBench]:
    quality = {
        role: GGUFQuality(f"/{role}.gguf", 1000 * blocks, blocks, 10.0, 2.3, 64, 2, "0")
        for role, blocks in (("original", 8), ("pruned", 6))
    }
    machine = describe_machine("numpy", threads=1)
    entry = GGUFTypeBench(quality["original"], quality["pruned"], 0.75, speed)
    library = {"llama_cpp_python": "0", "system_info": "", "extra_buffer_types": True}
    return {
        "f16": GGUFBench("/original.gguf", "/pruned.gguf", 2, 32, 1, library, machine, {}, {"f16": entry})
    }


def _linked_images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", markdown)


def assert_every_linked_image_exists(run_dir: Path) -> list[str]:
    links = _linked_images((run_dir / "report.md").read_text())
    missing = [link for link in links if not (run_dir / link).is_file()]
    assert not missing, f"report.md links images that were not written: {missing}"
    return links


@pytest.mark.parametrize(("pruned_seconds", "slower"), [(0.01, False), (0.03, True)])
def test_report_flags_a_slowdown_and_links_only_written_plots(tmp_path, pruned_seconds, slower):
    from validation.report import write_report

    outputs = StageOutputs(gguf_bench=_gguf_bench(_speed_run(pruned_seconds)))
    report = write_report(tmp_path, _prune_record(), outputs, {}, [], 1.0)
    rows = {r.phase: r for r in report.speed}
    assert set(rows) == {"pp16", "tg4"} and rows["pp16"].measured == pytest.approx(2.0)
    assert rows["tg4"].slower_than_original is slower
    assert report.speed_checks.passed is not slower
    assert report.all_checks_passed is not slower
    assert json.loads((tmp_path / "report.json").read_text())["all_checks_passed"] is not slower
    markdown = (tmp_path / "report.md").read_text()
    assert ("slower than original" in markdown) is slower
    assert "measured / ideal" in markdown and "| llama.cpp | f16 | pp16 |" in markdown
    links = assert_every_linked_image_exists(tmp_path)
    assert "plots/speed.png" in links and "plots/selection.png" in links


def test_report_without_benchmarks_links_no_speed_plot(tmp_path):
    from validation.report import write_report

    report = write_report(tmp_path, _prune_record(), StageOutputs(), {}, [], 1.0)
    assert report.speed == [] and report.all_checks_passed is True
    assert "plots/speed.png" not in assert_every_linked_image_exists(tmp_path)
    assert not (tmp_path / "plots" / "speed.png").exists()


def test_a_median_below_one_with_a_spread_above_one_is_inconclusive_not_failed(tmp_path):
    """Noise around a speed-up (tiny models on a busy machine) is reported, not a failed check."""
    from itertools import cycle

    from validation.report import write_report

    times = cycle([0.03, 0.03, 0.005])
    bench = _gguf_bench(_speed_run(lambda: next(times), ideal=False))
    report = write_report(tmp_path, _prune_record(), StageOutputs(gguf_bench=bench), {}, [], 1.0)
    row = next(r for r in report.speed if r.phase == "tg4")
    assert row.slower_than_original and not row.consistently_slower
    assert report.speed_checks.passed and report.speed_checks.inconclusive == ["llama.cpp f16 tg4"]
    assert "inconclusive" in (tmp_path / "report.md").read_text()


# The keys of report.json, in their order (the stage outputs come between ``machines`` and ``timings_s``).
REPORT_KEYS = [
    "model", "ratio", "L", "N", "cuts", "prune", "quality_check", "runtimes", "speed", "speed_checks",
    "machines", "gguf_imatrix", "gguf_bench", "timings_s", "reused_stages", "wall_s", "failed_checks",
    "all_checks_passed",
    "plots",
]  # fmt: skip


def test_the_report_and_its_inputs_round_trip_through_json(tmp_path):
    """Every record the report takes or writes reads back from its JSON, keys and their order included."""
    from converters.imatrix import ImatrixUse
    from rmexport.sysinfo import MachineInfo
    from validation.report import RuntimeRow, SpeedRow, write_report

    imatrix = {"pruned q4_k_m": ImatrixUse("imatrix.gguf", "calibration.txt", 16, 210), "original f16": None}
    outputs = StageOutputs(gguf_imatrix=imatrix, gguf_bench=_gguf_bench(_speed_run(0.01)))
    data = json.loads(json.dumps(outputs.to_json()))
    assert list(data) == ["gguf_imatrix", "gguf_bench"] and StageOutputs.from_json(data) == outputs
    bench = data["gguf_bench"]["f16"]
    assert list(bench) == [
        "original", "pruned", "windows", "window_tokens", "n_threads", "library", "machine", "torch", "types",
    ]  # fmt: skip
    assert list(bench["types"]["f16"]) == ["original", "pruned", "size_ratio", "speed"]
    assert list(bench["types"]["f16"]["original"]) == [
        "file", "size_bytes", "block_count", "ppl", "mean_nll", "tokens", "windows", "windows_sha256",
    ]  # fmt: skip
    assert GGUFBench.from_json(bench) == outputs.gguf_bench["f16"]
    machine = outputs.gguf_bench["f16"].machine
    assert MachineInfo.from_json(json.loads(json.dumps(machine.to_json()))) == machine

    report = write_report(tmp_path, _prune_record(), outputs, {"prune": 1.234}, ["prune"], 12.34)
    written = json.loads((tmp_path / "report.json").read_text())
    assert list(written) == REPORT_KEYS and written == json.loads(json.dumps(report.to_json()))
    assert [RuntimeRow(**r) for r in written["runtimes"]] == report.runtimes
    assert [SpeedRow(**r) for r in written["speed"]] == report.speed
    assert written["machines"]["llama.cpp f16"]["llama_cpp"]["extra_buffer_types"] is True
    assert written["timings_s"] == {"prune": 1.23} and written["wall_s"] == 12.3
