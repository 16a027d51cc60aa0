"""report.json and report.md from the stage outputs. Computes nothing new: it only arranges."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from converters.imatrix import ImatrixUse
from rmexport.records import JsonObject, PruneRecord, Quality, SourceQuality, from_jsonable
from rmexport.sysinfo import MachineInfo

from .frontier_report import frontier_markdown, frontier_plots, frontier_summary
from .gguf_bench import GGUFBench
from .gguf_parity import SOURCE_KL_MULTIPLE, SOURCE_TOP1_MARGIN, GGUFParity
from .onnx_bench import OnnxBench
from .onnx_parity import OnnxParity
from .plots import plot_bars, plot_selection_profile, plot_speedups
from .speed import SpeedRun

__all__ = [
    "QualityCheck",
    "Report",
    "RuntimeMachine",
    "RuntimeRow",
    "SpeedCheck",
    "SpeedRow",
    "StageOutputs",
    "check_quality",
    "machines",
    "print_summary",
    "runtime_rows",
    "speed_check",
    "speed_rows",
    "write_report",
]

# The sections of prune.json that report.json carries, as prune.json has them.
_PRUNE_SECTIONS = ("quality", "fold_parity", "calibration", "evaluation", "solver", "selection", "guard")
ROLES = ("original", "pruned")


@dataclass(frozen=True)
class StageOutputs:
    """What the stages after the prune wrote to ``checks/``, as the report takes them (None: the stage
    did not run). ``to_json()`` is report.json's copy of them, under the same keys."""

    onnx_parity: OnnxParity | None = None
    onnx_bench: OnnxBench | None = None
    gguf_parity: dict[str, GGUFParity] | None = None  # GGUF type -> its parity
    gguf_imatrix: dict[str, ImatrixUse | None] | None = None  # "<role> <type>" -> its matrix, if any
    gguf_bench: dict[str, GGUFBench] | None = None  # GGUF type -> its benchmark
    frontier: JsonObject | None = None  # rmexport.frontier's stages' result, as they wrote it

    def to_json(self) -> JsonObject:
        out: JsonObject = {}
        if self.onnx_parity is not None:
            out["onnx_parity"] = self.onnx_parity.to_json()
        if self.onnx_bench is not None:
            out["onnx_bench"] = self.onnx_bench.to_json()
        if self.gguf_parity is not None:
            out["gguf_parity"] = {t: p.to_json() for t, p in self.gguf_parity.items()}
        if self.gguf_imatrix is not None:
            out["gguf_imatrix"] = {k: m and m.to_json() for k, m in self.gguf_imatrix.items()}
        if self.gguf_bench is not None:
            out["gguf_bench"] = {t: b.to_json() for t, b in self.gguf_bench.items()}
        if self.frontier is not None:
            out["frontier"] = self.frontier
        return out

    @classmethod
    def from_json(cls, data: JsonObject) -> StageOutputs:
        return from_jsonable(cls, data)


@dataclass(frozen=True)
class RuntimeRow:
    """One runtime × type × model: blocks, size, perplexity and median speeds."""

    runtime: str
    type: str
    model: str  # "original" or "pruned"
    blocks: int | None
    ppl: float | None
    prompt_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    size_mib: float | None


@dataclass(frozen=True)
class SpeedRow:
    """One runtime × type × phase: ideal, measured median speed-up and its spread, the verdicts."""

    runtime: str
    type: str
    phase: str
    kind: str
    original_tokens_per_s: float
    pruned_tokens_per_s: float
    ideal: float | None
    measured: float
    measured_min: float
    measured_max: float
    measured_q1: float
    measured_q3: float
    measured_over_ideal: float | None
    rounds: int
    settled: bool
    slower_than_original: bool
    consistently_slower: bool  # slower in at least three rounds of four: not noise around a speed-up
    above_ideal: bool

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.type} {self.phase}"


@dataclass(frozen=True)
class SpeedCheck:
    passed: bool
    slower_than_original: list[str]  # "<runtime> <type> <phase>"
    inconclusive: list[str]


