"""``rmexport prune``: calibrate, choose the cut, fit T, fold, remove blocks, check, save.

Writes ``OUT/hf/`` (an ordinary checkpoint with fewer blocks) and ``OUT/prune.json`` (what was
cut and why, the fit, the checks, timings, versions). Both appear only when complete.
"""

from __future__ import annotations

import platform
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .arch import adapter_for
from .atomic import write_json
from .calib.budget import MemoryBudget
from .calib.corpus import BUILTIN, DEFAULT_CALIBRATION, OUT_OF_DOMAIN, load_corpus, parse_mixture
from .calib.engine import Engine, Map, Plan, cut_plan, original_plan
from .calib.tokens import CalibrationSet, heldout_windows, mixture_batches, shares
from .calib.weights import checkpoint_dtype
from .compute import AUTO, Compute, resolve_compute
from .errors import ConfigError, ModelLoadError, ToleranceError
from .hooks import signal_point
from .llamacpp import installed_version
from .log import get_logger
from .models import (
    ModelSource,
    cache_dir,
    load_config,
    load_tokenizer,
    metadata_dir,
    read_provenance,
    tokenizer_parity_record,
)
from .records import CutRecord, Evaluation, FoldParity, ModelInfo, PruneRecord, Quality, SourceQuality
from .replaceme.checks import plain_removal, run_checks, source_perplexities
from .replaceme.original_perplexity import OriginalPerplexities
from .replaceme.save import MAPS_FILE, save_maps, save_pruned_checkpoint
from .replaceme.select import MAP_SPACES, SELECTION_RULES, choose_start, cut_size, split_cut
from .replaceme.solve import CosineSettings, FitResult
from .replaceme.survey import CandidateSurvey, SelectionScorer, fit_cut, survey_candidates

__all__ = [
    "PruneOptions",
    "calibration_set",
    "choose_and_fit",
    "log_cut",
    "open_engine",
    "prune",
    "set_aside_by_source",
]

log = get_logger(__name__)


@dataclass
class PruneOptions:
    ratio: float | None = 0.25
    layers: int | None = None
    blocks: int = 1
    solver: str = "lstsq"
    map_space: str = "hidden"  # what the map acts on: the MLP's hidden activations, or its output (T)
    alpha: float = 0.0
    select: str = "fit"
    distance_tokens: str = "last"
    calib_data: str = DEFAULT_CALIBRATION
    calib_samples: int = 384  # 512 gave the same perplexity on every held-out source (within 0.3 %)
    survey_samples: int = 128  # of them, what the survey of every cut reads; the chosen cut's fit reads all
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    eval_data: str = BUILTIN
    eval_tokens: int = 16384
    ood_data: tuple[str, ...] = OUT_OF_DOMAIN  # held-out text of other kinds than Wikipedia
    ood_tokens: int = 8192
    parity_windows: int = 2
    selection_samples: int = 64  # documents after the calibration ones: guard, ridge, --select loss, cosine
    loss_candidates: int = 5  # best cuts by fit that --select loss tries
    device: str = AUTO  # CUDA when torch sees it, else the CPU
    compute_dtype: str = AUTO  # bfloat16 where the device multiplies it natively, else float32
    memory_budget: str | None = None
    quality_guard: bool = True
    gguf_compatible: bool = False  # only cuts the installed llama.cpp runs (an old one: Gemma by index)
    cosine: CosineSettings = field(default_factory=CosineSettings)

    def validate(self) -> None:
        if self.solver not in ("lstsq", "cosine"):
            raise ConfigError(f"unknown solver {self.solver!r}", hint="use lstsq or cosine")
        if self.map_space not in MAP_SPACES:
            raise ConfigError(f"unknown --map {self.map_space!r}", hint="use " + " or ".join(MAP_SPACES))
        if self.select not in SELECTION_RULES:
            raise ConfigError(
                f"unknown --select {self.select!r}", hint="use one of " + ", ".join(SELECTION_RULES)
            )
        if self.distance_tokens not in ("last", "all"):
            raise ConfigError("--distance-tokens must be 'last' or 'all'")
        if self.alpha < 0:
            raise ConfigError(f"--alpha {self.alpha} must be >= 0")
        if self.eval_tokens < 512:
            raise ConfigError(f"--eval-tokens {self.eval_tokens} must be at least one 512-token window")
        if self.ood_data and self.ood_tokens < 512:
            raise ConfigError(f"--ood-tokens {self.ood_tokens} must be at least one 512-token window")

    def compute(self) -> Compute:
        """The device and forward dtype that ``device`` and ``compute_dtype`` resolve to here."""
        return resolve_compute(self.device, self.compute_dtype)


