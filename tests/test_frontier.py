"""The llama.cpp frontier of ``rmexport run``: a ladder of types, original and pruned, measured alike.

Real llama.cpp throughout (llama-imatrix, libllama's quantizer, perplexity and speed in llama.cpp), on
a tiny model with a ladder of three types.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rmexport import frontier
from rmexport.cli import main
from rmexport.frontier import FrontierRecord, LadderRecord
from validation.frontier import WARMUP_TOKENS, FrontierRow, WarmUp, page_cache_fraction, pareto
from validation.gguf_bench import DEFAULT_PROTOCOL

from .test_pipeline import FAST
from .test_speed import assert_every_linked_image_exists

# Two rungs and the tiny checkpoint's own type (f32): one with an importance matrix, one without.
LADDER = ("q8_0", "q4_k_m")


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory, tiny_checkpoints):
    out_root = tmp_path_factory.mktemp("frontier")
    patch = pytest.MonkeyPatch()
    patch.setattr(frontier, "LADDER", LADDER)
    try:
        argv = [str(tiny_checkpoints["llama"]), "--ratio", "0.25", "--out-root", str(out_root)]
        code = main(
            ["run", *argv, *FAST, "--skip-onnx", "--frontier", "--max-rounds", "1", "--min-rounds", "1"]
        )
    finally:
        patch.undo()
    return code, out_root / "llama-r0.25", out_root / "llama-original"


def test_a_ladder_of_three_types_gives_a_complete_table(frontier_run):
    code, run_dir, base_dir = frontier_run
    report = json.loads((run_dir / "report.json").read_text())
    assert code in (0, 1)  # 1: a random tiny model may fail the quality or the one-round speed check
    table = report["frontier"]["table"]
    assert [(r["model"], r["type"]) for r in table] == [
        (model, t) for model in ("original", "pruned") for t in ("q8_0", "q4_k_m", "f32")
    ]
    sources = {"builtin", "docs", "dialogue"}
    for row in table:
        assert row["blocks"] == (8 if row["model"] == "original" else 6)
        assert row["size_mib"] > 0 and row["ppl"] > 1 and set(row["ppl_by_source"]) == sources
        assert row["pp_tokens_per_s"] > 0 and row["tg_tokens_per_s"] > 0 and row["kl"] >= 0
        assert row["imatrix"] == (row["type"] == "q4_k_m")
    by_type = {(r["model"], r["type"]): r for r in table}
    # The original's f32 file is the float reference itself: KL 0 up to the stored float16 rounding.
    assert by_type[("original", "f32")]["kl"] < 1e-4
    assert by_type[("original", "q4_k_m")]["kl"] > by_type[("original", "q8_0")]["kl"] > 1e-6
    # Sizes follow the types, and the pruned files (6 of 8 blocks) are smaller than the original's.
    for model in ("original", "pruned"):
        sizes = [by_type[(model, t)]["size_mib"] for t in ("f32", "q8_0", "q4_k_m")]
        assert sizes == sorted(sizes, reverse=True)
    for t in ("f32", "q8_0", "q4_k_m"):
        assert by_type[("pruned", t)]["size_mib"] < by_type[("original", t)]["size_mib"]
        assert by_type[("pruned", t)]["tg_speedup"] > 0
    assert any(r["pareto_size"] for r in table) and any(r["pareto_speed"] for r in table)
    assert "MiB the pruned" in report["frontier"]["headline"]
    markdown = (run_dir / "report.md").read_text()
    assert "The llama.cpp frontier" in markdown and report["frontier"]["headline"] in markdown
    linked = assert_every_linked_image_exists(run_dir)
    assert {"plots/frontier_size.png", "plots/frontier_speed.png"} <= set(linked)
    # The original's ladder is made once per model, beside its float reference and its matrix.
    names = {p.name for p in (base_dir / "frontier").iterdir()}
    assert {"llama-q8_0.gguf", "llama-q4_k_m.gguf", "llama-f32.gguf", "llama.imatrix.gguf"} <= names
    assert "reference-logprobs.npy" in names


def test_a_second_run_reuses_the_original_ladder(frontier_run, tiny_checkpoints, capsys):
    _, run_dir, _ = frontier_run
    patch = pytest.MonkeyPatch()
    patch.setattr(frontier, "LADDER", LADDER)
    try:
        argv = [str(tiny_checkpoints["llama"]), "--ratio", "0.25", "--out-root", str(run_dir.parent)]
        main(["run", *argv, *FAST, "--skip-onnx", "--frontier", "--max-rounds", "1", "--min-rounds", "1"])
    finally:
        patch.undo()
    reused = json.loads((run_dir / "report.json").read_text())["reused_stages"]
    assert {"frontier", "frontier_speed", "original/frontier"} <= set(reused)


def test_frontier_without_benchmarks_is_one_line_exit_2(tiny_checkpoints, tmp_path, capsys):
    code = main(
        ["run", str(tiny_checkpoints["llama"]), "--out-root", str(tmp_path), "--frontier", "--skip-bench"]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "--skip-bench" in lines[0] and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_pareto_marks_the_points_no_other_beats():
    points = [(100.0, 15.0), (80.0, 17.0), (82.0, 30.0), (60.0, 40.0), (80.0, 17.0)]
    assert pareto(points, higher_x_is_better=False) == [True, True, False, True, True]
    assert pareto([(10.0, 5.0), (12.0, 6.0)], higher_x_is_better=True) == [True, True]
    assert pareto([(12.0, 5.0), (10.0, 6.0)], higher_x_is_better=True) == [True, False]


def test_frontier_without_llama_imatrix_names_the_make_target(
    tiny_checkpoints, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("RMEXPORT_CACHE", str(tmp_path / "empty-cache"))
    code = main(["run", str(tiny_checkpoints["llama"]), "--out-root", str(tmp_path / "runs"), "--frontier"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "llama-imatrix is not built" in lines[0]
    assert "make llama-tools" in err and not (tmp_path / "runs").exists()


def test_the_speed_step_runs_each_file_once_untimed_first(frontier_run):
    _, run_dir, base_dir = frontier_run
    speeds = json.loads((run_dir / "checks" / "frontier_speed.json").read_text())
    assert set(speeds) == {"q8_0", "q4_k_m", "f32"}
    for gguf_type, record in speeds.items():
        for role, folder in (("original", base_dir), ("pruned", run_dir)):
            warm = WarmUp.from_json(record["warmup"][role])
            assert Path(warm.file).parent == folder / "frontier" and gguf_type in Path(warm.file).name
            # llama.cpp's own count of the tokens it evaluated, and the file whole in the page cache
            assert warm.tokens == WARMUP_TOKENS and warm.seconds > 0
            assert warm.resident_after == 1.0 and record["resident_after_timing"][role] == 1.0
        assert record["phases"]["tg128"]["rounds"] == 1


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_file_out_of_the_page_cache_is_read_in_before_the_timed_round(frontier_run, tmp_path):
    _, run_dir, base_dir = frontier_run
    files = {
        role: {"q8_0": folder / "frontier" / name}
        for role, folder, name in (
            ("original", base_dir, "llama-q8_0.gguf"),
            ("pruned", run_dir, "llama-r0.25-q8_0.gguf"),
        )
    }
    for role in files:
        _evict(files[role]["q8_0"])
    if any(page_cache_fraction(f["q8_0"]) == 1.0 for f in files.values()):
        pytest.skip("this file system keeps the files in memory (tmpfs): they cannot be cold")
    protocol = DEFAULT_PROTOCOL.with_rounds(frontier.SPEED_ROUNDS)
    record = frontier.time_ladder(["q8_0"], files, protocol, {})["q8_0"]
    for role in files:
        warm = WarmUp.from_json(record["warmup"][role])
        assert warm.resident_before < 0.5 and warm.resident_after == 1.0 and warm.tokens == WARMUP_TOKENS
    assert record["phases"]["pp512"]["original"]["tokens_per_s"]["median"] > 0


def test_the_frontier_records_read_back_as_written(frontier_run):
    _, run_dir, base_dir = frontier_run
    for path in (base_dir / "checks" / "frontier.json", run_dir / "checks" / "frontier.json"):
        data = json.loads(path.read_text())
        record = LadderRecord.from_json(data)
        assert record.to_json() == data and record.points[0].sources["builtin"].tokens > 0
    assert LadderRecord.from_json(json.loads((base_dir / "checks" / "frontier.json").read_text())).reference
    report = json.loads((run_dir / "report.json").read_text())["frontier"]
    stages = {k: v for k, v in report.items() if k not in ("table", "headline")}
    assert FrontierRecord.from_json(stages).to_json() == stages
    for row in report["table"]:
        assert FrontierRow.from_json(row).to_json() == row
