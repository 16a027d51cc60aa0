"""``rmexport prune``: calibrate, choose the cut, fit T, fold, remove blocks, check, save.

Writes ``OUT/hf/`` (an ordinary checkpoint with fewer blocks) and ``OUT/prune.json`` (what was
cut and why, the fit, the checks, timings, versions). Both appear only when complete.
"""

from __future__ import annotations

import argparse
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
from .calib.corpus import BUILTIN, OUT_OF_DOMAIN, load_corpus
from .calib.engine import Engine, Map, Plan, cut_plan, original_plan
from .calib.tokens import CalibrationSet, calibration_batches, heldout_windows
from .calib.weights import checkpoint_dtype, model_bytes
from .errors import ConfigError, ModelLoadError, ToleranceError
from .log import get_logger
from .models import (
    ModelSource,
    load_config,
    load_tokenizer,
    metadata_dir,
    read_provenance,
    resolve,
)
from .records import CutRecord, Evaluation, FoldParity, ModelInfo, PruneRecord, Quality, SourceQuality
from .replaceme.checks import plain_removal, run_checks, source_perplexities
from .replaceme.save import MAPS_FILE, save_maps, save_pruned_checkpoint
from .replaceme.select import SELECTION_RULES, choose_start, cut_size, split_cut
from .replaceme.solve import CosineSettings, FitResult
from .replaceme.survey import SelectionScorer, fit_cut, survey_candidates
from .tokenizer_parity import tokenizer_parity_record

__all__ = [
    "PruneOptions",
    "add_arguments",
    "add_model_argument",
    "add_prune_options",
    "calibration_set",
    "choose_and_fit",
    "log_cut",
    "open_engine",
    "options_from_args",
    "prune",
    "prune_from_args",
    "run",
]

log = get_logger(__name__)


@dataclass
class PruneOptions:
    ratio: float | None = 0.25
    layers: int | None = None
    blocks: int = 1
    solver: str = "lstsq"
    alpha: float = 0.0
    select: str = "fit"
    distance_tokens: str = "last"
    calib_data: str = BUILTIN
    calib_samples: int = 512
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    eval_data: str = BUILTIN
    eval_tokens: int = 16384
    ood_data: tuple[str, ...] = OUT_OF_DOMAIN  # held-out text unlike the calibration data
    ood_tokens: int = 8192
    parity_windows: int = 2
    selection_samples: int = 64  # documents after the calibration ones, for --select loss
    loss_candidates: int = 5  # best cuts by fit that --select loss tries
    device: str = "cpu"
    compute_dtype: str | None = None
    memory_budget: str | None = None
    quality_guard: bool = True
    gguf_compatible: bool = False  # only cuts llama.cpp can run (layer patterns fixed by the index)
    cosine: CosineSettings = field(default_factory=CosineSettings)

    def validate(self) -> None:
        if self.solver not in ("lstsq", "cosine"):
            raise ConfigError(f"unknown solver {self.solver!r}", hint="use lstsq or cosine")
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


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.start = time.perf_counter()
                log.info("%s ...", name)

            def __exit__(self, *exc):
                elapsed = time.perf_counter() - self.start
                clock.seconds[name] = clock.seconds.get(name, 0.0) + elapsed
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
        "cut %s blocks %s (original indices %s): distance %.4f, fit error %.4f vs plain removal %.4f",
        step,
        list(cut),
        [removed[0], removed[-1] + 1] if contiguous else removed,
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


def calibration_set(
    corpus: Any, tokenizer: Any, options: PruneOptions, *, set_aside: bool = False
) -> CalibrationSet:
    """The calibration documents, or (``set_aside``) the ones after them that judge the guard,
    ``--select loss`` and the cosine epochs."""
    if set_aside:
        return calibration_batches(
            corpus,
            tokenizer,
            n_samples=options.selection_samples,
            seq_len=options.seq_len,
            batch_size=options.batch_size,
            seed=options.seed,
            offset=options.calib_samples,
            min_tokens=options.seq_len,
        )
    return calibration_batches(
        corpus,
        tokenizer,
        n_samples=options.calib_samples,
        seq_len=options.seq_len,
        batch_size=options.batch_size,
        seed=options.seed,
    )


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


def _compute_dtype(options: PruneOptions) -> torch.dtype:
    if options.compute_dtype:
        dtype = getattr(torch, options.compute_dtype)
    else:
        dtype = torch.bfloat16 if torch.device(options.device).type == "cuda" else torch.float32
    allowed = (
        (torch.bfloat16, torch.float16, torch.float32)
        if torch.device(options.device).type == "cuda"
        else (torch.float32, torch.bfloat16)
    )
    if dtype not in allowed:
        raise ConfigError(
            f"compute dtype {dtype} is not supported on {options.device}",
            hint="use " + " or ".join(str(d).removeprefix("torch.") for d in allowed),
        )
    return dtype


