"""``rmexport run``: the whole pipeline into ``OUT_ROOT/<slug>-r<ratio>/``.

prune → export ONNX and GGUF (pruned, and the original once per model in ``<slug>-original/``)
→ validate both against the pruned PyTorch model → benchmark original vs pruned in both
runtimes → report. Every stage is resumable (see ``stages.py``); ``--force`` redoes them.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import torch

from converters.gguf_export import GGUF_TYPES, export_gguf
from converters.gguf_prune import GGUFPrune, write_pruned_gguf
from converters.imatrix import ImatrixUse, quantized_with
from converters.onnx_export import export_onnx
from validation.gguf_bench import DEFAULT_PROTOCOL as GGUF_PROTOCOL
from validation.gguf_bench import GGUFBench, GGUFQuality, bench_gguf, gguf_perplexity
from validation.gguf_parity import (
    EXACT_TYPES,
    SOURCE_KL_MULTIPLE,
    SOURCE_TOP1_MARGIN,
    GGUFParity,
    compare_gguf,
    gguf_type_of,
)
from validation.onnx_bench import DEFAULT_PROTOCOL as ONNX_PROTOCOL
from validation.onnx_bench import OnnxBench, OnnxQuality, measure_onnx, onnx_quality
from validation.onnx_parity import OnnxParity, compare_onnx
from validation.report import StageOutputs, write_report

from . import llamacpp
from .arch import adapter_for
from .atomic import existing_ancestor, write_json
from .calib.corpus import parse_mixture
from .calib.weights import checkpoint_dtype
from .config import RunConfig
from .errors import ConfigError
from .fileio import content_fingerprint
from .fold import ATTENTION_SITE
from .frontier import frontier_enabled, frontier_stages, own_type
from .imatrix_text import default_imatrix_recipe, resolve_imatrix
from .lock import hold_folder
from .log import get_logger
from .models import ModelSource, checkpoint_dir, load_config, metadata_dir, resolve
from .prune import prune
from .records import JsonObject, PruneRecord
from .replaceme.save import MAPS_FILE, load_maps
from .replaceme.select import cut_size, split_cut
from .stages import Stage, StageRunner, remove_partial_outputs
from .sysinfo import ram_bytes

__all__ = ["prune_gguf_natively", "run_dir_for", "run_pipeline"]

log = get_logger(__name__)

Record = TypeVar("Record")

# Bytes per parameter on disk, by artefact, to refuse a run that cannot fit before any work. K-quants
# are made from a float32 GGUF written first; the margin covers that and rounding.
_DISK_BYTES_PER_PARAM = {"onnx": 4, "f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.1, "q4_k_m": 4.6}
_DISK_MARGIN = 1.1
# A frontier's ladder (Q8_0 to Q2_K and a source type of at most 16 bits): about 4.1 bytes per parameter.
_FRONTIER_BYTES_PER_PARAM = 6.2
# The ONNX exporters hold the whole float32 model and its traced copy: about this many bytes per
# parameter at peak (an estimate with a margin; it only has to catch models far too big).
_ONNX_EXPORT_BYTES_PER_PARAM = 8


def run_dir_for(out_root: Path, source: ModelSource, ratio_label: str) -> Path:
    return out_root / f"{source.slug}-r{ratio_label}"


def _estimate_params(config: Any, blocks: int | None = None) -> int:
    """Parameters of the model with ``blocks`` decoder blocks (default: all of them)."""
    d, ff = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    n = config.num_hidden_layers if blocks is None else blocks
    return n * (4 * d * d + 3 * d * ff) + 2 * config.vocab_size * d


def _preflight(source: ModelSource, cfg: RunConfig, run_dir: Path) -> Any:
    """Every check that needs no heavy work: fail before loading any weights."""
    config = load_config(source)
    adapter = adapter_for(config)
    n = cut_size(config.num_hidden_layers, cfg.ratio, cfg.layers)
    sizes = split_cut(n, cfg.blocks)
    if not cfg.skip_gguf:
        if cfg.gguf_type not in GGUF_TYPES:
            raise ConfigError(
                f"--gguf-type {cfg.gguf_type!r} is not supported", hint="use one of " + ", ".join(GGUF_TYPES)
            )
        llama_cpp_version = llamacpp.installed_version()
        workable = adapter.gguf_cut_sizes(config.num_hidden_layers, llama_cpp_version)
        if workable is not None and any(size not in workable for size in sizes):
            nearest = sorted(workable, key=lambda k: (abs(k - n), k))[:2]
            raise ConfigError(
                f"llama-cpp-python {llama_cpp_version} derives {adapter.family}'s sliding/global layer "
                f"pattern from the layer index, and no cut of {' + '.join(map(str, sizes))} of its "
                f"{config.num_hidden_layers} blocks keeps it; "
                f"cuts of {', '.join(map(str, workable)) or 'no size'} block(s) do",
                hint=(f"use --layers {nearest[0]}" if nearest else "this model is too shallow for a GGUF cut")
                + " (with --blocks 1), --skip-gguf, or llama-cpp-python >= "
                + f"{adapter.llama_cpp_swa_array_since}, which reads the GGUF's per-layer pattern",
            )
    if not cfg.skip_onnx:
        params = _estimate_params(config)
        needed, ram = params * _ONNX_EXPORT_BYTES_PER_PARAM, ram_bytes()
        if needed > ram:
            raise ConfigError(
                f"the ONNX export holds the whole model in memory: about {needed / 2**30:.0f} GiB for "
                f"{params / 1e9:.1f}B parameters, and this machine has {ram / 2**30:.0f} GiB",
                hint="add --skip-onnx (pruning, GGUF, parity and the report still run), or export ONNX "
                "on a machine with more memory",
            )

    dtype_bytes = torch.tensor([], dtype=checkpoint_dtype(config)).element_size()
    if (run_dir / "hf" / "config.json").is_file():  # an earlier run's checkpoint is reused in place
        dtype_bytes = 0
    frontier = frontier_enabled(cfg, source)
    needed = _disk_needed(cfg, _estimate_params(config, config.num_hidden_layers - n), dtype_bytes, frontier)
    free = shutil.disk_usage(existing_ancestor(run_dir)).free
    if free < needed:
        raise ConfigError(
            f"{free / 2**30:.1f} GiB free under {run_dir}, about {needed / 2**30:.1f} GiB needed",
            hint="free some space or choose another --out-root",
        )
    return config


def _disk_needed(cfg: RunConfig, params: int, checkpoint_bytes: int = 4, frontier: bool = False) -> float:
    """Bytes the run writes: the pruned checkpoint and each deployable, twice when the original is
    exported for the side-by-side benchmarks (an upper bound: the pruned model is smaller); with the
    frontier, both ladders and one f32 file at a time."""
    copies = 1 if cfg.skip_bench else 2
    per_param = checkpoint_bytes  # the pruned checkpoint keeps the source's dtype
    if not cfg.skip_onnx:
        per_param += copies * _DISK_BYTES_PER_PARAM["onnx"]
    if not cfg.skip_gguf:
        types = dict.fromkeys([cfg.gguf_type, "q4_k_m"])
        per_param += copies * sum(_DISK_BYTES_PER_PARAM.get(t, 4) for t in types)
    if frontier:
        per_param += 2 * _FRONTIER_BYTES_PER_PARAM + _DISK_BYTES_PER_PARAM["f32"]
    return params * per_param * _DISK_MARGIN


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _original_perplexity(
    base_runner,
    name: str,
    key: JsonObject,
    needs: str,
    out: Path,
    measure: Callable[[], Any],
    read: Callable[[JsonObject], Record],
) -> Record:
    """The original's held-out perplexity in one runtime: measured once per model (into
    ``<slug>-original/checks/``) and reused by every run that benchmarks it on the same windows.
    ``measure()`` gives the record, ``read`` takes it back from its JSON."""
    base_runner.run(Stage(name, key, [out], lambda: write_json(out, measure().to_json()), needs=[needs]))
    return read(_read_json(out))


def _onnx_stages(
    cfg, runner, base_runner, model_key, original_ckpt, pruned_ckpt, run_dir, base_dir
) -> tuple[OnnxParity, OnnxBench | None]:
    protocol = ONNX_PROTOCOL.with_rounds(cfg.speed)

    onnx_key = {"flavor": cfg.onnx_flavor, "dtype": cfg.onnx_dtype}
    base_onnx, pruned_onnx = base_dir / "onnx", run_dir / "onnx"
    if not cfg.skip_bench:  # the original's ONNX only serves the side-by-side benchmark
        base_runner.run(
            Stage(
                "export_onnx",
                {"model": model_key, **onnx_key},
                [base_onnx],
                lambda: export_onnx(original_ckpt(), base_onnx, dtype=cfg.onnx_dtype, flavor=cfg.onnx_flavor),
            )
        )
    runner.run(
        Stage(
            "export_onnx",
            onnx_key,
            [pruned_onnx],
            lambda: export_onnx(pruned_ckpt, pruned_onnx, dtype=cfg.onnx_dtype, flavor=cfg.onnx_flavor),
            needs=["prune"],
        )
    )
    parity_file = run_dir / "checks" / "onnx_parity.json"
    runner.run(
        Stage(
            "validate_onnx",
            {},
            [parity_file],
            lambda: write_json(
                parity_file, compare_onnx(pruned_onnx, pruned_ckpt, raise_on_failure=False).to_json()
            ),
            needs=["export_onnx"],
        )
    )
    parity = OnnxParity.from_json(_read_json(parity_file))
    if cfg.skip_bench:
        return parity, None
    threads = protocol.resolved_threads()
    original_ppl = _original_perplexity(
        base_runner,
        "perplexity_onnx",
        {"eval_tokens": cfg.eval_tokens, "threads": threads, "runtime": version("onnxruntime")},
        "export_onnx",
        base_dir / "checks" / "onnx_perplexity.json",
        lambda: onnx_quality(base_onnx, eval_tokens=cfg.eval_tokens, threads=threads),
        OnnxQuality.from_json,
    )
    bench_file = run_dir / "checks" / "onnx_bench.json"
    runner.run(
        Stage(
            "bench_onnx",
            {
                "eval_tokens": cfg.eval_tokens,
                "speed": protocol.as_dict(),
                "original": base_runner.hashes["export_onnx"],
                "original_perplexity": base_runner.hashes["perplexity_onnx"],
            },
            [bench_file],
            lambda: write_json(
                bench_file,
                measure_onnx(
                    base_onnx,
                    pruned_onnx,
                    eval_tokens=cfg.eval_tokens,
                    protocol=protocol,
                    original_perplexity=original_ppl,
                ).to_json(),
            ),
            needs=["export_onnx"],
        )
    )
    return parity, OnnxBench.from_json(_read_json(bench_file))


def _gguf_stages(
    cfg, runner, base_runner, model_key, original_ckpt, pruned_ckpt, run_dir, base_dir, source, ratio_label
) -> tuple[StageOutputs, JsonObject | None]:
    """The GGUF stages' outputs for the report, and the benchmark's JSON as written (for the frontier)."""
    protocol = GGUF_PROTOCOL.with_rounds(cfg.speed)

    # Types at 4 bits and fewer are quantized with an importance matrix from the prune's calibration
    # text, the original's (from the same text) and the pruned model's alike.
    record = run_dir / "prune.json"

    def imatrix_for(gguf_type: str, checkpoint: Path):
        return resolve_imatrix(None, gguf_type, checkpoint, prune_record=record)

    slug = source.slug
    # A quantized GGUF source is pruned into a GGUF of its own type directly (untouched tensors
    # copied byte for byte), and benchmarked against the source file itself: that is the file its
    # user deploys. The HF route still gives the --gguf-type file, checked for parity. Other
    # sources get --gguf-type and q4_k_m through the HF checkpoint, both benchmarked.
    native = gguf_type_of(source.location) if source.is_gguf else None
    converted = [cfg.gguf_type] if native else ["q4_k_m"]
    types = list(dict.fromkeys([cfg.gguf_type, *converted, *([native] if native else [])]))
    bench_types = [native] if native else types
    pruned_files = {t: run_dir / "gguf" / f"{slug}-r{ratio_label}-{t}.gguf" for t in types}
    base_files = {t: base_dir / "gguf" / f"{slug}-{t}.gguf" for t in types}
    if native:
        base_files[native] = Path(source.location)
        runner.run(
            Stage(
                f"export_gguf_{native}",
                # folded_min: the folded ffn_down is written at no fewer bits than Q8_0 (a file
                # written before that rule is written again).
                {"type": native, "native": True, "folded_min": "q8_0"},
                [pruned_files[native]],
                lambda: _prune_gguf_natively(source, run_dir, pruned_files[native]),
                needs=["prune"],
            )
        )
        base_runner.hashes[f"export_gguf_{native}"] = f"{model_key['location']}@{model_key['content']}"
    for t in [t for t in types if t != native]:
        # The original's GGUFs serve the benchmark and, for a lossy type, the source's own error.
        if (not cfg.skip_bench and t in bench_types) or t not in EXACT_TYPES:
            base_runner.run(
                Stage(
                    f"export_gguf_{t}",
                    {"model": model_key, "type": t} | _imatrix_key(t, record),
                    [base_files[t]],
                    lambda t=t: export_gguf(
                        original_ckpt(), base_files[t], type=t, imatrix_source=imatrix_for(t, original_ckpt())
                    ),
                )
            )
        runner.run(
            Stage(
                f"export_gguf_{t}",
                {"type": t} | _imatrix_key(t, record),
                [pruned_files[t]],
                lambda t=t: export_gguf(
                    pruned_ckpt, pruned_files[t], type=t, imatrix_source=imatrix_for(t, pruned_ckpt)
                ),
                needs=["prune"],
            )
        )
    # A GGUF source's own error is measured against its weights read from the file by the block
    # engine (as the prune read them), so no float32 copy of the weights is written for it.
    source_errors = {
        t: _source_error(
            base_runner,
            t,
            base_files[t],
            (lambda: Path(metadata_dir(source))) if t == native else original_ckpt,
            base_dir,
        )
        for t in types
        if t not in EXACT_TYPES
    }
    parity_file = run_dir / "checks" / "gguf_parity.json"
    runner.run(
        Stage(
            "validate_gguf",
            {
                "types": types,
                "source_errors": [base_runner.hashes[f"validate_gguf_{t}"] for t in source_errors],
                "source_rule": [SOURCE_KL_MULTIPLE, SOURCE_TOP1_MARGIN],
            },
            [parity_file],
            lambda: write_json(
                parity_file,
                {
                    t: compare_gguf(
                        pruned_files[t], pruned_ckpt, check=False, source_error=source_errors.get(t)
                    ).to_json()
                    for t in types
                },
            ),
            needs=[f"export_gguf_{t}" for t in types],
        )
    )
    outputs = StageOutputs(
        gguf_parity={t: GGUFParity.from_json(entry) for t, entry in _read_json(parity_file).items()},
        gguf_imatrix=_imatrices({"pruned": pruned_files, "original": base_files}),
    )
    if cfg.skip_bench:
        return outputs, None
    threads = protocol.resolved_threads()
    original_quality = [
        _original_perplexity(
            base_runner,
            f"perplexity_gguf_{t}",
            {"eval_tokens": cfg.eval_tokens, "threads": threads, "runtime": version("llama-cpp-python")},
            f"export_gguf_{t}",
            base_dir / "checks" / f"gguf_{t}_perplexity.json",
            lambda t=t: gguf_perplexity(base_files[t], eval_tokens=cfg.eval_tokens, threads=threads),
            GGUFQuality.from_json,
        )
        for t in bench_types
    ]
    bench_file = run_dir / "checks" / "gguf_bench.json"
    runner.run(
        Stage(
            "bench_gguf",
            {
                "eval_tokens": cfg.eval_tokens,
                "types": bench_types,
                "speed": protocol.as_dict(),
                "original": [base_runner.hashes[f"export_gguf_{t}"] for t in bench_types],
                "original_perplexity": [base_runner.hashes[f"perplexity_gguf_{t}"] for t in bench_types],
            },
            [bench_file],
            lambda: write_json(
                bench_file,
                {
                    t: bench_gguf(
                        base_files[t],
                        pruned_files[t],
                        eval_tokens=cfg.eval_tokens,
                        protocol=protocol,
                        torch_reference=False,
                        original_quality=original_quality,
                    ).to_json()
                    for t in bench_types
                },
            ),
            needs=[f"export_gguf_{t}" for t in bench_types],
        )
    )
    bench = _read_json(bench_file)
    return replace(outputs, gguf_bench={t: GGUFBench.from_json(b) for t, b in bench.items()}), bench


def _imatrices(files: dict[str, dict[str, Path]]) -> dict[str, ImatrixUse | None]:
    """For the report: the importance matrix each GGUF file was quantized with, or None."""
    return {
        f"{role} {gguf_type}": quantized_with(path)
        for role, by_type in files.items()
        for gguf_type, path in by_type.items()
        if path.is_file()
    }


def _imatrix_key(gguf_type: str, prune_record: Path) -> JsonObject:
    """A GGUF export stage's key part for its importance matrix: none at all where the type has no
    matrix by default, so that those stages keep the keys they had."""
    recipe = default_imatrix_recipe(gguf_type, prune_record)
    return {} if recipe is None else {"imatrix": recipe}


def _source_error(base_runner, gguf_type: str, gguf_file: Path, reference, base_dir: Path) -> GGUFParity:
    """The original model's GGUF of ``gguf_type`` against the original in PyTorch (``reference()``,
    its checkpoint): the error a pruned file of that type is judged against. Measured once per model
    and type."""
    out = base_dir / "checks" / f"gguf_{gguf_type}_parity.json"
    base_runner.run(
        Stage(
            f"validate_gguf_{gguf_type}",
            {"type": gguf_type},
            [out],
            lambda: write_json(out, compare_gguf(gguf_file, reference(), check=False).to_json()),
            needs=[f"export_gguf_{gguf_type}"],
        )
    )
    return GGUFParity.from_json(_read_json(out))


def _prune_gguf_natively(source: ModelSource, run_dir: Path, out: Path) -> None:
    result = prune_gguf_natively(source, run_dir, out)
    write_json(run_dir / "checks" / "gguf_native.json", result.to_json())


def prune_gguf_natively(source: ModelSource, run_dir: Path, out: Path) -> GGUFPrune:
    """The GGUF source pruned as ``run_dir``'s prune did, its maps folded in, written to ``out``."""
    record = json.loads((run_dir / "prune.json").read_text())
    adapter = adapter_for(load_config(source))
    maps = run_dir / MAPS_FILE
    return write_pruned_gguf(
        source.location,
        out,
        record["kept_layers"],
        load_maps(maps),
        attention_folds=load_maps(maps, ATTENTION_SITE),
        dense_fold=adapter.dense_fold,
    )