class _Clock:
    """Wall time of each stage, and the process's peak RSS when each stage ended (so the stage
    that set the peak is the first whose figure equals the final one)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_mib_after: dict[str, float] = {}

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.start = time.perf_counter()
                log.info("%s ...", name)
                signal_point(name)

            def __exit__(self, *exc):
                elapsed = time.perf_counter() - self.start
                clock.seconds[name] = clock.seconds.get(name, 0.0) + elapsed
                clock.peak_rss_mib_after[name] = round(_peak_rss_mib(), 1)
                if exc[0] is None:
                    log.info("%s done in %.1f s", name, elapsed)

        return _Stage()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log_cut(
    step: str, cut: tuple[int, int], removed: list[int], table: dict[str, Any], result: FitResult, tokens: str
) -> None:
    contiguous = removed == list(range(removed[0], removed[-1] + 1))
    log.info(
        "cut %s [%d, %d) of the model as it stands, i.e. original blocks %s: distance %.4f, fit error %.4f "
        "vs plain removal %.4f",
        step,
        cut[0],
        cut[1],
        f"{removed[0]}–{removed[-1]}" if contiguous else ", ".join(map(str, removed)),
        table["distance_" + tokens][cut[0]],
        result.details["rel_residual"],
        result.details["rel_residual_plain_removal"],
    )
    if result.solver == "cosine":
        _log_cosine(result.details)


def _log_cosine(details: dict[str, Any]) -> None:
    curve, best = details["loss_curve"], details["best_epoch"]
    validation = details.get("validation_curve")
    log.info(
        "cosine: %d epochs (stopped: %s), cosine loss %.5f -> %.5f; kept epoch %d%s%s",
        details["epochs"],
        details["stopped"],
        curve[0],
        curve[best],
        best,
        " (the lstsq map)" if best == 0 else "",
        f", selection loss {validation[0]:.4f} -> {validation[best]:.4f}" if validation else "",
    )


def _versions() -> dict[str, str]:
    import transformers

    return {
        "rmexport": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def calibration_set(tokenizer: Any, options: PruneOptions, *, set_aside: bool = False) -> CalibrationSet:
    """The calibration documents, or (``set_aside``) the ones after them that judge the guard,
    ``--select loss`` and the cosine epochs."""
    return mixture_batches(
        options.calib_data,
        tokenizer,
        n_samples=options.selection_samples if set_aside else options.calib_samples,
        seq_len=options.seq_len,
        batch_size=options.batch_size,
        seed=options.seed,
        offset=options.calib_samples if set_aside else 0,
        min_tokens=options.seq_len if set_aside else 256,
    )


def set_aside_by_source(tokenizer: Any, options: PruneOptions) -> dict[str, CalibrationSet]:
    """The set-aside documents of each source of the calibration mixture, judged one by one."""
    parts = parse_mixture(options.calib_data)
    weights = [w for _, w in parts]
    counts = shares(options.selection_samples, weights)
    offsets = shares(options.calib_samples, weights)
    return {
        name: mixture_batches(
            name,
            tokenizer,
            n_samples=count,
            seq_len=options.seq_len,
            batch_size=options.batch_size,
            seed=options.seed,
            offset=offset,
            min_tokens=1,
        )
        for (name, _), count, offset in zip(parts, counts, offsets, strict=True)
        if count > 0
    }


def _local_checkpoint(source: ModelSource) -> str:
    """A local directory: hub checkpoints are read from the local Hugging Face cache (or fetched)."""
    location = metadata_dir(source)
    if source.kind != "hub":
        return location
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many unrelated types offline
        raise ModelLoadError(
            f"could not get {location!r} from the Hugging Face Hub ({type(e).__name__})",
            hint="download the model and pass its local directory",
        ) from e


def open_engine(checkpoint: str, options: PruneOptions, budget: MemoryBudget) -> Engine:
    """The block engine over ``checkpoint``: weights resident when they fit the budget."""
    compute = options.compute()
    return Engine.open(checkpoint, budget, device=compute.device, compute_dtype=compute.dtype)


def choose_and_fit(
    engine: Engine,
    plan: Plan,
    calibration: CalibrationSet,
    n: int,
    options: PruneOptions,
    step: str,
    scorer: SelectionScorer | None,
    stats_budget_bytes: int,
) -> tuple[tuple[int, int], FitResult, dict[str, Any]]:
    """Survey every cut of ``n`` blocks of ``plan``, choose one by ``options.select``, fit its map.

    ``scorer`` (set-aside text) is what ``--select loss``, the cosine solver's epochs and the
    ridge strength of a map of the hidden activations are judged on. Returns the cut, the fit and
    the survey's score table."""
    survey = survey_candidates(
        engine,
        plan,
        calibration,
        n,
        stats_budget_bytes=stats_budget_bytes,
        alpha=options.alpha,
        distance_tokens=options.distance_tokens,
        shortlist_only=options.select == "distance",
        allowed=_gguf_filter(engine, plan, n) if options.gguf_compatible else None,
        survey_batches=calibration.spread(options.survey_samples),
        keep_trace=options.map_space == "hidden",
        step=step,
    )
    try:
        return _choose_and_fit_surveyed(
            engine, plan, calibration, survey, options, step, scorer, stats_budget_bytes
        )
    finally:
        survey.release_trace()


