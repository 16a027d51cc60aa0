"""report.json and report.md from the stage outputs. Computes nothing new: it only arranges."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .plots import plot_bars, plot_selection_profile, plot_speedups

__all__ = ["print_summary", "runtime_rows", "write_report"]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def parity_rows(outputs: dict[str, Any]) -> list[list[Any]]:
    """runtime, type, top-1 agreement, max |Δlogit|, mean KL, greedy decode match, passed."""
    rows = []
    onnx = outputs.get("onnx_parity")
    if onnx:
        rows.append(
            [
                "onnxruntime",
                onnx.get("precision", "fp32"),
                onnx.get("top1_agreement"),
                onnx.get("max_abs_diff"),
                None,
                onnx.get("decode_match"),
                onnx.get("passed"),
            ]
        )
    for gguf_type, entry in (outputs.get("gguf_parity") or {}).items():
        rows.append(
            [
                "llama.cpp",
                gguf_type,
                entry.get("top1_agreement"),
                entry.get("max_abs_diff"),
                entry.get("mean_kl"),
                entry.get("decode_match"),
                entry.get("passed"),
            ]
        )
    return rows


def runtime_rows(outputs: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per runtime × model: blocks, perplexity and speed, from the benchmark outputs."""
    rows: list[dict[str, Any]] = []
    onnx = outputs.get("onnx_bench")
    if onnx:
        for role in ("original", "pruned"):
            m = _get(onnx, "models", role) or {}
            rows.append(
                {
                    "runtime": "onnxruntime",
                    "type": "fp32",
                    "model": role,
                    "blocks": m.get("num_hidden_layers"),
                    "ppl": m.get("ppl"),
                    "prefill_128_ms": _get(m, "prefill", "128", "latency_ms_p50"),
                    "prefill_512_ms": _get(m, "prefill", "512", "latency_ms_p50"),
                    "prompt_tokens_per_s": _get(m, "prefill", "512", "tokens_per_s"),
                    "decode_tokens_per_s": _get(m, "decode", "tokens_per_s"),
                    "size_mib": m["size_bytes"] / 2**20 if m.get("size_bytes") else None,
                }
            )
    for gguf_type, result in (outputs.get("gguf_bench") or {}).items():
        entry = _get(result, "types", gguf_type) or {}
        for role in ("original", "pruned"):
            m = entry.get(role) or {}
            rows.append(
                {
                    "runtime": "llama.cpp",
                    "type": gguf_type,
                    "model": role,
                    "blocks": m.get("block_count"),
                    "ppl": m.get("ppl"),
                    "prefill_128_ms": None,
                    "prefill_512_ms": None,
                    "prompt_tokens_per_s": m.get("pp_tokens_per_s"),
                    "decode_tokens_per_s": m.get("tg_tokens_per_s"),
                    "size_mib": m["size_bytes"] / 2**20 if m.get("size_bytes") else None,
                }
            )
    return rows