def open_engine(checkpoint: str, options: PruneOptions, budget: MemoryBudget) -> Engine:
    """The block engine over ``checkpoint``: weights resident when they fit the budget."""
    return Engine.open(checkpoint, budget, device=options.device, compute_dtype=_compute_dtype(options))


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

    ``scorer`` (set-aside text) is what ``--select loss`` and the cosine solver's epochs are
    judged on. Returns the cut, the fit and the survey's score table."""
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
        step=step,
    )
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
        cosine=options.cosine,
        validate=scorer.validator(plan, cut) if scorer is not None else None,
        step=step,
    )
    return cut, result, table


def _gguf_filter(engine: Engine, plan: Plan, n: int):
    """Starts whose cut leaves a model llama.cpp runs correctly (Gemma's index-derived pattern)."""

    def allowed(start: int) -> bool:
        kept = [step.layer for step in cut_plan(plan, (start, start + n))]
        return engine.adapter.gguf_keeps_pattern(engine.config, kept)

    return allowed


def _guard(scorer: SelectionScorer, final: Plan) -> tuple[Plan, dict[str, Any]]:
    """Keep the fitted maps only if they beat plain removal of the same blocks on set-aside text."""
    removal = plain_removal(final)
    shared = next(i for i, step in enumerate(final) if step.maps)
    losses = scorer.losses({"fitted": final, "plain_removal": removal}, shared=shared)
    kept = "fitted" if losses["fitted"] <= losses["plain_removal"] else "plain_removal"
    record = {
        "judged_on": f"{len(scorer.selection.batches)} batches of set-aside calibration text",
        "selection_loss_fitted": losses["fitted"],
        "selection_loss_plain_removal": losses["plain_removal"],
        "kept": kept,
    }
    if kept == "plain_removal":
        log.warning(
            "the fitted map is worse than plain removal on set-aside text (loss %.4f vs %.4f): keeping "
            "plain removal of the same blocks; the calibration data is probably too small or unlike "
            "the model's text (use more --calib-samples)",
            losses["fitted"],
            losses["plain_removal"],
        )
        return removal, record
    return final, record


def _cut_and_fit(
    engine: Engine,
    options: PruneOptions,
    sizes: list[int],
    calibration: CalibrationSet,
    selection: CalibrationSet,
    clock: _Clock,
    budget: MemoryBudget,
) -> tuple[Plan, list[CutRecord], dict[str, Any]]:
    """Each cut chosen and fitted on the model the previous ones left, then the quality guard."""
    plan = original_plan(engine.n_layers)
    records: list[CutRecord] = []
    guard: dict[str, Any] = {"kept": "fitted", "judged_on": None}
    needs_selection = options.quality_guard or options.select == "loss" or options.solver == "cosine"
    scorer = SelectionScorer(engine, selection) if needs_selection else None
    try:
        for k, size in enumerate(sizes):
            step = f"({k + 1}/{len(sizes)})"
            with clock.stage(f"calibrate+fit {step}"):
                cut, result, scores = choose_and_fit(
                    engine, plan, calibration, size, options, step, scorer, budget.total_bytes // 4
                )
            removed = [s.layer for s in plan[cut[0] : cut[1]]]
            log_cut(step, cut, removed, scores, result, options.distance_tokens)
            plan = cut_plan(plan, cut, Map(result.transform, f"cut {k + 1}"))
            records.append(CutRecord(list(cut), removed, {"solver": result.solver, **result.details}, scores))
        if scorer is not None and options.quality_guard:
            with clock.stage("guard"):
                plan, guard = _guard(scorer, plan)
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
    budget = MemoryBudget.from_option(options.memory_budget)

    with clock.stage("load"):
        checkpoint = _local_checkpoint(source)
        tokenizer = load_tokenizer(source)
        calib_corpus = load_corpus(options.calib_data)
        eval_corpus = (
            calib_corpus if options.eval_data == options.calib_data else load_corpus(options.eval_data)
        )
        calibration = calibration_set(calib_corpus, tokenizer, options)
        selection = calibration_set(calib_corpus, tokenizer, options, set_aside=True)
        windows = heldout_windows(eval_corpus, tokenizer, options.eval_tokens)
        ood_windows = {
            spec: heldout_windows(load_corpus(spec), tokenizer, options.ood_tokens)
            for spec in options.ood_data
        }
        engine = open_engine(checkpoint, options, budget)
    weights = model_bytes(checkpoint, engine.skeleton.compute_dtype)
    log.info(
        "%s: %s, %d blocks, hidden %d; removing %d block(s) as %s; weights %s (%.2f GiB of a %.2f GiB "
        "budget)",
        source.spec,
        adapter.family,
        n_layers,
        config.hidden_size,
        n,
        " + ".join(map(str, sizes)),
        "resident" if engine.skeleton.resident else "streamed block by block",
        weights / 2**30,
        budget.total_bytes / 2**30,
    )
    log.info("calibration: %s", calibration.describe())

    try:
        plan, records, guard = _cut_and_fit(engine, options, sizes, calibration, selection, clock, budget)
        with clock.stage("checks"):
            checks = run_checks(engine, plan, windows, options.parity_windows)
            ood = source_perplexities(engine, plan, ood_windows)
        activations = {
            "activations_peak_resident_bytes": engine.store.peak_resident_bytes,
            "activations_spilled_bytes": engine.store.offloaded_bytes,
        }
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
        ),
        guard=guard,
        tokenizer_parity=tokenizer_parity_record(source),
        memory=budget.describe(weights) | activations | {"device": str(options.device)},
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
        data = record.to_json()
        write_json(outputs[2], data)
    except BaseException:  # Ctrl-C included: all three outputs, or none
        _remove_outputs(outputs, out_dir if made_out_dir else None)
        raise
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--out", required=True, type=Path, help="output folder; gets hf/ and prune.json")
    add_prune_options(parser)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default="smollm2-135m",
        help="alias, hub id, HF directory or .gguf file (default: smollm2-135m)",
    )


