"""report.json and report.md from the stage outputs. Computes nothing new: it only arranges."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .plots import plot_bars, plot_selection_profile

__all__ = ["print_summary", "write_report"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def _passed(section: Any) -> bool:
    """A parity section passes when every ``passed`` flag inside it is true."""
    if isinstance(section, dict):
        if section.get("passed") is False:
            return False
        return all(_passed(v) for v in section.values() if isinstance(v, dict))
    return True


def _find_numbers(data: Any, key: str, prefix: str = "") -> dict[str, float]:
    """Every numeric ``key`` inside ``data``, by dotted path (e.g. ``original.f16.ppl``)."""
    found: dict[str, float] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if k == key and isinstance(v, int | float) and not isinstance(v, bool):
                found[prefix or k] = float(v)
            else:
                found |= _find_numbers(v, key, path)
    return found


def _table(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _flat(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        out: list[tuple[str, Any]] = []
        for k, v in data.items():
            out += _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(data, list) and len(data) > 8:
        return [(prefix, f"[{len(data)} values]")]
    return [(prefix, data)]


def _quality_groups(prune: dict[str, Any], outputs: dict[str, Any]) -> dict[str, dict[str, float]]:
    groups = {
        "PyTorch": {
            "original": prune["quality"]["ppl_original"],
            "plain removal": prune["quality"]["ppl_plain_removal"],
            "pruned": prune["quality"]["ppl_pruned"],
        }
    }
    for runtime, key in (("onnxruntime", "onnx_bench"), ("llama.cpp", "gguf_bench")):
        found = _find_numbers(outputs.get(key) or {}, "ppl")
        for path, value in found.items():
            label = "original" if "original" in path else "pruned" if "pruned" in path else path
            suffix = next((t for t in ("f32", "f16", "bf16", "q8_0", "q4_k_m") if t in path), "")
            groups.setdefault(f"{runtime} {suffix}".strip(), {})[label] = value
    return groups


def write_report(
    run_dir: Path,
    prune: dict[str, Any],
    outputs: dict[str, Any],
    timings: dict[str, float],
    reused: list[str],
    wall_s: float,
) -> dict[str, Any]:
    checks = {k: v for k, v in outputs.items() if k.endswith("parity")}
    all_passed = prune["fold_parity"]["passed"] and all(_passed(v) for v in checks.values())
    report = {
        "model": prune["model"],
        "ratio": prune["ratio"],
        "L": prune["L"],
        "N": prune["N"],
        "cuts": [{"cut": c["cut"], "removed_layers": c["removed_layers"]} for c in prune["cuts"]],
        "prune": {
            "quality": prune["quality"],
            "fold_parity": prune["fold_parity"],
            "calibration": prune["calibration"],
            "solver": prune["solver"],
            "selection": prune["selection"],
        },
        **outputs,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "reused_stages": reused,
        "wall_s": round(wall_s, 1),
        "all_checks_passed": all_passed,
    }
    plots = run_dir / "plots"
    plot_selection_profile(prune, plots / "selection.png")
    plot_bars("Held-out perplexity", "perplexity", _quality_groups(prune, outputs), plots / "perplexity.png")
    speed = {}
    for runtime, key in (("onnxruntime", "onnx_bench"), ("llama.cpp", "gguf_bench")):
        for metric in ("tokens_per_s", "decode_tokens_per_s", "tg_tokens_per_s", "pp_tokens_per_s"):
            for path, value in _find_numbers(outputs.get(key) or {}, metric).items():
                label = "original" if "original" in path else "pruned" if "pruned" in path else path
                group = f"{runtime} {metric.replace('_tokens_per_s', '').replace('tokens_per_s', 'decode')}"
                suffix = next((t for t in ("f16", "q4_k_m", "f32", "q8_0") if t in path), "")
                speed.setdefault(f"{group} {suffix}".strip(), {})[label] = value
    if speed:
        plot_bars("Speed (higher is better)", "tokens/s", speed, plots / "speed.png")
    _write(run_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    _write(run_dir / "report.md", _markdown(report, prune, outputs, bool(speed)))
    return report


def _markdown(report: dict[str, Any], prune: dict[str, Any], outputs: dict[str, Any], has_speed: bool) -> str:
    q = prune["quality"]
    lines = [
        f"# {prune['model']['spec']}: {prune['L']} → {prune['N']} blocks",
        "",
        f"All checks passed: **{_fmt(report['all_checks_passed'])}**. Wall time {report['wall_s']:.0f} s.",
        "",
        "## What was cut",
        "",
    ]
    for cut in prune["cuts"]:
        fit = cut["fit"]
        lines.append(
            f"- blocks {cut['removed_layers'][0]}–{cut['removed_layers'][-1]} (cut {cut['cut']}), "
            f"rule `{prune['selection']['rule']}`, solver `{fit['solver']}`: error after the map "
            f"{fit['rel_residual']:.4f} vs {fit['rel_residual_plain_removal']:.4f} for plain removal"
        )
    cal = prune["calibration"]
    lines += [
        f"- calibration: {cal['documents']} documents of `{cal['source']}`, {cal['tokens']} tokens "
        f"(sha256 {cal['sha256']})",
        "",
        "![selection](plots/selection.png)",
        "",
        "## Quality (held-out perplexity)",
        "",
        _table(
            [
                ["original", q["ppl_original"]],
                ["plain removal", q["ppl_plain_removal"]],
                ["pruned", q["ppl_pruned"]],
            ],
            ["PyTorch model", "perplexity"],
        ),
        "",
        f"Fold parity: max |Δlogit| {prune['fold_parity']['max_abs_logit_diff']:.2e} "
        f"(tolerance {prune['fold_parity']['atol']:.2e}).",
        "",
        "![perplexity](plots/perplexity.png)",
        "",
    ]
    titles = {
        "onnx_parity": "onnxruntime vs PyTorch (pruned)",
        "gguf_parity": "llama.cpp vs PyTorch (pruned)",
        "onnx_bench": "onnxruntime: original vs pruned",
        "gguf_bench": "llama.cpp: original vs pruned",
    }
    for key, title in titles.items():
        if outputs.get(key) is None:
            continue
        rows = [[k, v] for k, v in _flat(outputs[key]) if not isinstance(v, list | dict)]
        lines += [f"## {title}", "", _table(rows, ["metric", "value"]), ""]
    if has_speed:
        lines += ["![speed](plots/speed.png)", ""]
    lines += [
        "## Time per stage",
        "",
        _table([[k, v] for k, v in report["timings_s"].items()], ["stage", "seconds"]),
    ]
    if report["reused_stages"]:
        lines += ["", "Reused from an earlier run: " + ", ".join(report["reused_stages"]) + "."]
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
    q = report["prune"]["quality"]
    console.print(
        f"perplexity: original {q['ppl_original']:.2f}, plain removal {q['ppl_plain_removal']:.2f}, "
        f"pruned {q['ppl_pruned']:.2f}"
    )
    status = "all checks passed" if report["all_checks_passed"] else "SOME CHECKS FAILED"
    console.print(f"{status}; report: {run_dir / 'report.md'}")
