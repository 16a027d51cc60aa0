"""``rmexport prune``: calibrate, choose the cut, fit T, fold, remove blocks, check, save.

Writes ``OUT/hf/`` (an ordinary checkpoint with fewer blocks) and ``OUT/prune.json`` (what was
cut and why, the fit, the checks, timings, versions). Both appear only when complete.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .arch import ArchAdapter, adapter_for
from .atomic import replace_dir, write_json
from .calib.corpus import BUILTIN, load_corpus
from .calib.tokens import CalibrationSet, calibration_batches, heldout_windows
from .errors import ConfigError, RMExportError, ToleranceError
from .log import get_logger
from .models import (
    ModelSource,
    load_config,
    load_model,
    load_tokenizer,
    read_provenance,
    resolve,
    write_provenance,
)
from .replaceme.apply import remove_blocks
from .replaceme.checks import Fold, apply_fold, explicit_maps, plain_removal
from .replaceme.select import SELECTION_RULES, choose_start, cut_size, split_cut
from .replaceme.solve import CosineSettings, FitResult
from .replaceme.survey import (
    CalibrationSource,
    WholeModel,
    fit_cut,
    selection_loss,
    selection_validator,
    survey_candidates,
)

__all__ = [
    "PruneOptions",
    "add_arguments",
    "add_model_argument",
    "add_prune_options",
    "calibration_set",
    "options_from_args",
    "choose_and_fit",
    "describe_cuts",
    "jsonable",
    "log_cut",
    "prune",
    "prune_from_args",
    "run",
]

log = get_logger(__name__)

# Fold parity: the folded model against the explicit map, both float32. The fold only reorders
# float64 products before a float32 cast, so differences are rounding: ~1e-5 relative to the
# logits (SmolLM2-135M: 4.8e-5 against logits up to 39, i.e. 1.2e-6). 2e-4 of the largest logit
# leaves a wide margin and still catches any real error (a wrong transpose moves logits by O(1)).
FOLD_PARITY_RTOL = 2e-4


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
    parity_windows: int = 2
    selection_samples: int = 64  # documents after the calibration ones, for --select loss
    loss_candidates: int = 5  # best cuts by fit that --select loss tries
    device: str = "cpu"
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


@dataclass
class CutRecord:
    cut: tuple[int, int]  # in the model as it was when this cut was chosen
    removed_layers: list[int]  # original indices
    scores: dict[str, Any]
    fit: dict[str, Any]


def choose_and_fit(
    source: CalibrationSource,
    calibration: CalibrationSet,
    n: int,
    options: PruneOptions,
    step: str,
    selection: CalibrationSet | None = None,
) -> tuple[tuple[int, int], FitResult, dict[str, Any]]:
    """Survey every cut of ``n`` blocks, choose one by ``options.select`` and fit its map.

    ``selection`` (set-aside text, whole models only) is what ``--select loss`` and the cosine
    solver's epochs are judged on. Returns the cut, the fit and the survey's score table."""
    survey = survey_candidates(
        source,
        calibration,
        n,
        alpha=options.alpha,
        distance_tokens=options.distance_tokens,
        shortlist_only=options.select == "distance",
        step=step,
    )
    scores = survey.scores(options.distance_tokens)
    table = survey.table()
    model = source.model if isinstance(source, WholeModel) and selection is not None else None
    if options.select == "loss":
        if model is None:
            raise ConfigError("--select loss needs the whole model and set-aside text")
        shortlist = sorted(scores.fit, key=lambda s: (scores.fit[s], s))[: options.loss_candidates]
        scores.loss = selection_loss(model, source.adapter, survey, shortlist, selection)
        table["selection_loss"] = scores.loss
    start = choose_start(scores, options.select)
    result = fit_cut(
        source,
        calibration,
        survey,
        start,
        solver=options.solver,
        alpha=options.alpha,
        cosine=options.cosine,
        validate=selection_validator(model, source.adapter, survey, start, selection) if model else None,
        step=step,
    )
    return (start, start + n), result, table


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


def _logits(model: Any, windows: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return (
            model(input_ids=windows.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()
        )


def _perplexity(model: Any, windows: torch.Tensor, desc: str) -> float:
    from validation.perplexity import perplexity, torch_forward

    return perplexity(torch_forward(model), windows, desc=desc).ppl


def _source_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return dtype


def _versions() -> dict[str, str]:
    import transformers

    return {
        "rmexport": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def calibration_set(corpus: Any, tokenizer: Any, options: PruneOptions) -> CalibrationSet:
    return calibration_batches(
        corpus,
        tokenizer,
        n_samples=options.calib_samples,
        seq_len=options.seq_len,
        batch_size=options.batch_size,
        seed=options.seed,
    )


def prune(source: ModelSource, options: PruneOptions, out_dir: Path) -> dict[str, Any]:
    """Run the whole prune and write ``out_dir/hf`` and ``out_dir/prune.json``; return the record."""
    options.validate()
    clock = _Clock()
    config = load_config(source)
    adapter = adapter_for(config)
    n_layers = config.num_hidden_layers
    n = cut_size(n_layers, options.ratio, options.layers)
    sizes = split_cut(n, options.blocks)
    _check_writable(out_dir)

    with clock.stage("load"):
        tokenizer = load_tokenizer(source)
        calib_corpus = load_corpus(options.calib_data)
        eval_corpus = (
            calib_corpus if options.eval_data == options.calib_data else load_corpus(options.eval_data)
        )
        calibration = calibration_set(calib_corpus, tokenizer, options)
        selection = None
        if options.select == "loss" or options.solver == "cosine":
            selection = calibration_batches(
                calib_corpus,
                tokenizer,
                n_samples=options.selection_samples,
                seq_len=options.seq_len,
                batch_size=options.batch_size,
                seed=options.seed,
                offset=options.calib_samples,
                min_tokens=options.seq_len,
            )
        windows = heldout_windows(eval_corpus, tokenizer, options.eval_tokens)
        model = load_model(source, dtype=torch.float32, device=options.device)
    log.info(
        "%s: %s, %d blocks, hidden %d; removing %d block(s) as %s",
        source.spec,
        adapter.family,
        n_layers,
        config.hidden_size,
        n,
        " + ".join(map(str, sizes)),
    )
    log.info("calibration: %s", calibration.describe())

    with clock.stage("perplexity (original)"):
        ppl_original = _perplexity(model, windows, "PPL original")

    kept = list(range(n_layers))
    folds: list[Fold] = []
    records: list[CutRecord] = []
    for k, size in enumerate(sizes):
        step = f"({k + 1}/{len(sizes)})"
        with clock.stage(f"calibrate+fit {step}"):
            cut, result, scores = choose_and_fit(
                WholeModel(model, adapter), calibration, size, options, step, selection
            )
        removed = kept[cut[0] : cut[1]]
        log_cut(step, cut, removed, scores, result, options.distance_tokens)
        with clock.stage(f"fold+cut {step}"):
            folds.append(apply_fold(adapter, adapter.block(model, cut[0] - 1), result.transform))
            kept_now = remove_blocks(model, adapter, cut)
            kept = [kept[i] for i in kept_now]
        fit_info = {"solver": result.solver, **result.details}
        records.append(CutRecord(cut, removed, scores, fit_info))

    with clock.stage("checks"):
        parity_windows = windows[: options.parity_windows]
        folded_logits = _logits(model, parity_windows)
        with explicit_maps(adapter, folds):
            explicit_logits = _logits(model, parity_windows)
        max_abs = float((folded_logits - explicit_logits).abs().max())
        scale = float(explicit_logits.abs().max())
        dtype_name = str(_source_dtype(config)).removeprefix("torch.")
        tolerance = FOLD_PARITY_RTOL * max(scale, 1.0)
        parity = {
            "max_abs_logit_diff": max_abs,
            "max_abs_logit": scale,
            "atol": tolerance,
            "tokens": int(parity_windows.numel()),
            "passed": max_abs <= tolerance,
        }
        with plain_removal(adapter, folds):
            ppl_removal = _perplexity(model, windows, "PPL plain removal")
        ppl_pruned = _perplexity(model, windows, "PPL pruned")
    if not parity["passed"]:
        raise ToleranceError(
            f"fold parity failed: max |Δlogit| {max_abs:.3g} > {tolerance:.3g} between the folded model "
            "and the explicit map",
            hint="the map is ill-conditioned: use more calibration text or a ridge term (--alpha 1e-3)",
        )

    record = {
        **describe_cuts(source, config, adapter, options, kept, records, calibration),
        "evaluation": {
            "source": eval_corpus.name,
            "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
            "window": int(windows.shape[1] - 1),
        },
        "fold_parity": parity,
        "quality": {"ppl_original": ppl_original, "ppl_plain_removal": ppl_removal, "ppl_pruned": ppl_pruned},
        "timings_s": {k: round(v, 2) for k, v in clock.seconds.items()},
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "versions": _versions(),
        "saved_dtype": dtype_name,
    }
    with clock.stage("save"):
        _save(model, tokenizer, source, config, record, out_dir)
    record["timings_s"]["save"] = round(clock.seconds["save"], 2)
    write_json(out_dir / "prune.json", jsonable(record))
    return record


def describe_cuts(
    source: ModelSource,
    config: Any,
    adapter: ArchAdapter,
    options: PruneOptions,
    kept: list[int],
    records: list[CutRecord],
    calibration: CalibrationSet,
) -> dict[str, Any]:
    """The part of prune.json that says what was cut and how, shared by both pruning paths."""
    n_layers = config.num_hidden_layers
    return {
        "model": {
            "spec": source.spec,
            "kind": source.kind,
            "location": source.location,
            "architecture": (config.architectures or [adapter.hf_architectures[0]])[0],
            "family": adapter.family,
            "hidden_size": config.hidden_size,
        },
        "L": n_layers,
        "n": n_layers - len(kept),
        "N": len(kept),
        "ratio": options.ratio if options.layers is None else None,
        "kept_layers": kept,
        "cuts": [
            {
                "cut": list(r.cut),
                "removed_layers": r.removed_layers,
                "fit": r.fit,
                "scores": jsonable(r.scores),
            }
            for r in records
        ],
        "selection": {"rule": options.select, "distance_tokens": options.distance_tokens},
        "solver": {
            "name": options.solver,
            "alpha": options.alpha,
            **({"cosine": asdict(options.cosine)} if options.solver == "cosine" else {}),
        },
        "calibration": calibration.describe() | {"seed": options.seed, "batch_size": options.batch_size},
    }


def jsonable(value: Any) -> Any:
    """``value`` with string keys and floats rounded to 6 decimals, for ``prune.json``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise ConfigError(f"cannot write to {out_dir}: {e.strerror}") from e