def _text_file_fingerprints(options: Any) -> dict[str, str]:
    """Content fingerprints of the text files the prune reads (calibration, held-out), by name."""
    specs = [name for name, _ in parse_mixture(options.calib_data)]
    specs += [options.eval_data, *options.ood_data]
    files = {spec: Path(spec).expanduser() for spec in specs}
    return {spec: content_fingerprint(path) for spec, path in files.items() if path.is_file()}


def run_pipeline(cfg: RunConfig) -> tuple[Path, JsonObject]:
    """Runs every stage; returns the run folder and what its report.json holds."""
    source = resolve(cfg.model)
    ratio_label = cfg.ratio_label
    run_dir = run_dir_for(Path(cfg.out_root), source, ratio_label)
    base_dir = Path(cfg.out_root) / f"{source.slug}-original"
    config = _preflight(source, cfg, run_dir)
    # The original's folder is shared by every ratio's run of the model, so it is held too.
    with hold_folder(run_dir, "--out-root"), hold_folder(base_dir, "--out-root"):
        return _run_stages(cfg, source, config, run_dir, base_dir, ratio_label)


def _run_stages(
    cfg: RunConfig, source: ModelSource, config: Any, run_dir: Path, base_dir: Path, ratio_label: str
) -> tuple[Path, JsonObject]:
    remove_partial_outputs(run_dir)
    remove_partial_outputs(base_dir)
    runner = StageRunner(run_dir / ".stages", force=cfg.force)
    base_runner = StageRunner(base_dir / ".stages", force=cfg.force)
    options = cfg.prune
    # The original's weights as a checkpoint serve only the side-by-side benchmarks' exports (for a
    # GGUF source that means dequantizing them once into the cache), so they are asked for then.
    original_ckpt = functools.cache(lambda: Path(checkpoint_dir(source)))
    model_key = {
        "spec": source.spec,
        "location": source.location,
        "layers": config.num_hidden_layers,
        # Same path, other bytes: every stage that read the source (and all after them) runs again.
        "content": None if source.kind == "hub" else content_fingerprint(source.location),
    }
    pruned_ckpt = run_dir / "hf"
    started = time.perf_counter()

    runner.run(
        Stage(
            "prune",
            {
                "model": model_key,
                # The memory budget changes where activations live, never the result.
                "options": vars(options) | {"cosine": None, "memory_budget": None},
                "text_files": _text_file_fingerprints(options),
            },
            [pruned_ckpt, run_dir / "prune.json"],
            lambda: prune(source, options, run_dir),
        )
    )
    outputs, gguf_bench = StageOutputs(), None

    if not cfg.skip_onnx:
        onnx_parity, onnx_bench = _onnx_stages(
            cfg, runner, base_runner, model_key, original_ckpt, pruned_ckpt, run_dir, base_dir
        )
        outputs = replace(outputs, onnx_parity=onnx_parity, onnx_bench=onnx_bench)
    if not cfg.skip_gguf:
        gguf_outputs, gguf_bench = _gguf_stages(
            cfg,
            runner,
            base_runner,
            model_key,
            original_ckpt,
            pruned_ckpt,
            run_dir,
            base_dir,
            source,
            ratio_label,
        )
        outputs = replace(
            outputs,
            gguf_parity=gguf_outputs.gguf_parity,
            gguf_imatrix=gguf_outputs.gguf_imatrix,
            gguf_bench=gguf_outputs.gguf_bench,
        )
    if frontier_enabled(cfg, source):
        native = own_type(source, config) if source.is_gguf else None
        frontier = frontier_stages(
            cfg,
            runner,
            base_runner,
            model_key,
            source,
            config,
            original_ckpt,
            run_dir,
            base_dir,
            run_dir / "gguf" / f"{source.slug}-r{ratio_label}-{native}.gguf" if native else None,
            gguf_bench,
        )
        outputs = replace(outputs, frontier=frontier["frontier"])

    timings = {f"original/{k}": v for k, v in base_runner.seconds.items()} | runner.seconds
    report = write_report(
        run_dir,
        PruneRecord.from_json(_read_json(run_dir / "prune.json")),
        outputs,
        timings,
        reused=runner.reused + [f"original/{n}" for n in base_runner.reused],
        wall_s=time.perf_counter() - started,
    )
    return run_dir, report.to_json()
