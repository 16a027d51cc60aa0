"""Prune without loading the model: calibrate block by block, stream the pruned checkpoint.

Same method, options and output as ``rmexport.prune.prune`` (``OUT/hf`` and ``OUT/prune.json``
with the same record fields), for models whose float32 weights do not fit in memory. Peak
memory is about one block plus the calibration activations (offloaded to disk beyond a budget).

The fold-parity and perplexity checks need whole-model forwards. They run, in memory and in
float32 exactly as in ``prune``, when the float32 model fits in ``CHECK_MEMORY_FRACTION`` of
RAM; otherwise the record says they were skipped and why, and their values are null.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .arch import ArchAdapter
from .atomic import replace_dir, write_json
from .calib.corpus import load_corpus
from .calib.tokens import heldout_windows
from .errors import ConfigError, ModelLoadError, ToleranceError
from .log import get_logger
from .models import ModelSource, checkpoint_dir, load_config, load_model, load_tokenizer, read_provenance
from .prune import (
    FOLD_PARITY_RTOL,
    CutRecord,
    PruneOptions,
    _check_writable,
    _Clock,
    _logits,
    _peak_rss_mib,
    _perplexity,
    _versions,
    calibration_set,
    choose_and_fit,
    describe_cuts,
    jsonable,
    log_cut,
)
from .replaceme.apply import remove_blocks
from .replaceme.checks import Fold, apply_fold, explicit_maps, plain_removal
from .replaceme.select import cut_size, split_cut
from .sequential.blocks import ModelSkeleton, checkpoint_dtype, model_bytes
from .sequential.calibrate import StreamedModel
from .sequential.save import save_pruned_checkpoint

__all__ = ["CHECK_MEMORY_FRACTION", "default_compute_dtype", "prune_sequential", "should_prune_sequentially"]

log = get_logger(__name__)

# The in-memory checks load the float32 model; they run when it takes at most this share of RAM.
CHECK_MEMORY_FRACTION = 0.5


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def should_prune_sequentially(source: ModelSource, fraction: float = CHECK_MEMORY_FRACTION) -> bool:
    """The suggested rule: go layer by layer when the float32 model exceeds ``fraction`` of RAM."""
    return model_bytes(checkpoint_dir(source), torch.float32) > fraction * _ram_bytes()


def default_compute_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _check_compute(device: str, compute_dtype: torch.dtype) -> None:
    allowed = (
        (torch.bfloat16, torch.float16, torch.float32)
        if torch.device(device).type == "cuda"
        else (torch.float32, torch.bfloat16)
    )
    if compute_dtype not in allowed:
        raise ConfigError(
            f"compute dtype {compute_dtype} is not supported on {device}",
            hint="use " + " or ".join(str(d).removeprefix("torch.") for d in allowed),
        )


def prune_sequential(
    source: ModelSource,
    options: PruneOptions,
    out_dir: Path,
    *,
    device: str = "cpu",
    compute_dtype: torch.dtype | None = None,
    run_checks: bool | None = None,
    attn_implementation: str | None = None,
) -> dict[str, Any]:
    """Prune ``source`` block by block; write ``out_dir/hf`` and ``out_dir/prune.json``.

    ``run_checks``: None decides by memory (see module docstring); True forces the in-memory
    checks; False skips them (recorded as skipped)."""
    options.validate()
    if options.select == "loss":
        raise ConfigError(
            "--select loss needs whole-model forwards of every trial cut, which the layer-by-layer path "
            "does not do",
            hint="use --select fit or distance",
        )
    compute_dtype = compute_dtype or default_compute_dtype(device)
    _check_compute(device, compute_dtype)
    clock = _Clock()
    config = load_config(source)
    ckpt = _local_checkpoint(source)
    n_layers = config.num_hidden_layers
    n = cut_size(n_layers, options.ratio, options.layers)
    sizes = split_cut(n, options.blocks)
    _check_writable(out_dir)
    fp32_bytes = model_bytes(ckpt, torch.float32)
    if run_checks is None:
        run_checks = fp32_bytes <= CHECK_MEMORY_FRACTION * _ram_bytes()

    with clock.stage("load"):
        tokenizer = load_tokenizer(source)
        calib_corpus = load_corpus(options.calib_data)
        calibration = calibration_set(calib_corpus, tokenizer, options)
        skeleton = ModelSkeleton(
            ckpt, device=device, compute_dtype=compute_dtype, attn_implementation=attn_implementation
        )
    adapter = skeleton.adapter
    log.info(
        "%s: %s, %d blocks, hidden %d; removing %d block(s) as %s, layer by layer on %s in %s",
        source.spec,
        adapter.family,
        n_layers,
        config.hidden_size,
        n,
        " + ".join(map(str, sizes)),
        device,
        str(compute_dtype).removeprefix("torch."),
    )

    records: list[CutRecord] = []
    cuts: list[tuple[tuple[int, int], torch.Tensor]] = []
    for k, size in enumerate(sizes):
        step = f"({k + 1}/{len(sizes)})"
        with clock.stage(f"calibrate+fit {step}"):
            cut, result, scores = choose_and_fit(StreamedModel(skeleton), calibration, size, options, step)
        removed = skeleton.layers[cut[0] : cut[1]]
        folded_layer = skeleton.layers[cut[0] - 1]
        skeleton.folds.setdefault(folded_layer, []).append(result.transform)
        skeleton.layers = [j for i, j in enumerate(skeleton.layers) if not cut[0] <= i < cut[1]]
        cuts.append((cut, result.transform))
        records.append(CutRecord(cut, removed, scores, {"solver": result.solver, **result.details}))
        log_cut(step, cut, removed, scores, result, options.distance_tokens)
    kept = list(skeleton.layers)
    folds = {j: list(ts) for j, ts in skeleton.folds.items()}
    skeleton.close()
    del skeleton
    gc.collect()

    record: dict[str, Any] = {
        **describe_cuts(source, config, adapter, options, kept, records, calibration),
        "path": {
            "name": "sequential",
            "device": str(device),
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "model_fp32_bytes": fp32_bytes,
        },
        "saved_dtype": str(checkpoint_dtype(config)).removeprefix("torch."),
        "versions": _versions(),
    }

    provenance = read_provenance(ckpt) | {
        "source": source.spec,
        "original_num_hidden_layers": n_layers,
        "kept_layers": kept,
    }
    # Written beside the target and moved into place only once the checks have passed.
    staged = out_dir / ".hf.staged"
    with clock.stage("save"):
        save_pruned_checkpoint(ckpt, staged, kept, folds, provenance=provenance)

    try:
        if run_checks:
            with clock.stage("checks"):
                checks = _in_memory_checks(source, adapter, options, cuts, staged)
            record |= checks
            parity = record["fold_parity"]
            if not parity["passed"]:
                raise ToleranceError(
                    f"fold parity failed: max |Δlogit| {parity['max_abs_logit_diff']:.3g} > "
                    f"{parity['atol']:.3g} between the folded model and the explicit map"
                )
        else:
            reason = (
                f"skipped: the float32 model ({fp32_bytes / 2**30:.1f} GiB) exceeds "
                f"{CHECK_MEMORY_FRACTION:.0%} of RAM ({_ram_bytes() / 2**30:.1f} GiB); the checks need "
                "whole-model forwards"
                if fp32_bytes > CHECK_MEMORY_FRACTION * _ram_bytes()
                else "skipped on request"
            )
            record["evaluation"] = {"skipped": reason}
            record["fold_parity"] = {"skipped": reason, "passed": None}
            record["quality"] = {
                "skipped": reason,
                "ppl_original": None,
                "ppl_plain_removal": None,
                "ppl_pruned": None,
            }
        replace_dir(staged, out_dir / "hf")
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    record["timings_s"] = {k: round(v, 2) for k, v in clock.seconds.items()}
    record["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    if device != "cpu" and torch.cuda.is_available():
        record["path"]["cuda_max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    write_json(out_dir / "prune.json", jsonable(record))
    return record


def _local_checkpoint(source: ModelSource) -> str:
    """A local directory: hub checkpoints are read from the local Hugging Face cache (or fetched)."""
    location = checkpoint_dir(source)
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


def _in_memory_checks(
    source: ModelSource,
    adapter: ArchAdapter,
    options: PruneOptions,
    cuts: list[tuple[tuple[int, int], torch.Tensor]],
    saved: Path,
) -> dict[str, Any]:
    """Fold parity and perplexities as ``prune`` computes them (float32 model in memory), plus
    the streamed checkpoint's logits against the in-memory pruned model."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(source)
    eval_corpus = load_corpus(options.eval_data)
    windows = heldout_windows(eval_corpus, tokenizer, options.eval_tokens)
    model = load_model(source, dtype=torch.float32, device="cpu")
    ppl_original = _perplexity(model, windows, "PPL original")
    folds: list[Fold] = []
    for cut, transform in cuts:
        folds.append(apply_fold(adapter, adapter.block(model, cut[0] - 1), transform))
        remove_blocks(model, adapter, cut)
    parity_windows = windows[: options.parity_windows]
    folded_logits = _logits(model, parity_windows)
    with explicit_maps(adapter, folds):
        explicit_logits = _logits(model, parity_windows)
    max_abs = float((folded_logits - explicit_logits).abs().max())
    scale = float(explicit_logits.abs().max())
    tolerance = FOLD_PARITY_RTOL * max(scale, 1.0)
    with plain_removal(adapter, folds):
        ppl_removal = _perplexity(model, windows, "PPL plain removal")
    ppl_pruned = _perplexity(model, windows, "PPL pruned")
    del model, folds
    gc.collect()
    streamed = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    streamed_logits = _logits(streamed, parity_windows)
    del streamed
    return {
        "evaluation": {
            "source": eval_corpus.name,
            "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
            "window": int(windows.shape[1] - 1),
        },
        "fold_parity": {
            "max_abs_logit_diff": max_abs,
            "max_abs_logit": scale,
            "atol": tolerance,
            "tokens": int(parity_windows.numel()),
            "passed": max_abs <= tolerance,
            "streamed_checkpoint_max_abs_logit_diff": float((streamed_logits - folded_logits).abs().max()),
        },
        "quality": {"ppl_original": ppl_original, "ppl_plain_removal": ppl_removal, "ppl_pruned": ppl_pruned},
    }
