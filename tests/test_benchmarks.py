"""The benchmark scripts run end to end on a tiny model and write what their READMEs promise.

Slow (two minutes on 2 cores) and about scripts, not the product: `make test-slow` runs them."""

import json

import pytest

from bench import pipeline as bench_pipeline
from bench import quality as bench_quality

pytestmark = pytest.mark.slow


def test_quality_benchmark_rows(tiny_checkpoints, tmp_path):
    out = tmp_path / "bench"
    argv = ["--model", str(tiny_checkpoints["llama"]), "--calib-samples", "48", "--seq-len", "32"]
    argv += ["--eval-tokens", "1024", "--blocks", "2", "--out", str(out)]
    assert bench_quality.main(argv) == 0
    result = json.loads((out / "quality.json").read_text())
    rows = result["rows"]
    assert rows[0]["rule"] == "original" and result["n"] == 2 and result["eval_tokens"] == 1024
    by_rule = {}
    for row in rows[1:-1]:
        by_rule.setdefault(row["rule"], {})[row["solver"]] = row
    assert set(by_rule) == set(bench_quality.RULES)
    fitted = {f"{solver}, map of the {m}" for solver in ("lstsq", "cosine") for m in ("hidden", "output")}
    assert all(set(solvers) == {"plain removal", *fitted} for solvers in by_rule.values())
    for solvers in by_rule.values():
        for m in ("hidden", "output"):
            assert solvers[f"lstsq, map of the {m}"]["map"] == m
            cosine = solvers[f"cosine, map of the {m}"]["cosine"]
            validation = cosine["validation_curve"]
            assert validation[cosine["best_epoch"]] == min(validation) <= validation[0]
    fit_cut = by_rule["fit"]["lstsq, map of the hidden"]["cut"]
    same_cut = [r for r in rows[1:-1] if r["cut"] == fit_cut and r["solver"] == "lstsq, map of the hidden"]
    assert len({r["ppl"] for r in same_cut}) == 1
    multi = rows[-1]
    assert multi["rule"] == "fit, 2 cuts" and len(multi["cut"]) == 2
    assert sum(end - start for start, end in multi["cut"]) == 2
    assert "| original |" in (out / "quality.md").read_text()


@pytest.mark.parametrize("select", ["fit", "distance"])
def test_pipeline_benchmark_variants_agree_on_the_cut(tiny_checkpoints, tmp_path, select):
    out = tmp_path / "pipeline.json"
    argv = ["--model", str(tiny_checkpoints["llama"]), "--documents", "16", "--seq-len", "32"]
    argv += ["--select", select, "--threads", "1", "--eval-tokens", "1024", "--out", str(out)]
    assert bench_pipeline.main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == set(bench_pipeline.VARIANTS)
    assert summary["engine"]["cut"] == summary["streamed"]["cut"] == summary["prune"]["cut"]
    assert summary["engine_distance"]["cut"] == summary["baseline"]["cut"]
    if select == "distance":
        assert summary["engine"]["cut"] == summary["baseline"]["cut"]
    assert all(row["tokens_per_s_median"] > 0 for row in summary.values())


def test_generalization_benchmark_rows(tiny_checkpoints, tmp_path):
    from bench import generalization

    out = tmp_path / "generalization.json"
    argv = ["--model", str(tiny_checkpoints["llama"]), "--eval-tokens", "512"]
    argv += ["--mixes", "builtin:24,builtin:16+dialogue:4+docs:4", "--out", str(out)]
    assert generalization.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["original"]) == {"builtin", "docs", "dialogue"}
    ideas = {(row["calibration"], row["idea"]) for row in result["rows"]}
    assert {("builtin×24", "fit"), ("builtin×16+dialogue×4+docs×4", "shrink")} <= ideas
    assert {("builtin×24", "hidden"), ("builtin×24", "hidden, α=0")} <= ideas
    for row in result["rows"]:
        assert set(row["ppl"]) == set(row["ppl_plain_removal"]) == {"builtin", "docs", "dialogue"}
        assert all(value > 1.0 for value in row["ppl"].values())


def test_token_weighting_benchmark_rows(tiny_checkpoints, tmp_path):
    from bench import token_weighting

    out = tmp_path / "token_weighting.json"
    argv = ["--model", str(tiny_checkpoints["llama"]), "--cut", "3,5", "--calib-samples", "24"]
    argv += ["--seq-len", "32", "--eval-tokens", "512", "--ood-tokens", "512", "--out", str(out)]
    assert token_weighting.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["ppl"]) == {"original", "plain removal", *token_weighting.VARIANTS}
    assert all(set(row) == {"builtin", "docs", "dialogue"} for row in result["ppl"].values())
    energy = result["energy"]
    assert energy["first_tokens"] >= 24 // 8 and 0.0 < energy["first_tokens_energy_share"] < 1.0
    # Each map is folded into the plan it is measured on (not plain removal under another name).
    removal = result["ppl"]["plain removal"]["builtin"]
    assert all(result["ppl"][name]["builtin"] != removal for name in token_weighting.VARIANTS)