def add_prune_options(parser: argparse.ArgumentParser) -> None:
    size = parser.add_argument_group("how much to cut")
    size.add_argument(
        "--ratio",
        type=float,
        default=0.25,
        help="fraction of blocks to remove: n = floor(ratio*L + 0.5) (default 0.25)",
    )
    size.add_argument("--layers", type=int, help="remove exactly this many blocks (overrides --ratio)")
    size.add_argument(
        "--blocks",
        type=int,
        default=1,
        help=(
            "split the removal into K non-overlapping cuts, each chosen on the model "
            "pruned by the previous ones (default 1)"
        ),
    )
    method = parser.add_argument_group("where to cut and how to fit")
    method.add_argument(
        "--select",
        choices=SELECTION_RULES,
        default="fit",
        help=(
            "distance: smallest angular distance across the cut (the reference rule); "
            "fit: smallest error left after the fitted map (default); "
            "loss: try the 5 best cuts by fit and keep the one with the lowest loss on 64 "
            "calibration documents set aside for selection"
        ),
    )
    method.add_argument(
        "--distance-tokens",
        choices=("last", "all"),
        default="last",
        help="angular distance over the last token of each sequence (reference) or all real tokens",
    )
    method.add_argument(
        "--solver",
        choices=("lstsq", "cosine"),
        default="lstsq",
        help=(
            "lstsq: float64 normal equations (default); cosine: Adam on the cosine distance between "
            "the residual stream after the cut and the original one, started from lstsq; every epoch "
            "is scored by the pruned model's loss on 64 calibration documents set aside, and the best "
            "epoch (lstsq included) is kept; layer by layer, the epoch with the lowest cosine loss"
        ),
    )
    method.add_argument(
        "--alpha", type=float, default=0.0, help="ridge term added to the normal equations (default 0)"
    )
    data = parser.add_argument_group("calibration and evaluation text")
    data.add_argument(
        "--calib-data",
        default=BUILTIN,
        help=(
            "builtin (Wikipedia summaries, offline), a .txt or .jsonl file, "
            "slimorca, wikitext, fineweb or hf:DATASET[:CONFIG]"
        ),
    )
    data.add_argument(
        "--calib-samples", type=int, default=512, help="documents used for calibration (default 512)"
    )
    data.add_argument(
        "--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)"
    )
    data.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    data.add_argument(
        "--selection-samples",
        type=int,
        default=64,
        help=(
            "calibration documents set aside (after the calibration ones) to judge the quality guard, "
            "--select loss and the cosine epochs (default 64)"
        ),
    )
    data.add_argument(
        "--seed",
        type=int,
        default=0,
        help="0 takes the first documents of the calibration pool; others sample it",
    )
    data.add_argument(
        "--eval-data", default=BUILTIN, help="held-out text for the perplexity checks (default builtin)"
    )
    data.add_argument(
        "--eval-tokens",
        type=int,
        default=16384,
        help="held-out tokens for the perplexity checks (default 16384)",
    )
    data.add_argument(
        "--ood-data",
        default=",".join(OUT_OF_DOMAIN),
        type=lambda text: tuple(s for s in text.split(",") if s and s != "none"),
        help=(
            "comma-separated held-out sources unlike the calibration text, each also checked: docs "
            "(Python's documentation), dialogue (casual chats), .txt/.jsonl files; 'none' skips "
            f"(default {','.join(OUT_OF_DOMAIN)})"
        ),
    )
    data.add_argument(
        "--ood-tokens",
        type=int,
        default=8192,
        help="held-out tokens of each --ood-data source (default 8192)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for calibration (default cpu)")
    method.add_argument(
        "--no-quality-guard",
        action="store_true",
        help=(
            "keep the fitted maps even when plain removal of the same blocks does better on the 64 "
            "set-aside calibration documents (by default the prune then saves plain removal and says so)"
        ),
    )
    parser.add_argument(
        "--memory-budget",
        help=(
            "memory the prune may use, e.g. 8GiB (default: RMEXPORT_MEMORY_BUDGET, else half of RAM). "
            "Weights stay resident when they fit half of it, otherwise every pass streams them from disk "
            "one block at a time; activations beyond the rest spill to disk"
        ),
    )
    parser.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the forwards (default float32 on CPU, bfloat16 on CUDA)",
    )
    parser.epilog = (
        "Memory: one calibration pass collects the distance of every candidate cut and the float64 "
        "statistics (2·d² numbers per candidate) that the fit needs. When those do not fit in a quarter "
        "of the memory budget, a first pass measures distances only and a second pass collects statistics "
        "for the best candidates that fit, stopping at the deepest block they need. Quality guard: the "
        "fitted maps are kept only if the "
        "pruned model's loss on 64 set-aside calibration documents is no worse than plain removal of the "
        "same blocks; otherwise plain removal is saved and prune.json says so (guard.kept)."
    )