def _choose_and_fit_surveyed(
    engine: Engine,
    plan: Plan,
    calibration: CalibrationSet,
    survey: CandidateSurvey,
    options: PruneOptions,
    step: str,
    scorer: SelectionScorer | None,
    stats_budget_bytes: int,
) -> tuple[tuple[int, int], FitResult, dict[str, Any]]:
    n = survey.n
    scores = survey.scores(options.distance_tokens)
    table = survey.table()
    if options.select == "loss":
        assert scorer is not None
        shortlist = sorted(scores.fit, key=lambda s: (scores.fit[s], s))[: options.loss_candidates]
        scores.loss = scorer.trial_losses(plan, n, survey.maps, shortlist)
        table["selection_loss"] = scores.loss
    start = choose_start(scores, options.select)
    cut = (start, start + n)
    result = fit_cut(
        engine,
        plan,
        calibration,
        survey,
        start,
        solver=options.solver,
        alpha=options.alpha,
        map_space=options.map_space,
        set_aside=scorer.selection if scorer is not None else None,
        stats_budget_bytes=stats_budget_bytes,
        cosine=options.cosine,
        validate=scorer.validator(plan, cut) if scorer is not None else None,
        step=step,
    )
    return cut, result, table


def _gguf_filter(engine: Engine, plan: Plan, n: int):
    """Starts whose cut leaves a model the installed llama.cpp runs correctly; None when every cut
    does (a llama.cpp that reads Gemma's per-layer pattern from the GGUF runs any cut)."""
    version = installed_version()
    if engine.adapter.gguf_cut_sizes(engine.config.num_hidden_layers, version) is None:
        return None

    def allowed(start: int) -> bool:
        kept = [step.layer for step in cut_plan(plan, (start, start + n))]
        return engine.adapter.gguf_keeps_pattern(engine.config, kept, version)

    return allowed


def _guard(engine: Engine, set_aside: dict[str, CalibrationSet], final: Plan) -> tuple[Plan, dict[str, Any]]:
    """Keep the fitted maps only if they beat plain removal of the same blocks on the set-aside
    text of every source of the calibration mixture: a map that helps on one kind of text and
    hurts another is not kept."""
    removal = plain_removal(final)
    shared = next(i for i, step in enumerate(final) if step.maps)
    by_source: dict[str, dict[str, float]] = {}
    for source, selection in set_aside.items():
        scorer = SelectionScorer(engine, selection)
        try:
            by_source[source] = scorer.losses({"fitted": final, "plain_removal": removal}, shared=shared)
        finally:
            scorer.close()
    worse = [source for source, losses in by_source.items() if losses["fitted"] > losses["plain_removal"]]
    kept = "plain_removal" if worse else "fitted"
    record = {
        "judged_on": f"{sum(s.n_documents for s in set_aside.values())} set-aside documents of "
        + ", ".join(f"`{source}`" for source in set_aside),
        "selection_loss_fitted": sum(loss["fitted"] for loss in by_source.values()) / len(by_source),
        "selection_loss_plain_removal": sum(loss["plain_removal"] for loss in by_source.values())
        / len(by_source),
        "by_source": by_source,
        "kept": kept,
    }
    if worse:
        log.warning(
            "the fitted map is worse than plain removal on set-aside text of %s: keeping plain removal of "
            "the same blocks; the calibration data is probably too small or unlike the model's text (use "
            "more --calib-samples)",
            ", ".join(worse),
        )
        return removal, record
    return final, record