@dataclass(frozen=True)
class QualityCheck:
    passed: bool
    pruned_worse_than_plain_removal: list[str]  # held-out sources


@dataclass(frozen=True)
class RuntimeMachine:
    """The machine a runtime's benchmark ran on; for llama.cpp, with its library's build."""

    machine: MachineInfo
    llama_cpp: dict[str, str | bool] | None = None  # llamacpp.library_info

    def to_json(self) -> JsonObject:
        extra = {} if self.llama_cpp is None else {"llama_cpp": self.llama_cpp}
        return self.machine.to_json() | extra


@dataclass(frozen=True)
class Report:
    """Everything report.json holds; ``to_json()`` writes it."""

    prune: PruneRecord
    outputs: StageOutputs
    quality_check: QualityCheck
    runtimes: list[RuntimeRow]
    speed: list[SpeedRow]
    speed_checks: SpeedCheck
    machines: dict[str, RuntimeMachine]  # "onnxruntime", "llama.cpp <type>"
    timings_s: dict[str, float]  # rounded to 0.01 s
    reused_stages: list[str]
    wall_s: float  # rounded to 0.1 s
    failed_checks: list[str]  # of "fold parity", "quality", "runtime parity", "speed"
    frontier: JsonObject | None  # the frontier's stages' result with its summary
    plots: dict[str, str]  # name -> path relative to the run folder

    @property
    def all_checks_passed(self) -> bool:
        return not self.failed_checks

    def to_json(self) -> JsonObject:
        prune = self.prune.to_json()
        data = {
            "model": prune["model"],
            "ratio": prune["ratio"],
            "L": prune["L"],
            "N": prune["N"],
            "cuts": [{"cut": c["cut"], "removed_layers": c["removed_layers"]} for c in prune["cuts"]],
            "prune": {key: prune[key] for key in _PRUNE_SECTIONS if key in prune},
            "quality_check": asdict(self.quality_check),
            "runtimes": [asdict(r) for r in self.runtimes],
            "speed": [asdict(r) for r in self.speed],
            "speed_checks": asdict(self.speed_checks),
            "machines": {name: m.to_json() for name, m in self.machines.items()},
            **self.outputs.to_json(),
            "timings_s": self.timings_s,
            "reused_stages": self.reused_stages,
            "wall_s": self.wall_s,
            "failed_checks": self.failed_checks,
            "all_checks_passed": self.all_checks_passed,
        }
        if self.frontier:
            data["frontier"] = self.frontier
        data["plots"] = self.plots
        return data


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


def parity_rows(outputs: StageOutputs) -> list[list[Any]]:
    """runtime, type, top-1 agreement, the source file's own, max |Δlogit|, mean KL, the source
    file's own, greedy decode match, passed (a lossy GGUF is judged against its source's error)."""
    rows = []
    onnx = outputs.onnx_parity
    if onnx:
        rows.append(
            [
                "onnxruntime",
                onnx.precision,
                onnx.top1_agreement,
                None,
                onnx.max_abs_diff,
                None,
                None,
                onnx.decode_match,
                onnx.passed,
            ]
        )
    for gguf_type, entry in (outputs.gguf_parity or {}).items():
        source = entry.source_error
        rows.append(
            [
                "llama.cpp",
                gguf_type,
                entry.top1_agreement,
                source and source.top1_agreement,
                entry.max_abs_diff,
                entry.mean_kl,
                source and source.mean_kl,
                entry.decode_match,
                entry.passed,
            ]
        )
    return rows


def _imatrix_lines(matrices: dict[str, ImatrixUse | None], prune: PruneRecord) -> list[str]:
    """Which GGUF file was quantized with an importance matrix, from what text, over how many chunks."""
    if not matrices:
        return []
    text = prune.calibration["source"]
    used = [
        f"{name} with `{m.file}` ({m.chunks} chunks of the prune's calibration text `{text}`)"
        for name, m in matrices.items()
        if m
    ]
    plain = ", ".join(name for name, m in matrices.items() if not m)
    if not used:
        return [f"No GGUF file above was quantized with an importance matrix ({plain}).", ""]
    words = "Quantized with an importance matrix (llama-imatrix): " + "; ".join(used)
    return [words + (f"; without one: {plain}." if plain else "."), ""]


