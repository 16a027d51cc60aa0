"""`rmexport run` end to end on a tiny model: outputs, report, resume, determinism, bad input."""

import json
import shutil

import pytest

from rmexport import llamacpp
from rmexport.cli import main
from rmexport.config import RUN_EVAL_TOKENS

from .test_speed import assert_every_linked_image_exists

# One thread: a tiny model's decode is mostly two threads waiting on each other (llama.cpp tg128 here:
# 155 tok/s on two threads, 2,900 on one), which is the time, not what the tests are about.
FAST = "--calib-samples 48 --seq-len 32 --eval-tokens 1024 --min-rounds 3 --max-rounds 3 --threads 1".split()


def assert_checks_passed(code: int, run_dir) -> dict:
    """Every check passed except, possibly, the quality check: on a random tiny model the fitted map
    is noise, and it may do worse than plain removal; then (and only then) the run exits 1."""
    report = json.loads((run_dir / "report.json").read_text())
    quality = report["quality_check"]["passed"]
    assert report["prune"]["fold_parity"]["passed"] and report["speed_checks"]["passed"]
    for key in ("onnx_parity", "gguf_parity"):
        entries = report.get(key) or {}
        entries = [entries] if "passed" in entries else list(entries.values())
        assert all(e["passed"] for e in entries), key
    assert report["all_checks_passed"] is quality
    assert code == (0 if quality else 1)
    return report