def _save(model: Any, tokenizer: Any, source: ModelSource, config: Any, record: dict, out_dir: Path) -> None:
    """Write ``out_dir/hf`` in the source checkpoint's dtype, atomically."""
    target = out_dir / "hf"
    tmp = Path(tempfile.mkdtemp(prefix=".hf.", dir=out_dir))
    try:
        dtype = _source_dtype(config)
        model.to(dtype)
        model.config.dtype = dtype
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        from .models import checkpoint_dir

        provenance = read_provenance(checkpoint_dir(source))
        write_provenance(
            tmp,
            provenance
            | {
                "source": source.spec,
                "original_num_hidden_layers": record["L"],
                "kept_layers": record["kept_layers"],
            },
        )
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    parser.add_argument("--device", default="cpu", help="torch device for calibration (default cpu)")
    parser.add_argument(
        "--layer-by-layer",
        choices=("auto", "on", "off"),
        default="auto",
        help=(
            "load one decoder block at a time from the checkpoint's safetensors and stream the pruned "
            "checkpoint shard by shard; auto (default) does so when the float32 model exceeds half of RAM"
        ),
    )
    parser.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="forward dtype of the layer-by-layer path (default float32 on CPU, bfloat16 on CUDA)",
    )
    parser.epilog = (
        "Memory: one calibration pass collects the distance of every candidate cut and the float64 "
        "statistics (2·d² numbers per candidate) that the fit needs. When those do not fit in a quarter "
        "of RAM, a first pass measures distances only and a second pass collects statistics for the best "
        "candidates that fit, stopping at the deepest block they need."
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
        eval_data=args.eval_data,
        eval_tokens=args.eval_tokens,
        device=args.device,
    )


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _estimated_parameters(config: Any) -> int:
    d, n_layers = config.hidden_size, config.num_hidden_layers
    ff = getattr(config, "intermediate_size", 4 * d)
    return n_layers * (4 * d * d + 3 * d * ff) + 2 * config.vocab_size * d