def _source_rule() -> str:
    return (
        "\"Source file's own\": the original model's GGUF of the same type against the original in "
        "PyTorch, on the same prompts (for a GGUF source, the source file itself). A lossy GGUF passes "
        f"when its mean KL is at most {SOURCE_KL_MULTIPLE:g}× that and its top-1 agreement at most "
        f"{SOURCE_TOP1_MARGIN:g} below it (or, where the source disagrees more often than that, at most "
        "twice as often as the source)."
    )


@dataclass(frozen=True)
class _Figures:
    """What the runtime table shows of one model in one runtime."""

    blocks: int | None
    ppl: float | None
    size_bytes: int | None


def _bench_entries(outputs: StageOutputs) -> list[tuple[str, str, dict[str, _Figures], SpeedRun]]:
    """(runtime, type, models by role, speed result) for every benchmarked runtime and type."""
    entries = []
    onnx = outputs.onnx_bench
    if onnx:
        models = {role: _Figures(m.num_hidden_layers, m.ppl, m.size_bytes) for role, m in onnx.models.items()}
        entries.append(("onnxruntime", "fp32", models, onnx.speed))
    for gguf_type, result in (outputs.gguf_bench or {}).items():
        entry = result.types[gguf_type]
        models = {
            role: _Figures(m.block_count, m.ppl, m.size_bytes)
            for role, m in (("original", entry.original), ("pruned", entry.pruned))
        }
        entries.append(("llama.cpp", gguf_type, models, entry.speed))
    return entries


def _phase_median(speed: SpeedRun, role: str, kind: str) -> float | None:
    """Median tokens/s of ``role`` in the longest phase of ``kind`` (prompt or generation)."""
    phases = [e for e in speed.phases.values() if e.kind == kind]
    if not phases:
        return None
    longest = max(phases, key=lambda e: e.tokens)
    return getattr(longest, role).tokens_per_s.median


def runtime_rows(outputs: StageOutputs) -> list[RuntimeRow]:
    """One row per runtime × type × model: blocks, size, perplexity and median speeds."""
    rows = []
    for runtime, kind, models, speed in _bench_entries(outputs):
        for role in ROLES:
            m = models.get(role) or _Figures(None, None, None)
            rows.append(
                RuntimeRow(
                    runtime=runtime,
                    type=kind,
                    model=role,
                    blocks=m.blocks,
                    ppl=m.ppl,
                    prompt_tokens_per_s=_phase_median(speed, role, "prompt"),
                    decode_tokens_per_s=_phase_median(speed, role, "generation"),
                    size_mib=m.size_bytes / 2**20 if m.size_bytes else None,
                )
            )
    return rows


def speed_rows(outputs: StageOutputs) -> list[SpeedRow]:
    """One row per runtime × type × phase: ideal, measured median speed-up, measured/ideal, spread."""
    rows = []
    for runtime, kind, _models, speed in _bench_entries(outputs):
        for phase, e in speed.phases.items():
            s = e.speedup
            rows.append(
                SpeedRow(
                    runtime=runtime,
                    type=kind,
                    phase=phase,
                    kind=e.kind,
                    original_tokens_per_s=e.original.tokens_per_s.median,
                    pruned_tokens_per_s=e.pruned.tokens_per_s.median,
                    ideal=e.ideal,
                    measured=s.median,
                    measured_min=s.min,
                    measured_max=s.max,
                    measured_q1=s.q1,
                    measured_q3=s.q3,
                    measured_over_ideal=e.measured_over_ideal,
                    rounds=e.rounds,
                    settled=e.settled,
                    slower_than_original=s.median < 1.0,
                    consistently_slower=s.q3 < 1.0,
                    above_ideal=bool(e.ideal) and s.median > e.ideal,
                )
            )
    return rows