@dataclass
class _SetAside:
    """The text after the calibration documents: ``selection`` judges ``--select loss`` and the
    cosine epochs, ``by_source`` the quality guard. Built before calibration, so text too short
    for them is an error at once rather than after the calibration pass."""

    selection: CalibrationSet | None
    by_source: dict[str, CalibrationSet]

    @classmethod
    def build(cls, tokenizer: Any, options: PruneOptions) -> _SetAside:
        needs_scorer = options.select == "loss" or options.solver == "cosine" or options.map_space == "hidden"
        return cls(
            calibration_set(tokenizer, options, set_aside=True) if needs_scorer else None,
            set_aside_by_source(tokenizer, options) if options.quality_guard else {},
        )


def _cut_and_fit(
    engine: Engine,
    options: PruneOptions,
    sizes: list[int],
    calibration: CalibrationSet,
    set_aside: _SetAside,
    clock: _Clock,
    stats_budget: int,
) -> tuple[Plan, list[CutRecord], dict[str, Any]]:
    """Each cut chosen and fitted on the model the previous ones left, then the quality guard."""
    plan = original_plan(engine.n_layers)
    records: list[CutRecord] = []
    guard: dict[str, Any] = {"kept": "fitted", "judged_on": None}
    scorer = SelectionScorer(engine, set_aside.selection) if set_aside.selection is not None else None
    try:
        for k, size in enumerate(sizes):
            step = f"({k + 1}/{len(sizes)})"
            with clock.stage(f"calibrate+fit {step}"):
                cut, result, scores = choose_and_fit(
                    engine, plan, calibration, size, options, step, scorer, stats_budget
                )
            removed = [s.layer for s in plan[cut[0] : cut[1]]]
            log_cut(step, cut, removed, scores, result, options.distance_tokens)
            plan = cut_plan(plan, cut, Map(result.transform, f"cut {k + 1}"))
            records.append(CutRecord(list(cut), removed, {"solver": result.solver, **result.details}, scores))
        if options.quality_guard:
            with clock.stage("guard"):
                plan, guard = _guard(engine, set_aside.by_source, plan)
    finally:
        if scorer is not None:
            scorer.close()
    return plan, records, guard