def _run(capsys, *argv):
    code = main(["run", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_checkpoints):
    out_root = tmp_path_factory.mktemp("runs")
    code = main(
        ["run", str(tiny_checkpoints["llama"]), "--ratio", "0.25", "--out-root", str(out_root), *FAST]
    )
    return code, out_root, out_root / "llama-r0.25"


def test_run_writes_every_artefact_and_a_report(tiny_run):
    code, _, run_dir = tiny_run
    assert_checks_passed(code, run_dir)
    for path in (
        "hf/config.json",
        "prune.json",
        "onnx/model.onnx",
        "report.json",
        "report.md",
        "plots/selection.png",
    ):
        assert (run_dir / path).exists(), path
    assert sorted(p.name for p in (run_dir / "gguf").iterdir()) == [
        "llama-r0.25-f16.gguf",
        "llama-r0.25-q4_k_m.gguf",
        "llama-r0.25-q4_k_m.imatrix.gguf",  # q4_k_m's importance matrix, from the prune's text
    ]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["L"] == 8 and report["N"] == 6
    for key in ("onnx_parity", "gguf_parity", "onnx_bench", "gguf_bench"):
        assert report[key], key
    assert "prune" in report["timings_s"]
    markdown = (run_dir / "report.md").read_text()
    assert "8 → 6 blocks" in markdown and "plots/selection.png" in markdown
    # Every image the report links was written, the speed plot included.
    assert "plots/speed.png" in assert_every_linked_image_exists(run_dir)
    # Speed: every runtime and type, each phase with its ideal, the median and the spread.
    phases = {(r["runtime"], r["type"], r["phase"]) for r in report["speed"]}
    assert phases == {
        (runtime, kind, phase)
        for runtime, kind, names in (
            ("onnxruntime", "fp32", ("pp512", "tg128")),
            ("llama.cpp", "f16", ("pp512", "tg128")),
            ("llama.cpp", "q4_k_m", ("pp512", "tg128")),
        )
        for phase in names
    }
    for row in report["speed"]:
        assert 1 < row["ideal"] < 8 / 6 and row["measured_min"] <= row["measured"] <= row["measured_max"]
    assert report["speed_checks"]["passed"] is True and report["machines"]
    # Where llama.cpp ran without its extra buffer types (CPUs with AMX), the report says so.
    left_out = not llamacpp.library_info()["extra_buffer_types"]
    assert (markdown.count("weight buffers left out") == 2) == left_out


def test_rerun_reuses_stages_and_interrupted_output_recovers(tiny_run, tiny_checkpoints, capsys):
    _, out_root, run_dir = tiny_run
    before = (run_dir / "gguf" / "llama-r0.25-f16.gguf").read_bytes()
    # Simulate an interruption: a half-written temporary folder and a stage without its manifest.
    (run_dir / ".hf.interrupted").mkdir()
    (run_dir / ".stages" / "export_gguf_f16.json").unlink()
    for bench in ("bench_onnx", "bench_gguf"):
        (run_dir / ".stages" / f"{bench}.json").unlink()
    code, _, _ = _run(
        capsys, str(tiny_checkpoints["llama"]), "--ratio", "0.25", "--out-root", str(out_root), *FAST
    )
    report = assert_checks_passed(code, run_dir)
    assert "prune" in report["reused_stages"] and "export_onnx" in report["reused_stages"]
    assert "export_gguf_f16" not in report["reused_stages"]
    # The benchmarks ran again; the original's perplexities, measured once per model, were reused.
    assert {"bench_onnx", "bench_gguf"}.isdisjoint(report["reused_stages"])
    checks = out_root / "llama-original" / "checks"
    for runtime in ("onnx", "gguf_f16", "gguf_q4_k_m"):
        assert f"original/perplexity_{runtime}" in report["reused_stages"]
    assert report["onnx_bench"]["models"]["original"] == json.loads(
        (checks / "onnx_perplexity.json").read_text()
    )
    for gguf_type in ("f16", "q4_k_m"):
        earlier = json.loads((checks / f"gguf_{gguf_type}_perplexity.json").read_text())
        assert report["gguf_bench"][gguf_type]["types"][gguf_type]["original"] == earlier
    assert not (run_dir / ".hf.interrupted").exists()
    # The same inputs give byte-identical GGUF files.
    assert (run_dir / "gguf" / "llama-r0.25-f16.gguf").read_bytes() == before


def test_same_command_twice_gives_the_same_cut_and_files(tiny_run, tiny_checkpoints, tmp_path):
    _, _, first = tiny_run
    code = main(
        [
            "run",
            str(tiny_checkpoints["llama"]),
            "--ratio",
            "0.25",
            "--out-root",
            str(tmp_path),
            "--skip-onnx",
            "--skip-bench",
            *FAST,
        ]
    )
    second = tmp_path / "llama-r0.25"
    assert_checks_passed(code, second)
    a, b = (json.loads((d / "prune.json").read_text()) for d in (first, second))
    assert a["cuts"][0]["cut"] == b["cuts"][0]["cut"]
    assert (first / "hf" / "model.safetensors").read_bytes() == (
        second / "hf" / "model.safetensors"
    ).read_bytes()
    for name in ("llama-r0.25-f16.gguf", "llama-r0.25-q4_k_m.gguf", "llama-r0.25-q4_k_m.imatrix.gguf"):
        assert (first / "gguf" / name).read_bytes() == (second / "gguf" / name).read_bytes()


def test_a_budget_below_the_model_size_runs_to_a_complete_report(tiny_checkpoints, tmp_path):
    """Weights streamed block by block, activations spilled to disk: every check is still measured."""
    code = main(
        ["run", str(tiny_checkpoints["qwen2"]), "--out-root", str(tmp_path), "--memory-budget", "1600KiB"]
        + ["--compute-dtype", "float32", "--skip-onnx", "--skip-bench", *FAST]  # the budget is for float32
    )
    run_dir = tmp_path / "qwen2-r0.25"
    assert_checks_passed(code, run_dir)
    prune = json.loads((run_dir / "prune.json").read_text())
    memory = prune["memory"]
    assert not memory["weights_resident"] and memory["weights_bytes"] > memory["budget_bytes"] / 2
    assert memory["activations_spilled_bytes"] > 0
    quality = prune["quality"]
    assert [q["source"] for q in quality["out_of_domain"]] == ["docs", "dialogue"]
    for q in [quality, *quality["out_of_domain"]]:
        assert all(q[key] > 1.0 for key in ("ppl_original", "ppl_plain_removal", "ppl_pruned"))
    assert prune["fold_parity"]["passed"]
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["gguf_parity"]) == {"f16", "q4_k_m"}
    assert all(entry["positions"] > 0 for entry in report["gguf_parity"].values())
    markdown = (run_dir / "report.md").read_text()
    assert "8 → 6 blocks" in markdown
    assert prune["compute"] == {"device": "cpu", "dtype": "float32", "dtype_reason": "requested"}
    assert "forwards in float32 on cpu (requested)" in markdown


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gguf-type", "q3_weird"], "--gguf-type"),
        (["--ratio", "0.9"], "at least 2 must remain"),
        (["--calib-data", "/nope.txt"], "text source not found"),
    ],
)
def test_bad_input_fails_before_heavy_work(capsys, tmp_path, tiny_checkpoints, extra, message):
    code, _, err = _run(capsys, str(tiny_checkpoints["llama"]), "--out-root", str(tmp_path), *FAST, *extra)
    assert code == 2 and message in err
    assert not (tmp_path / "llama-r0.25" / "hf").exists()