def speed_check(rows: list[SpeedRow]) -> SpeedCheck:
    """Failed when any phase of any runtime has the pruned model consistently slower than its
    original (upper quartile of the round-by-round speed-ups below 1). A median below 1 whose spread
    reaches above 1 is flagged as inconclusive: the machine was too noisy to tell."""
    slower = [r.name for r in rows if r.consistently_slower]
    noisy = [r.name for r in rows if r.slower_than_original and not r.consistently_slower]
    return SpeedCheck(passed=not slower, slower_than_original=slower, inconclusive=noisy)


def machines(outputs: StageOutputs) -> dict[str, RuntimeMachine]:
    """The machine record of each runtime's benchmark."""
    out = {}
    if outputs.onnx_bench:
        out["onnxruntime"] = RuntimeMachine(outputs.onnx_bench.machine)
    for gguf_type, result in (outputs.gguf_bench or {}).items():
        out[f"llama.cpp {gguf_type}"] = RuntimeMachine(result.machine, result.library)
    return out


def _quality_ratios(rows: list[RuntimeRow]) -> list[list[Any]]:
    keyed = {(r.runtime, r.type, r.model): r for r in rows}
    out = []
    for (runtime, kind, model), pruned in keyed.items():
        original = keyed.get((runtime, kind, "original"))
        if model != "pruned" or original is None:
            continue

        def ratio(key: str, original=original, pruned=pruned) -> float | None:
            a, b = getattr(original, key), getattr(pruned, key)
            return b / a if a and b else None

        out.append([runtime, kind, ratio("size_mib"), ratio("ppl")])
    return out


def _sources(prune: PruneRecord) -> list[tuple[str, Quality | SourceQuality]]:
    """(source, perplexities) for the evaluation text, then each out-of-domain source."""
    q = prune.quality
    return [(prune.evaluation.source, q), *((s.source, s) for s in q.out_of_domain)]


def check_quality(prune: PruneRecord) -> QualityCheck:
    """A pruned model worse than plain removal of the same blocks on any held-out source fails."""
    worse = [source for source, q in _sources(prune) if q.ppl_pruned > q.ppl_plain_removal]
    return QualityCheck(passed=not worse, pruned_worse_than_plain_removal=worse)


def _parity_passed(outputs: StageOutputs) -> bool:
    onnx = outputs.onnx_parity is None or outputs.onnx_parity.passed
    return onnx and all(p.passed for p in (outputs.gguf_parity or {}).values())


def _plots(
    run_dir: Path,
    prune: PruneRecord,
    rows: list[RuntimeRow],
    speed: list[SpeedRow],
    frontier: JsonObject | None,
) -> dict[str, str]:
    """Write every plot; returns name -> path relative to ``run_dir`` of each file written."""
    plots = run_dir / "plots"
    written = {"selection": plot_selection_profile(prune, plots / "selection.png")}
    quality = prune.quality
    ppl_groups = {
        "PyTorch": {
            "original": quality.ppl_original,
            "plain removal": quality.ppl_plain_removal,
            "pruned": quality.ppl_pruned,
        }
    }
    for row in rows:
        if row.ppl is not None:
            ppl_groups.setdefault(f"{row.runtime} {row.type}", {})[row.model] = row.ppl
    written["perplexity"] = plot_bars(
        "Held-out perplexity (lower is better)", "perplexity", ppl_groups, plots / "perplexity.png"
    )
    if speed:
        written["speed"] = plot_speedups(
            [
                {
                    "label": r.name,
                    "median": r.measured,
                    "min": r.measured_min,
                    "max": r.measured_max,
                    "ideal": r.ideal,
                }
                for r in speed
            ],
            plots / "speed.png",
        )
    if frontier:
        written |= frontier_plots(frontier, plots)
    return {name: path.relative_to(run_dir).as_posix() for name, path in written.items() if path.is_file()}


