"""The frontier's part of the report: its table, its two plots and its sentence, from the stages' JSON.

``frontier`` is what ``rmexport.frontier.frontier_stages`` returns (``FrontierRecord`` as JSON): each
model's measured points, the speed per type, and the settings they were measured with. Nothing is
measured here.
"""

from __future__ import annotations

from pathlib import Path

from rmexport.records import JsonObject

from .frontier import FrontierPoint, FrontierRow, headline, pareto
from .plots import plot_frontier

__all__ = ["frontier_markdown", "frontier_plots", "frontier_summary"]

ROLES = ("original", "pruned")


def _phase(speed: JsonObject, kind: str) -> JsonObject:
    """The longest phase of ``kind`` (prompt or generation) in a speed result, or {}."""
    phases = [e for e in (speed.get("phases") or {}).values() if e.get("kind") == kind]
    return max(phases, key=lambda e: e["tokens"]) if phases else {}


def _rows(frontier: JsonObject) -> list[FrontierRow]:
    speeds = frontier.get("speed") or {}
    rows = []
    for role in ROLES:
        for data in (frontier.get(role) or {}).get("points", []):
            point = FrontierPoint.from_json(data)
            speed = {} if point.extra else speeds.get(point.type) or {}  # extras are not timed
            prompt, generation = _phase(speed, "prompt"), _phase(speed, "generation")
            rows.append(
                FrontierRow(
                    model=role,
                    type=point.type,
                    blocks=point.block_count,
                    size_mib=point.size_bytes / 2**20,
                    ppl=point.ppl,
                    ppl_by_source={s: v.ppl for s, v in point.sources.items()},
                    kl=point.kl,
                    pp_tokens_per_s=(prompt.get(role) or {}).get("tokens_per_s", {}).get("median"),
                    tg_tokens_per_s=(generation.get(role) or {}).get("tokens_per_s", {}).get("median"),
                    tg_speedup=generation.get("speedup", {}).get("median") if role == "pruned" else None,
                    speed_rounds=speed.get("rounds"),
                    imatrix=point.imatrix,
                    extra=point.extra,
                )
            )
    return rows


def frontier_summary(frontier: JsonObject) -> JsonObject:
    """The table's rows (``FrontierRow`` as JSON), each with whether it is on the Pareto frontier by size
    and by tg128 speed, and the sentence."""
    rows = _rows(frontier)
    ladder = [r for r in rows if not r.extra]  # a benchmark's extra files stay off the frontier
    timed = [r for r in ladder if r.tg_tokens_per_s]
    on_size = pareto([(r.size_mib, r.ppl) for r in ladder], higher_x_is_better=False)
    on_speed = pareto([(r.tg_tokens_per_s or 0.0, r.ppl) for r in timed], higher_x_is_better=True)
    for row, on in zip(ladder, on_size, strict=True):
        row.pareto_size = on
    for row, on in zip(timed, on_speed, strict=True):
        row.pareto_speed = on
    return {"table": [r.to_json() for r in rows], "headline": headline(ladder)}


def frontier_plots(summary: JsonObject, plots: Path) -> dict[str, Path]:
    rows = summary["table"]
    if not rows:
        return {}
    written = {
        "frontier_size": plot_frontier(
            rows, "size_mib", "GGUF file size (MiB)", "pareto_size", plots / "frontier_size.png"
        )
    }
    if any(r["tg_tokens_per_s"] for r in rows):
        written["frontier_speed"] = plot_frontier(
            rows, "tg_tokens_per_s", "tg128 speed (tokens/s)", "pareto_speed", plots / "frontier_speed.png"
        )
    return written


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _count(n: int | None, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _matrix_words(frontier: JsonObject) -> str:
    matrices = [m for m in ((frontier.get(r) or {}).get("imatrix") for r in ROLES) if m]
    if not matrices:
        return "No type of the ladder uses an importance matrix by default."
    m = matrices[0]
    text = m.get("text") or {}
    verb = "is" if len(m["types"]) == 1 else "are"
    return (
        f"{', '.join(t.upper() for t in m['types'])} {verb} quantized with an importance matrix, one per "
        f"model, made by llama-imatrix from {m['chunks']} chunks of {m['chunk_tokens']} tokens of the "
        f"prune's calibration text (`{text.get('source')}`, at most {text.get('chunks')} of its sequences, "
        "evenly spread); the others without."
    )


def frontier_markdown(frontier: JsonObject, images: dict[str, str]) -> list[str]:
    """The report's section: what was measured and how, the sentence, the table, the plots.
    ``frontier``: the stages' result with ``frontier_summary``'s keys added."""
    rows = [FrontierRow.from_json(r) for r in frontier["table"]]
    if not rows:
        return []
    sources = list(rows[0].ppl_by_source)
    rounds = frontier.get("speed_rounds") or {}
    own = frontier["own_type"]
    reused = (frontier.get("speed") or {}).get(own, {}).get("reused_from")
    warmup = (
        f"each file first run once untimed, {_count(rounds['warmup'], 'warm-up turn')} and "
        if rounds.get("warmup")
        else "each file first run once untimed, read into the page cache and loaded; then "
    )
    timing = f"{warmup}{_count(rounds.get('rounds'), 'round')} per phase, fewer than the comparison above" + (
        f"; the source's own type, {own.upper()}, is that comparison's" if reused else ""
    )
    lines = [
        "## Prune, or quantize harder? The llama.cpp frontier",
        "",
        f"Each type of a ladder, for the original and the pruned model: file size; perplexity over the "
        f"first {frontier['tokens_per_source']} held-out tokens of each source, after BOS (the same tokens "
        "for every file; *all* pools them); mean KL divergence of the next-token distribution from the "
        "original's float model (its f32 GGUF, f32 KV cache) over the same positions; pp512 and tg128 "
        "tokens/s, the pruned file A B B A against the original's file of the same type "
        f"({timing}). {_matrix_words(frontier)} "
        "◆: on the Pareto frontier (no other file is both smaller, or faster, and lower in perplexity).",
        "",
    ]
    if frontier["headline"]:
        lines += [f"**{frontier['headline']}**", ""]
    header = (
        ["model", "type", "blocks", "MiB", "perplexity, all"]
        + [f"`{s}`" for s in sources]
        + [
            "KL",
            "pp512 tok/s",
            "tg128 tok/s",
            "tg128 speed-up",
            "imatrix",
            "frontier: size",
            "frontier: speed",
        ]
    )
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r.model, -r.size_mib)):
        cells = [
            r.model,
            r.type.upper(),
            str(r.blocks),
            _number(r.size_mib, 1),
            _number(r.ppl, 2),
            *(_number(r.ppl_by_source[s], 2) for s in sources),
            _number(r.kl, 4),
            _number(r.pp_tokens_per_s, 0),
            _number(r.tg_tokens_per_s, 1),
            "–" if r.tg_speedup is None else f"×{r.tg_speedup:.2f}",
            "yes" if r.imatrix else "no",
            "◆" if r.pareto_size else "",
            "◆" if r.pareto_speed else "",
        ]
        table.append("| " + " | ".join(cells) + " |")
    lines += [*table, ""]
    for name, alt in (
        ("frontier_size", "perplexity against file size"),
        ("frontier_speed", "perplexity against speed"),
    ):
        if name in images:
            lines += [f"![{alt}]({images[name]})", ""]
    return lines