def prune(source: ModelSource, options: PruneOptions, out_dir: Path) -> dict[str, Any]:
    """Run the whole prune and write ``out_dir/hf`` and ``out_dir/prune.json``; return the record.

    Every model takes the same path: the block engine, with weights resident or streamed from
    disk as the memory budget decides."""
    options.validate()
    clock = _Clock()
    config = load_config(source)
    adapter = adapter_for(config)
    n_layers = config.num_hidden_layers
    n = cut_size(n_layers, options.ratio, options.layers)
    sizes = split_cut(n, options.blocks)
    compute = options.compute()
    budget = MemoryBudget.from_option(options.memory_budget, compute.memory_bytes())

    with clock.stage("load"):
        checkpoint = _local_checkpoint(source)
        tokenizer = load_tokenizer(source)
        eval_corpus = load_corpus(options.eval_data)
        calibration = calibration_set(tokenizer, options)
        set_aside = _SetAside.build(tokenizer, options)
        windows = heldout_windows(eval_corpus, tokenizer, options.eval_tokens)
        ood_windows = {
            spec: heldout_windows(load_corpus(spec), tokenizer, options.ood_tokens)
            for spec in options.ood_data
        }
        engine = open_engine(checkpoint, options, budget)
    weights, largest = engine.weights_bytes, engine.largest_module_bytes
    log.info(
        "%s: %s, %d blocks, hidden %d; removing %d block(s) as %s; weights %s (%.2f GiB of a %.2f GiB "
        "budget); forwards in %s on %s (%s)",
        source.spec,
        adapter.family,
        n_layers,
        config.hidden_size,
        n,
        " + ".join(map(str, sizes)),
        "resident" if engine.skeleton.resident else "streamed block by block",
        weights / 2**30,
        budget.total_bytes / 2**30,
        compute.dtype_name,
        compute.device,
        compute.reason,
    )
    log.info("calibration: %s", calibration.summary())

    try:
        plan, records, guard = _cut_and_fit(
            engine, options, sizes, calibration, set_aside, clock, budget.stats_bytes(weights, largest)
        )
        with clock.stage("checks"):
            known = OriginalPerplexities(checkpoint, compute, cache_dir() / "original-perplexity")
            known_main = known.get(windows)
            known_ood = {spec: known.get(w) for spec, w in ood_windows.items()}
            original_reused = known_main is not None and None not in known_ood.values()
            if original_reused:
                log.info("the original's held-out perplexities: measured by an earlier prune, reused")
            checks = run_checks(engine, plan, windows, options.parity_windows, known_main)
            ood = source_perplexities(engine, plan, ood_windows, known_ood)
            known.put(windows, checks.ppl_original)
            for spec, w in ood_windows.items():
                known.put(w, ood[spec]["original"])
        activations = {
            "activations_peak_resident_bytes": engine.store.peak_resident_bytes,
            "activations_spilled_bytes": engine.store.offloaded_bytes,
        } | _gpu_peak(compute.device)
    finally:
        engine.close()  # also removes activations spilled to disk
    parity = FoldParity(
        checks.parity_max_abs_logit_diff,
        checks.parity_max_abs_logit,
        checks.parity_atol,
        checks.parity_tokens,
        checks.parity_passed,
    )
    if not parity.passed:
        raise ToleranceError(
            f"fold parity failed: max |Δlogit| {parity.max_abs_logit_diff:.3g} > {parity.atol:.3g} between "
            "the folded model and the explicit map",
            hint="the map is ill-conditioned: use more calibration text or a ridge term (--alpha 1e-3)",
        )

    kept = [s.layer for s in plan]
    folds = {s.layer: [m.transform for m in s.maps] for s in plan if s.maps}
    record = PruneRecord(
        model=ModelInfo(
            spec=source.spec,
            kind=source.kind,
            location=source.location,
            architecture=(config.architectures or [adapter.hf_architectures[0]])[0],
            family=adapter.family,
            hidden_size=config.hidden_size,
        ),
        L=n_layers,
        n=n_layers - len(kept),
        N=len(kept),
        ratio=options.ratio if options.layers is None else None,
        kept_layers=kept,
        cuts=records,
        selection={"rule": options.select, "distance_tokens": options.distance_tokens},
        solver={
            "name": options.solver,
            "map": options.map_space,
            "alpha": options.alpha,
            **({"cosine": asdict(options.cosine)} if options.solver == "cosine" else {}),
        },
        calibration=calibration.describe() | {"seed": options.seed, "batch_size": options.batch_size},
        evaluation=Evaluation(eval_corpus.name, checks.tokens, int(windows.shape[1] - 1)),
        fold_parity=parity,
        quality=Quality(
            checks.ppl_original,
            checks.ppl_plain_removal,
            checks.ppl_pruned,
            [
                SourceQuality(
                    spec,
                    int(ood_windows[spec][:, 1:].numel()),
                    p["original"],
                    p["plain_removal"],
                    p["pruned"],
                )
                for spec, p in ood.items()
            ],
            original_reused=original_reused,
        ),
        guard=guard,
        tokenizer_parity=tokenizer_parity_record(source),
        memory=budget.describe(weights, largest) | activations | {"device": compute.device},
        compute=compute.describe(),
        saved_dtype=str(checkpoint_dtype(config)).removeprefix("torch."),
        versions=_versions(),
    )
    provenance = read_provenance(checkpoint) | {
        "source": source.spec,
        "original_num_hidden_layers": n_layers,
        "kept_layers": kept,
    }
    outputs = [out_dir / "hf", out_dir / MAPS_FILE, out_dir / "prune.json"]
    made_out_dir = not out_dir.exists()
    try:
        with clock.stage("save"):
            save_pruned_checkpoint(checkpoint, outputs[0], kept, folds, provenance=provenance)
            save_maps(outputs[1], folds)
        record.timings_s = {k: round(v, 2) for k, v in clock.seconds.items()}
        record.peak_rss_mib = round(_peak_rss_mib(), 1)
        record.peak_rss_mib_after_stage = dict(clock.peak_rss_mib_after)
        data = record.to_json()
        write_json(outputs[2], data)
    except BaseException:  # Ctrl-C included: all three outputs, or none
        _remove_outputs(outputs, out_dir if made_out_dir else None)
        raise
    return data


def _gpu_peak(device: str) -> dict[str, int]:
    """The most GPU memory torch held at once during the prune, on a CUDA device."""
    if torch.device(device).type != "cuda":
        return {}
    return {"gpu_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(torch.device(device)))}


def _remove_outputs(outputs: list[Path], made_dir: Path | None) -> None:
    for path in outputs:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if made_dir is not None and made_dir.is_dir() and not any(made_dir.iterdir()):
        made_dir.rmdir()