def write_report(
    run_dir: Path,
    prune: PruneRecord,
    outputs: StageOutputs,
    timings: dict[str, float],
    reused: list[str],
    wall_s: float,
) -> Report:
    rows = runtime_rows(outputs)
    speed = speed_rows(outputs)
    speed_checks = speed_check(speed)
    quality = check_quality(prune)
    frontier = outputs.frontier and outputs.frontier | frontier_summary(outputs.frontier)
    report = Report(
        prune=prune,
        outputs=outputs,
        quality_check=quality,
        runtimes=rows,
        speed=speed,
        speed_checks=speed_checks,
        machines=machines(outputs),
        timings_s={k: round(v, 2) for k, v in timings.items()},
        reused_stages=reused,
        wall_s=round(wall_s, 1),
        failed_checks=[
            name
            for name, passed in (
                ("fold parity", prune.fold_parity.passed),
                ("quality", quality.passed),
                ("runtime parity", _parity_passed(outputs)),
                ("speed", speed_checks.passed),
            )
            if not passed
        ],
        frontier=frontier or None,
        plots=_plots(run_dir, prune, rows, speed, frontier or None),
    )
    _write(run_dir / "report.json", json.dumps(report.to_json(), indent=2, default=str) + "\n")
    _write(run_dir / "report.md", _markdown(report))
    return report


def _image(images: dict[str, str], name: str, alt: str) -> list[str]:
    """A Markdown image link, only for a plot that was written."""
    return [f"![{alt}]({images[name]})", ""] if name in images else []


def _x(value: float | None) -> str:
    return "–" if value is None else f"×{value:.2f}"


def _speed_section(report: Report) -> list[str]:
    speed = report.speed
    if not speed:
        return []
    table = []
    for r in speed:
        flag = (
            "**slower than original**"
            if r.consistently_slower
            else "median below 1, spread above: inconclusive"
            if r.slower_than_original
            else ("above ideal" if r.above_ideal else "")
        )
        table.append(
            [
                r.runtime,
                r.type,
                r.phase,
                r.original_tokens_per_s,
                r.pruned_tokens_per_s,
                _x(r.ideal),
                _x(r.measured),
                "–" if r.measured_over_ideal is None else f"{r.measured_over_ideal:.0%}",
                f"{_x(r.measured_min)}–{_x(r.measured_max)} (IQR {_x(r.measured_q1)}–{_x(r.measured_q3)})",
                f"{r.rounds}{'' if r.settled else ' (not precise)'}",
                flag,
            ]
        )
    L, N = report.prune.L, report.prune.N
    lines = [
        "## Speed",
        "",
        "Measured like llama-bench: pp*N* processes an *N*-token prompt from an empty cache, tg*N* "
        "generates *N* tokens one at a time from an empty cache. Both models are loaded once, with the "
        "same threads, context and batch; after a warm-up, original and pruned take turns in A B B A "
        "order: a prompt round is original, pruned, pruned, original, and generation goes in turns of an "
        "eighth of the tokens, the lead swapping every turn, so that a drifting machine, and the other "
        "model's threads still spinning, slow both alike. "
        "Each round's speed-up is original time over pruned time; a phase is timed again until the "
        "estimated standard error of the median speed-up is small (or the maximum of rounds); the table "
        "gives the median and the spread over rounds.",
        "",
        "The ideal is the ratio of the FLOPs each phase really computes, from the config: the blocks "
        "(projections, MLP, attention over the context the phase has), plus the LM head for every "
        "generated token, and for prompts once (llama.cpp: last position only) or for every position "
        "(an ONNX graph that returns all logits). The embedding is a lookup. So generation's ideal is "
        f"below L/N = {L}/{N} = {L / N:.2f}, prompt processing's close to it.",
        "",
        _table(
            [
                "runtime",
                "type",
                "phase",
                "original tok/s",
                "pruned tok/s",
                "ideal",
                "measured (median)",
                "measured / ideal",
                "spread (min–max)",
                "rounds",
                "flag",
            ],
            table,
        ),
        "",
    ]
    slower = report.speed_checks.slower_than_original
    if slower:
        lines += [f"**The pruned model was measured slower than its original in: {', '.join(slower)}.**", ""]
    noisy = report.speed_checks.inconclusive
    if noisy:
        lines += [
            f"Inconclusive (median speed-up below 1, but above 1 in more than a quarter of the rounds): "
            f"{', '.join(noisy)}. Measure again on a quiet machine.",
            "",
        ]
    for name, runtime in report.machines.items():
        m = runtime.machine
        versions = ", ".join(f"{k} {v}" for k, v in m.versions.items() if v)
        lines.append(
            f"- {name}: {m.cpu}, {m.usable_cores} usable cores "
            f"({m.physical_cores} physical), {m.threads} threads, "
            f"flags {' '.join(m.cpu_flags) or 'none found'}; {versions}"
            + ("" if (runtime.llama_cpp or {}).get("extra_buffer_types", True) else _NO_EXTRA_BUFFERS)
        )
    return [*lines, ""]