def options_from_args(args: argparse.Namespace) -> PruneOptions:
    return PruneOptions(
        ratio=args.ratio,
        layers=args.layers,
        blocks=args.blocks,
        solver=args.solver,
        alpha=args.alpha,
        select=args.select,
        distance_tokens=args.distance_tokens,
        calib_data=args.calib_data,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        selection_samples=args.selection_samples,
        eval_data=args.eval_data,
        eval_tokens=args.eval_tokens,
        ood_data=args.ood_data,
        ood_tokens=args.ood_tokens,
        device=args.device,
        compute_dtype=args.compute_dtype,
        memory_budget=args.memory_budget,
        quality_guard=not args.no_quality_guard,
        gguf_compatible=not getattr(args, "skip_gguf", True),
    )


def _remove_outputs(outputs: list[Path], made_dir: Path | None) -> None:
    for path in outputs:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if made_dir is not None and made_dir.is_dir() and not any(made_dir.iterdir()):
        made_dir.rmdir()


def prune_from_args(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    return prune(resolve(args.model), options_from_args(args), out_dir)


def run(args: argparse.Namespace) -> int:
    from .inputs import check_prune_args

    check_prune_args(args)
    record = prune_from_args(args, args.out)
    _print_summary(record, args.out)
    return 0


def _print_summary(record: dict[str, Any], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for cut in record["cuts"]:
        fit = cut["fit"]
        console.print(
            f"cut {cut['cut']} (original blocks {cut['removed_layers'][0]}..{cut['removed_layers'][-1]}), "
            f"solver {fit['solver']}: fit error {fit['rel_residual']:.4f} vs plain removal "
            f"{fit['rel_residual_plain_removal']:.4f}"
        )
    quality = record["quality"]
    table = Table(title=f"{record['model']['spec']}: {record['L']} -> {record['N']} blocks")
    for column in ("model", "held-out PPL"):
        table.add_column(column)
    table.add_row("original", f"{quality['ppl_original']:.2f}")
    table.add_row("plain removal", f"{quality['ppl_plain_removal']:.2f}")
    table.add_row(f"pruned ({record['solver']['name']})", f"{quality['ppl_pruned']:.2f}")
    console.print(table)
    for ood in quality["out_of_domain"]:
        console.print(
            f"out of domain, {ood['source']}: original {ood['ppl_original']:.2f}, plain removal "
            f"{ood['ppl_plain_removal']:.2f}, pruned {ood['ppl_pruned']:.2f}"
        )
    parity = record["fold_parity"]
    console.print(
        f"fold parity: max |Δlogit| {parity['max_abs_logit_diff']:.2e} (tolerance {parity['atol']:.2e})"
    )
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in record["timings_s"].items()))
    console.print(
        f"peak RSS {record['peak_rss_mib']:.0f} MiB; wrote {out_dir / 'hf'} and {out_dir / 'prune.json'}"
    )