def prune_from_args(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """In memory, or layer by layer when asked to or when the model is too large for RAM."""
    source = resolve(args.model)
    options = options_from_args(args)
    mode = getattr(args, "layer_by_layer", "off")
    if mode == "off":
        return prune(source, options, out_dir)
    from safetensors import SafetensorError

    from .prune_sequential import CHECK_MEMORY_FRACTION, prune_sequential, should_prune_sequentially

    config = load_config(source)  # fails with a clear message (e.g. hub unreachable) before any work
    adapter_for(config)
    if mode == "auto":
        too_big = 4 * _estimated_parameters(config) > CHECK_MEMORY_FRACTION * _ram_bytes()
        if source.kind != "hub":
            try:
                too_big = should_prune_sequentially(source)
            except (RMExportError, OSError, ValueError, SafetensorError) as e:
                # Unreadable shard headers: the in-memory loader reports the problem precisely.
                log.debug("could not size %s from its shards: %s", source.location, e)
        if not too_big:
            return prune(source, options, out_dir)
    compute_dtype = getattr(torch, args.compute_dtype) if getattr(args, "compute_dtype", None) else None
    log.info("layer-by-layer pruning on %s", args.device)
    return prune_sequential(source, options, out_dir, device=args.device, compute_dtype=compute_dtype)


def run(args: argparse.Namespace) -> int:
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
    parity = record["fold_parity"]
    console.print(
        f"fold parity: max |Δlogit| {parity['max_abs_logit_diff']:.2e} (tolerance {parity['atol']:.2e})"
    )
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in record["timings_s"].items()))
    console.print(
        f"peak RSS {record['peak_rss_mib']:.0f} MiB; wrote {out_dir / 'hf'} and {out_dir / 'prune.json'}"
    )