_NO_EXTRA_BUFFERS = (
    "; llama.cpp's AMX and repacked weight buffers left out (its AMX kernels crash here; see the README)"
)


def _stage_name(stage: str) -> str:
    """A stage of the prune the guard judged, as the report names it."""
    if stage in ("plain_removal", "original"):
        return stage.replace("_", " ")
    if stage == "fitted":
        return "the cut's map"
    return f"+ {stage}"  # "repair K": the map and K blocks after the cut repaired


def _strength(ridge: float | None) -> str:
    return "∞ (unchanged)" if ridge is None else f"{ridge:g}"


def _repair_lines(prune: PruneRecord) -> list[str]:
    repair = prune.repair
    if repair is None:
        return []
    if not repair.blocks:
        return [f"No repair after the cut: {repair.note}.", ""] if repair.note else []
    refits = "; ".join(
        f"block {b.block}: "
        + ", ".join(
            f"`{r.tensor}` ridge {_strength(r.ridge)}, set-aside error "
            f"{r.set_aside_rel_residual_unrepaired:.5f} → {r.set_aside_rel_residual:.5f}"
            for r in (b.attention, b)
            if r is not None
        )
        for b in repair.blocks
    )
    return [
        f"Repair after the cut ({repair.seconds:.0f} s), each block's attention output projection refitted "
        "toward the original stream after its attention, then its `down_proj` toward the original stream "
        f"after the block: {refits}. Kept: {repair.kept_blocks} of {len(repair.blocks)} (the quality "
        "guard's choice).",
        "",
    ]


def _stage_table(
    title: str, by_source: dict[str, dict[str, float]], mean: dict[str, float], digits: str
) -> list[str]:
    """One row per source and the mean, one column per stage: the original (where measured) and
    plain removal first."""
    first = [s for s in ("original", "plain_removal") if s in mean]
    stages = [*first, *(s for s in mean if s not in first)]
    return [
        f"| {title} | " + " | ".join(_stage_name(s) for s in stages) + " |",
        "|---" * (len(stages) + 1) + "|",
        *(
            f"| `{source}` | " + " | ".join(format(row[s], digits) for s in stages) + " |"
            for source, row in by_source.items()
        ),
        "| mean | " + " | ".join(format(mean[s], digits) for s in stages) + " |",
        "",
    ]


def _guard_lines(prune: PruneRecord) -> list[str]:
    lines = _repair_lines(prune)
    guard = prune.guard
    if guard.judged_on and guard.mean_kl:
        lines += [
            f"Quality guard, on {guard.judged_on}: kept **{_stage_name(guard.kept)}**, the closest to the "
            "original model (mean KL divergence of the next-token distributions) of the stages closer than "
            "plain removal on every source. Their losses beside it, the original's first.",
            "",
            *_stage_table("set-aside KL from the original", guard.kl_by_source, guard.mean_kl, ".5f"),
            *_stage_table("set-aside loss", guard.by_source, guard.selection_loss, ".4f"),
        ]
    elif guard.judged_on:  # a prune.json from before the guard judged on KL
        lines += [
            f"Quality guard, on {guard.judged_on}: kept **{_stage_name(guard.kept)}**, the lowest mean "
            "loss of the stages no worse than plain removal on every source.",
            "",
            *_stage_table("set-aside loss", guard.by_source, guard.selection_loss, ".4f"),
        ]
    worse = check_quality(prune).pruned_worse_than_plain_removal
    if worse:
        sources = ", ".join(f"`{s}`" for s in worse)
        lines += [f"**The pruned model is worse than plain removal of the same blocks on {sources}.**", ""]
    return lines