def test_gemma3_with_any_cut_size_runs_in_llama_cpp(tmp_path, tiny_checkpoints):
    """2 of 8 blocks: no whole 6-block period, yet the GGUF carries the kept blocks' pattern."""
    code = main(
        ["run", str(tiny_checkpoints["gemma3"]), "--out-root", str(tmp_path), "--layers", "2"]
        + ["--skip-onnx", "--skip-bench", *FAST]
    )
    run_dir = tmp_path / "gemma3-r2l"
    report = assert_checks_passed(code, run_dir)
    prune = json.loads((run_dir / "prune.json").read_text())
    assert prune["N"] == 6 and prune["fold_parity"]["passed"]
    assert report["gguf_parity"]["f16"]["passed"]


def test_full_disk_is_refused(capsys, tmp_path, tiny_checkpoints, monkeypatch):
    import rmexport.pipeline as pipeline

    real = shutil.disk_usage
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    code, _, err = _run(capsys, str(tiny_checkpoints["llama"]), "--out-root", str(tmp_path), *FAST)
    assert code == 2 and "GiB free" in err


def test_unknown_model(capsys, tmp_path):
    code, _, err = _run(capsys, "no-such-model", "--out-root", str(tmp_path))
    assert code == 2 and "unknown model" in err


@pytest.mark.parametrize("source", ["builtin", "docs", "dialogue"])
def test_a_pruned_model_worse_than_plain_removal_is_never_all_checks_passed(tiny_run, tmp_path, source):
    from rmexport.records import PruneRecord
    from validation.report import StageOutputs, write_report

    _, _, run_dir = tiny_run
    prune = json.loads((run_dir / "prune.json").read_text())
    by_source = {q["source"]: q for q in prune["quality"]["out_of_domain"]} | {"builtin": prune["quality"]}
    assert sorted(by_source) == ["builtin", "dialogue", "docs"]
    for q in by_source.values():  # the pruned model better than plain removal everywhere ...
        q["ppl_pruned"] = q["ppl_plain_removal"] * 0.9
    by_source[source]["ppl_pruned"] = by_source[source]["ppl_plain_removal"] * 1.01  # ... but here
    shutil.copytree(run_dir / "plots", tmp_path / "plots")
    report = write_report(tmp_path, PruneRecord.from_json(prune), StageOutputs(), {}, reused=[], wall_s=1.0)
    assert report.quality_check.pruned_worse_than_plain_removal == [source]
    assert report.failed_checks == ["quality"] and report.all_checks_passed is False
    markdown = (tmp_path / "report.md").read_text()
    assert f"worse than plain removal of the same blocks on `{source}`" in markdown
    tokens = f"({RUN_EVAL_TOKENS} tokens)"  # the run's default for every held-out source
    assert f"`docs` {tokens}" in markdown and f"`dialogue` {tokens}" in markdown