def _speedups(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    keyed = {(r["runtime"], r["type"], r["model"]): r for r in rows}
    for (runtime, kind, model), pruned in keyed.items():
        if model != "pruned" or (runtime, kind, "original") not in keyed:
            continue
        original = keyed[(runtime, kind, "original")]
        ideal = original["blocks"] / pruned["blocks"] if original["blocks"] and pruned["blocks"] else None

        def ratio(key: str, original=original, pruned=pruned) -> float | None:
            a, b = original.get(key), pruned.get(key)
            return b / a if a and b else None

        out.append(
            [
                f"{runtime} {kind}",
                ratio("prompt_tokens_per_s"),
                ratio("decode_tokens_per_s"),
                ideal,
                ratio("ppl"),
            ]
        )
    return out


def _passed(section: Any) -> bool:
    if isinstance(section, dict):
        if section.get("passed") is False:
            return False
        return all(_passed(v) for v in section.values() if isinstance(v, dict))
    return True


def write_report(
    run_dir: Path,
    prune: dict[str, Any],
    outputs: dict[str, Any],
    timings: dict[str, float],
    reused: list[str],
    wall_s: float,
) -> dict[str, Any]:
    checks = {k: v for k, v in outputs.items() if k.endswith("parity")}
    rows = runtime_rows(outputs)
    report = {
        "model": prune["model"],
        "ratio": prune["ratio"],
        "L": prune["L"],
        "N": prune["N"],
        "cuts": [{"cut": c["cut"], "removed_layers": c["removed_layers"]} for c in prune["cuts"]],
        "prune": {
            key: prune[key]
            for key in ("quality", "fold_parity", "calibration", "evaluation", "solver", "selection")
        },
        "runtimes": rows,
        **outputs,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "reused_stages": reused,
        "wall_s": round(wall_s, 1),
        "all_checks_passed": bool(
            prune["fold_parity"]["passed"] and all(_passed(v) for v in checks.values())
        ),
    }
    plots = run_dir / "plots"
    plot_selection_profile(prune, plots / "selection.png")
    quality = prune["quality"]
    ppl_groups = {
        "PyTorch": {
            "original": quality["ppl_original"],
            "plain removal": quality["ppl_plain_removal"],
            "pruned": quality["ppl_pruned"],
        }
    }
    for row in rows:
        if row["ppl"] is not None:
            ppl_groups.setdefault(f"{row['runtime']} {row['type']}", {})[row["model"]] = row["ppl"]
    plot_bars("Held-out perplexity (lower is better)", "perplexity", ppl_groups, plots / "perplexity.png")
    speedups = {}
    for label, prompt, decode, _ideal, _ppl in _speedups(rows):
        if prompt:
            speedups[f"{label} prompt"] = prompt
        if decode:
            speedups[f"{label} decode"] = decode
    if speedups:
        plot_speedups(speedups, prune["L"] / prune["N"], plots / "speed.png")
    _write(run_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    _write(run_dir / "report.md", _markdown(report, prune, outputs, rows, bool(speedups)))
    return report


def _markdown(report: dict, prune: dict, outputs: dict, rows: list[dict], has_speed: bool) -> str:
    q = prune["quality"]
    lines = [
        f"# {prune['model']['spec']}: {prune['L']} → {prune['N']} blocks",
        "",
        f"All checks passed: **{_fmt(report['all_checks_passed'])}**. Wall time {report['wall_s']:.0f} s.",
        "",
        "## What was cut, and why",
        "",
    ]
    for cut in prune["cuts"]:
        fit = cut["fit"]
        removed = cut["removed_layers"]
        lines.append(
            f"- blocks {removed[0]}–{removed[-1]} (cut {cut['cut']}), rule `{prune['selection']['rule']}`, "
            f"solver `{fit['solver']}`: error left after the map {fit['rel_residual']:.4f} "
            f"of the stream's energy, against {fit['rel_residual_plain_removal']:.4f} for plain removal"
        )
    cal = prune["calibration"]
    lines += [
        f"- calibration: {cal['documents']} documents of `{cal['source']}` packed={cal['packed']}, "
        f"{cal['tokens']} tokens (sha256 {cal['sha256']})",
        "",
        "![selection profile](plots/selection.png)",
        "",
        "## Quality",
        "",
        f"Held-out perplexity over {prune['evaluation']['tokens']} tokens of "
        f"`{prune['evaluation']['source']}` ({prune['evaluation']['window']}-token windows), "
        "the same windows in every runtime.",
        "",
        _table(
            ["model (PyTorch)", "perplexity"],
            [
                ["original", q["ppl_original"]],
                ["plain removal of the same blocks", q["ppl_plain_removal"]],
                [f"pruned ({prune['solver']['name']})", q["ppl_pruned"]],
            ],
        ),
        "",
        f"Fold parity (folded weights vs the map applied explicitly): max |Δlogit| "
        f"{prune['fold_parity']['max_abs_logit_diff']:.2e}, tolerance {prune['fold_parity']['atol']:.2e}.",
        "",
        "![perplexity](plots/perplexity.png)",
        "",
    ]
    parity = parity_rows(outputs)
    if parity:
        lines += [
            "## Deployables against the pruned PyTorch model",
            "",
            _table(
                [
                    "runtime",
                    "type",
                    "top-1 agreement",
                    "max abs logit diff",
                    "mean KL",
                    "greedy decode match",
                    "passed",
                ],
                parity,
            ),
            "",
        ]
    if rows:
        lines += [
            "## Original vs pruned in each runtime",
            "",
            _table(
                [
                    "runtime",
                    "type",
                    "model",
                    "blocks",
                    "size MiB",
                    "perplexity",
                    "prefill 128 ms",
                    "prefill 512 ms",
                    "prompt tok/s",
                    "decode tok/s",
                ],
                [
                    [
                        r["runtime"],
                        r["type"],
                        r["model"],
                        r["blocks"],
                        r["size_mib"],
                        r["ppl"],
                        r["prefill_128_ms"],
                        r["prefill_512_ms"],
                        r["prompt_tokens_per_s"],
                        r["decode_tokens_per_s"],
                    ]
                    for r in rows
                ],
            ),
            "",
            _table(
                ["runtime", "prompt speed-up", "decode speed-up", "ideal (L/N)", "perplexity ratio"],
                _speedups(rows),
            ),
            "",
        ]
    if has_speed:
        lines += ["![speed](plots/speed.png)", ""]
    lines += [
        "## Time per stage",
        "",
        _table(["stage", "seconds"], [[k, v] for k, v in report["timings_s"].items()]),
    ]
    if report["reused_stages"]:
        lines += ["", "Reused from an earlier run: " + ", ".join(report["reused_stages"]) + "."]
    lines += [
        "",
        "Every number above is in `report.json`; the raw results are in `prune.json` and `checks/`.",
    ]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def print_summary(report: dict[str, Any], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{report['model']['spec']}: {report['L']} → {report['N']} blocks")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in report["timings_s"].items():
        table.add_row(stage + (" (reused)" if stage in report["reused_stages"] else ""), f"{seconds:.1f}")
    console.print(table)
    results = Table(title="original → pruned")
    for column in ("runtime", "perplexity", "prompt tok/s", "decode tok/s"):
        results.add_column(column)
    q = report["prune"]["quality"]
    results.add_row(
        "PyTorch",
        f"{q['ppl_original']:.2f} → {q['ppl_pruned']:.2f} (plain removal {q['ppl_plain_removal']:.2f})",
        "",
        "",
    )
    keyed = {(r["runtime"], r["type"], r["model"]): r for r in report["runtimes"]}
    for (runtime, kind, model), row in keyed.items():
        if model != "original" or (runtime, kind, "pruned") not in keyed:
            continue
        pruned = keyed[(runtime, kind, "pruned")]

        def pair(key: str, fmt: str = "{:.1f}", row=row, pruned=pruned) -> str:
            a, b = row.get(key), pruned.get(key)
            return f"{fmt.format(a)} → {fmt.format(b)}" if a and b else ""

        results.add_row(
            f"{runtime} {kind}",
            pair("ppl", "{:.2f}"),
            pair("prompt_tokens_per_s"),
            pair("decode_tokens_per_s"),
        )
    console.print(results)
    status = "all checks passed" if report["all_checks_passed"] else "SOME CHECKS FAILED"
    console.print(f"{status}; report: {run_dir / 'report.md'}")