def _map_words(fit: JsonObject) -> str:
    if fit.get("map") == "hidden":
        return (
            "map of the MLP's hidden activations (down_proj refitted), ridge toward T "
            f"{fit['ridge_toward_T']:g} chosen on {fit['set_aside_tokens']} set-aside tokens"
        )
    note = f" ({fit['map_note']})" if fit.get("map_note") else ""
    return f"map T of the MLP's output{note}"


def _quality_table(prune: PruneRecord) -> str:
    sources = _sources(prune)
    header = ["model (PyTorch)"] + [
        f"`{source}` ({q.tokens if isinstance(q, SourceQuality) else prune.evaluation.tokens} tokens)"
        for source, q in sources
    ]
    rows = [
        [label] + [getattr(q, key) for _, q in sources]
        for label, key in (
            ("original", "ppl_original"),
            ("plain removal of the same blocks", "ppl_plain_removal"),
            (f"pruned ({prune.kept_words})", "ppl_pruned"),
        )
    ]
    rows.append(
        ["pruned vs plain removal"] + [f"{q.ppl_pruned / q.ppl_plain_removal - 1:+.1%}" for _, q in sources]
    )
    return _table(header, rows)


def _compute_lines(prune: PruneRecord) -> list[str]:
    compute = prune.compute
    if not compute:
        return []
    return [
        f"- forwards in {compute['dtype']} on {compute['device']} ({compute['dtype_reason']}); "
        "statistics and solves in float64"
    ]


