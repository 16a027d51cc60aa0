"""Plots for the report: the cut-selection profile, and original-vs-pruned bars per runtime.

Each function writes its PNG whole (into a temporary sibling, then renamed) and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rmexport.records import PruneRecord

__all__ = ["plot_bars", "plot_frontier", "plot_selection_profile", "plot_speedups"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def plot_selection_profile(prune_record: PruneRecord, path: Path) -> Path:
    """Per candidate start: angular distance and fit errors, with the chosen cut shaded."""
    plt = _pyplot()
    cuts = prune_record.cuts
    fig, axes = plt.subplots(len(cuts), 1, figsize=(8, 3.2 * len(cuts)), squeeze=False)
    for ax, cut in zip(axes[:, 0], cuts, strict=True):
        scores = cut.scores
        starts = [int(s) for s in scores["candidates"]]
        ax.plot(
            starts,
            [scores["distance_last"][str(s)] for s in starts],
            "o-",
            label="angular distance (last token)",
        )
        ax.plot(
            starts,
            [scores["distance_all"][str(s)] for s in starts],
            "o-",
            label="angular distance (all tokens)",
        )
        fit = scores.get("fit_rel_residual") or {}
        removal = scores.get("removal_rel_residual") or {}
        if fit:
            xs = sorted(int(s) for s in fit)
            ax.plot(xs, [fit[str(s)] for s in xs], "s-", label="error after fitted map")
            ax.plot(xs, [removal[str(s)] for s in xs], "s--", label="error of plain removal")
        start, end = cut.cut
        ax.axvspan(start - 0.4, start + 0.4, color="tab:red", alpha=0.2, label=f"chosen cut [{start}, {end})")
        ax.set_xlabel("first removed block (candidate start)")
        ax.set_ylabel("score (lower is better)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0, 0].set_title(
        f"{prune_record.model.spec}: where to cut {prune_record.n} of {prune_record.L} blocks"
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(title: str, ylabel: str, groups: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: ``groups[group][series] = value`` (e.g. runtime -> original/pruned -> PPL)."""
    plt = _pyplot()
    series = sorted({s for values in groups.values() for s in values})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(len(series), 1)
    for k, name in enumerate(series):
        xs = [i + k * width for i in range(len(groups))]
        values = [groups[g].get(name, float("nan")) for g in groups]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_speedups(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Measured speed-up per runtime, type and phase (median, min–max bar), each against its ideal.

    ``rows``: ``label``, ``median``, ``min``, ``max``, ``ideal`` (None when unknown).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    xs = range(len(rows))
    medians = [r["median"] for r in rows]
    errors = [[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]]
    colors = ["tab:red" if m < 1 else "tab:orange" for m in medians]
    bars = ax.bar(xs, medians, color=colors, yerr=errors, capsize=4, label="measured (median, min–max)")
    ax.bar_label(bars, labels=[f"×{m:.2f}" for m in medians], fontsize=8, label_type="center")
    ideal_x = [x for x, r in zip(xs, rows, strict=True) if r.get("ideal")]
    ax.scatter(
        ideal_x,
        [r["ideal"] for r in rows if r.get("ideal")],
        marker="_",
        s=900,
        linewidths=2.5,
        color="tab:green",
        zorder=3,
        label="ideal (FLOPs of the phase)",
    )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("pruned / original speed")
    ax.set_title("Speed-up of the pruned model (higher is better)")
    top = max([r["max"] for r in rows] + [r["ideal"] or 0 for r in rows] + [1.0])
    ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def plot_frontier(
    rows: Sequence[Mapping[str, Any]], x_key: str, xlabel: str, pareto_key: str, path: Path
) -> Path:
    """Perplexity against ``x_key`` per ladder type, the original's and the pruned model's points joined
    as two lines, each point labelled with its type, the points on the Pareto frontier (``pareto_key``
    true) circled. ``rows``: ``model``, ``type``, ``ppl``, ``x_key``, ``pareto_key``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for model, color in (("original", "tab:blue"), ("pruned", "tab:orange")):
        points = sorted((r for r in rows if r["model"] == model and r.get(x_key)), key=lambda r: r[x_key])
        ax.plot([r[x_key] for r in points], [r["ppl"] for r in points], "o-", color=color, label=model)
        for r in points:
            ax.annotate(
                r["type"].upper(), (r[x_key], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    best = [r for r in rows if r.get(pareto_key) and r.get(x_key)]
    ax.scatter(
        [r[x_key] for r in best],
        [r["ppl"] for r in best],
        s=160,
        facecolors="none",
        edgecolors="black",
        linewidths=1.2,
        zorder=3,
        label="Pareto frontier",
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out perplexity, all sources")
    ax.set_title(f"Perplexity (lower is better) against {xlabel}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