def _markdown(report: Report) -> str:
    prune, outputs, images = report.prune, report.outputs, report.plots
    lines = [
        f"# {prune.model.spec}: {prune.L} → {prune.N} blocks",
        "",
        f"All checks passed: **{_fmt(report.all_checks_passed)}**. Wall time {report.wall_s:.0f} s.",
        "",
        "## What was cut, and why",
        "",
    ]
    for cut in prune.cuts:
        fit = cut.fit
        removed = cut.removed_layers
        lines.append(
            f"- blocks {removed[0]}–{removed[-1]} (cut [{cut.cut[0]}, {cut.cut[1]})), "
            f"rule `{prune.selection['rule']}`, "
            f"solver `{fit['solver']}`, {_map_words(fit)}: error left after the map "
            f"{fit['rel_residual']:.4f} of the stream's energy, against "
            f"{fit['rel_residual_plain_removal']:.4f} for plain removal"
        )
    cal = prune.calibration
    evaluation = prune.evaluation
    lines += [
        f"- calibration: {cal['documents']} documents of `{cal['source']}` packed={cal['packed']}, "
        f"{cal['tokens']} tokens (sha256 {cal['sha256']})",
        *_compute_lines(prune),
        "",
        *_image(images, "selection", "selection profile"),
        "## Quality",
        "",
        f"Held-out perplexity over {evaluation.tokens} tokens of "
        f"`{evaluation.source}` ({evaluation.window}-token windows), "
        "the same windows in every runtime; beside it, held-out text of other kinds "
        "(PyTorch only).",
        "",
        _quality_table(prune),
        "",
        f"Fold parity (folded weights vs the map applied explicitly): max |Δlogit| "
        f"{prune.fold_parity.max_abs_logit_diff:.2e}, tolerance {prune.fold_parity.atol:.2e}.",
        "",
        *_guard_lines(prune),
        *_image(images, "perplexity", "perplexity"),
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
                    "source file's own",
                    "max abs logit diff",
                    "mean KL",
                    "source file's own",
                    "greedy decode match",
                    "passed",
                ],
                parity,
            ),
            "",
            _source_rule(),
            "",
            *_imatrix_lines(outputs.gguf_imatrix or {}, prune),
        ]
    rows = report.runtimes
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
                    "prompt tok/s (median)",
                    "decode tok/s (median)",
                ],
                [
                    [
                        r.runtime,
                        r.type,
                        r.model,
                        r.blocks,
                        r.size_mib,
                        r.ppl,
                        r.prompt_tokens_per_s,
                        r.decode_tokens_per_s,
                    ]
                    for r in rows
                ],
            ),
            "",
            _table(["runtime", "type", "size ratio", "perplexity ratio"], _quality_ratios(rows)),
            "",
        ]
    lines += _speed_section(report)
    lines += _image(images, "speed", "speed")
    if report.frontier:
        lines += frontier_markdown(report.frontier, images)
    lines += [
        "## Time per stage",
        "",
        _table(["stage", "seconds"], [[k, v] for k, v in report.timings_s.items()]),
    ]
    if report.reused_stages:
        lines += ["", "Reused from an earlier run: " + ", ".join(report.reused_stages) + "."]
    lines += [
        "",
        "Every number above is in `report.json`; the raw results are in `prune.json` and `checks/`.",
    ]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def print_summary(report: JsonObject, run_dir: Path) -> None:
    """The run's summary on the console, from ``Report.to_json()`` (report.json as written)."""
    console = Console()
    rows = [RuntimeRow(**r) for r in report["runtimes"]]
    speed = [SpeedRow(**r) for r in report["speed"]]
    reused = report["reused_stages"]
    table = Table(title=f"{report['model']['spec']}: {report['L']} → {report['N']} blocks")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in report["timings_s"].items():
        table.add_row(stage + (" (reused)" if stage in reused else ""), f"{seconds:.1f}")
    console.print(table)
    results = Table(title="original → pruned")
    for column in ("runtime", "perplexity", "prompt tok/s", "decode tok/s"):
        results.add_column(column)
    q = from_jsonable(Quality, report["prune"]["quality"])
    results.add_row(
        "PyTorch",
        f"{q.ppl_original:.2f} → {q.ppl_pruned:.2f} (plain removal {q.ppl_plain_removal:.2f})",
        "",
        "",
    )
    for ood in q.out_of_domain:
        results.add_row(
            f"PyTorch, {ood.source}",
            f"{ood.ppl_original:.2f} → {ood.ppl_pruned:.2f} (plain removal {ood.ppl_plain_removal:.2f})",
            "",
            "",
        )
    keyed = {(r.runtime, r.type, r.model): r for r in rows}
    for (runtime, kind, model), row in keyed.items():
        if model != "original" or (runtime, kind, "pruned") not in keyed:
            continue
        pruned = keyed[(runtime, kind, "pruned")]

        def pair(key: str, fmt: str = "{:.1f}", row=row, pruned=pruned) -> str:
            a, b = getattr(row, key), getattr(pruned, key)
            return f"{fmt.format(a)} → {fmt.format(b)}" if a and b else ""

        results.add_row(
            f"{runtime} {kind}",
            pair("ppl", "{:.2f}"),
            pair("prompt_tokens_per_s"),
            pair("decode_tokens_per_s"),
        )
    console.print(results)
    if speed:
        table = Table(title="speed-up of the pruned model (median of alternating rounds)")
        for column in ("runtime", "phase", "measured [min–max]", "ideal", "measured/ideal", "rounds"):
            table.add_column(column)
        for r in speed:
            flag = " SLOWER" if r.slower_than_original else ""
            table.add_row(
                f"{r.runtime} {r.type}",
                r.phase,
                f"{_x(r.measured)} [{_x(r.measured_min)}–{_x(r.measured_max)}]{flag}",
                _x(r.ideal),
                "" if r.measured_over_ideal is None else f"{r.measured_over_ideal:.0%}",
                str(r.rounds),
            )
        console.print(table)
    status = "all checks passed" if report["all_checks_passed"] else "SOME CHECKS FAILED"
    console.print(f"{status}; report: {run_dir / 'report.md'}")
