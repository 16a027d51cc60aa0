"""``rmexport run``'s frontier: prune, or quantize harder? A ladder of llama.cpp types for the original
and the pruned model, each point's file size, perplexity on every held-out source, KL to the original's
float model, and pp512/tg128 speed.

Three stages:

- ``frontier`` of the original, in ``<slug>-original/`` (made once per model and reused, like the
  original's other exports): its f32 GGUF (from the source file, or written from the checkpoint); the
  float reference (``validation.frontier.write_reference``); one importance matrix from the prune's
  calibration text (capped, ``rmexport.imatrix_text``) for the types at 4 bits and fewer; every type
  quantized from the f32 file by llama.cpp and measured. The f32 file is deleted at the end. A GGUF
  source's own type is the source file itself.
- ``frontier`` of the pruned model, in the run folder: the same from the pruned checkpoint, measured
  against the original's reference. A GGUF source's own type is the GGUF-native pruned file.
- ``frontier_speed``: per type, each of the two files run once untimed (``validation.frontier.warm_up``:
  read into the page cache, loaded, a short prompt), then the pruned file against the original's,
  A B B A (``validation.speed``), in fewer rounds than the main comparison (``SPEED_ROUNDS``); the
  source's own type reuses the main comparison, which timed the same two files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

from converters.gguf_export import GGUF_TYPES, export_gguf, quantize_gguf
from converters.imatrix import compute_imatrix, read_imatrix
from validation.frontier import (
    FrontierPoint,
    Reference,
    frontier_windows,
    measure_point,
    page_cache_fraction,
    warm_up,
    write_reference,
)
from validation.gguf_bench import DEFAULT_PROTOCOL, speed
from validation.gguf_parity import gguf_type_of

from .atomic import staged_dir, write_json
from .calib.weights import config_dtype
from .config import RunConfig
from .errors import ConfigError
from .imatrix_text import calibration_text, default_imatrix_recipe
from .llama_tools import find_tool
from .llamacpp import quantize
from .log import get_logger
from .models import ModelSource, load_tokenizer, metadata_dir
from .records import JsonObject, from_jsonable
from .speed_settings import SpeedProtocol, SpeedRounds
from .stages import Stage

__all__ = [
    "LADDER",
    "SPEED_ROUNDS",
    "TOKENS_PER_SOURCE",
    "FrontierRecord",
    "Ladder",
    "LadderMatrix",
    "LadderRecord",
    "frontier_enabled",
    "f32_writer",
    "frontier_stages",
    "ladder_files",
    "ladder_types",
    "make_ladder",
    "own_type",
    "time_ladder",
]

log = get_logger(__name__)

# The types a llama.cpp user chooses between, and the source's own type besides.
LADDER = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
# Per held-out source, its first 256 held-out tokens (the first half of the report's first window): each
# point costs one llama.cpp pass over them, and make export's budget (9 minutes on 2 cores) has room for
# fourteen points of 3 x 256 tokens, not of 3 x 4,096.
TOKENS_PER_SOURCE = 256
# Fewer rounds than the main comparison (3 to 6, after a warm-up turn of every phase): one round per
# phase, after one short untimed run of each file (``warm_up``: the page cache and the first load), not
# the protocol's warm-up turns (a pp512 and 16 tokens of tg128 per model: about 2 s a type on the default
# model). A round is A B B A, so each model's first call in the timing process is paid by both.
SPEED_ROUNDS = SpeedRounds(warmup=0, min_rounds=1, max_rounds=1)
REFERENCE_FILE = "reference-logprobs.npy"
# A float checkpoint's own type, by its dtype.
_FLOAT_TYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def frontier_enabled(cfg: RunConfig, source: ModelSource) -> bool:
    """``--frontier``/``--no-frontier``; by default on for a GGUF source (the default model is one),
    off for others, and off without GGUF benchmarks. Asked for with them skipped: ConfigError."""
    skipped = "--skip-bench" if cfg.skip_bench else "--skip-gguf" if cfg.skip_gguf else None
    if cfg.frontier and skipped:
        raise ConfigError(
            f"--frontier measures GGUF files in llama.cpp, and {skipped} skips that",
            hint=f"drop {skipped}, or --frontier",
        )
    enabled = source.is_gguf and skipped is None if cfg.frontier is None else cfg.frontier
    if enabled:
        find_tool("llama-imatrix")  # the ladder's types of 4 bits and fewer need it: say so before any work
    return enabled


def own_type(source: ModelSource, config: Any) -> str:
    """The source's own type: a GGUF's file type, a checkpoint's dtype (f16 where it is unknown)."""
    if source.is_gguf:
        return gguf_type_of(source.location)
    dtype = str(config_dtype(config) or "")
    return _FLOAT_TYPES.get(dtype.removeprefix("torch."), "f16")


def ladder_types(own: str) -> list[str]:
    """``LADDER`` and the source's own type (where it is not already on it)."""
    return list(dict.fromkeys([*LADDER, own]))


@dataclass(frozen=True)
class Ladder:
    """One model's ladder: where its files go, and how its f32 GGUF is made."""

    role: str
    folder: Path
    stem: str
    write_f32: Callable[[Path], Any]
    tokenizer_dir: Callable[[], Path]  # for the importance matrix's text
    own_type: str
    own_file: Path | None  # the own type's file where it exists already (a GGUF source, a GGUF-native prune)


@dataclass(frozen=True)
class LadderMatrix:
    """The importance matrix of one model's ladder."""

    file: str
    chunks: int  # as llama-imatrix counted them
    chunk_tokens: int
    text: JsonObject | None  # the calibration recipe (default_imatrix_recipe)
    types: list[str]  # the ladder's types quantized with it

    @classmethod
    def from_json(cls, data: JsonObject) -> LadderMatrix:
        return from_jsonable(cls, data)


@dataclass(frozen=True)
class LadderRecord:
    """One model's ladder measured (``make_ladder``): its points, its matrix, and for the original the
    float reference it made (absent from the JSON otherwise)."""

    role: str
    points: list[FrontierPoint]
    imatrix: LadderMatrix | None
    reference: Reference | None = None

    def to_json(self) -> JsonObject:
        data: JsonObject = {
            "role": self.role,
            "points": [p.to_json() for p in self.points],
            "imatrix": None if self.imatrix is None else asdict(self.imatrix),
        }
        if self.reference is not None:
            data["reference"] = self.reference.to_json()
        return data

    @classmethod
    def from_json(cls, data: JsonObject) -> LadderRecord:
        return from_jsonable(cls, data)

    def files(self) -> dict[str, Path]:
        """Type -> file of the ladder's rungs (those quantized with their default matrix)."""
        return {p.type: Path(p.file) for p in self.points if not p.extra}


@dataclass(frozen=True)
class FrontierRecord:
    """The frontier of one run, as the report reads it: both ladders, the speed per type (each a
    ``validation.speed`` record as JSON, with its warm-up) and the settings they were measured with."""

    types: list[str]
    own_type: str
    tokens_per_source: int
    speed_rounds: dict[str, int]  # "warmup" (the protocol's turns), "rounds"
    original: LadderRecord
    pruned: LadderRecord
    speed: dict[str, JsonObject]  # type -> gguf_bench.speed's record, "warmup", "resident_after_timing"
    seconds: dict[str, float] | None = None  # per part, where a benchmark timed them

    def to_json(self) -> JsonObject:
        data: JsonObject = {
            "types": self.types,
            "own_type": self.own_type,
            "tokens_per_source": self.tokens_per_source,
            "speed_rounds": self.speed_rounds,
            "original": self.original.to_json(),
            "pruned": self.pruned.to_json(),
            "speed": self.speed,
        }
        if self.seconds is not None:
            data["seconds"] = self.seconds
        return data

    @classmethod
    def from_json(cls, data: JsonObject) -> FrontierRecord:
        return from_jsonable(cls, data)


def _windows(source: ModelSource, cfg: RunConfig):
    sources = [cfg.prune.eval_data, *cfg.prune.ood_data]
    tokens = dict.fromkeys(sources, TOKENS_PER_SOURCE)
    return frontier_windows(load_tokenizer(source), tokens, window=TOKENS_PER_SOURCE)


def make_ladder(
    ladder: Ladder,
    types: list[str],
    windows: Any,
    prune_record: Path,
    threads: int,
    reference: Reference | None,
    plain: tuple[str, ...] = (),
) -> LadderRecord:
    """Quantize and measure every type of ``ladder``; the original's (``reference`` None) also writes
    the float reference. ``plain``: types also made from the f32 file both with and without the
    importance matrix, beside the ladder (a benchmark's comparison; the source's own type among them
    is made too). Returns the ladder's record (paths as they are once the folder is placed)."""

    def placed(path: Path) -> Path:
        return ladder.folder / path.name

    with staged_dir(ladder.folder) as folder:
        f32 = folder / f"{ladder.stem}-f32.gguf"
        ladder.write_f32(f32)
        made_reference = None
        if reference is None:
            made_reference = write_reference(f32, windows, folder / REFERENCE_FILE, threads)
        measuring_reference = made_reference or reference
        made = [t for t in types if ladder.own_file is None or t != ladder.own_type]
        with_matrix = [t for t in made if GGUF_TYPES[t].imatrix_by_default]
        # (type, with the matrix, file suffix): the ladder, then the comparison's extra files
        rungs = [(t, t in with_matrix, None if t not in made else "") for t in types]
        rungs += [(t, True, "-imatrix") for t in plain if t not in with_matrix]
        rungs += [(t, False, "-no-imatrix") for t in plain]
        matrix, matrix_record = None, None
        if any(use for _, use, _ in rungs):
            text = calibration_text(ladder.tokenizer_dir(), prune_record)
            matrix = compute_imatrix(f32, text, folder / f"{ladder.stem}.imatrix.gguf")
            matrix_record = LadderMatrix(
                file=str(placed(matrix)),
                chunks=read_imatrix(matrix).chunk_count,
                chunk_tokens=text.chunk_tokens,
                text=default_imatrix_recipe("q4_k_m", prune_record),
                types=with_matrix,
            )
        points = []
        for gguf_type, use_matrix, suffix in rungs:
            if suffix is None:  # the own type's file, already on disk
                file = recorded = ladder.own_file
            elif gguf_type == "f32" and not suffix:  # the f32 file itself is the point
                file, recorded = f32, placed(f32)
            else:
                file = folder / f"{ladder.stem}-{gguf_type}{suffix}.gguf"
                recorded = placed(file)
                quantize_gguf(f32, file, gguf_type, imatrix_file=matrix if use_matrix else None)
            point = replace(
                measure_point(file, windows, measuring_reference, threads, recorded_as=recorded),
                type=gguf_type,
                imatrix=use_matrix and suffix is not None,
                extra=bool(suffix),
            )
            log.info(
                "frontier %s %s: %.1f MiB, perplexity %.3f, KL %.4f",
                ladder.role,
                gguf_type,
                point.size_bytes / 2**20,
                point.ppl,
                point.kl,
            )
            points.append(point)
        if all(Path(point.file) != placed(f32) for point in points):
            f32.unlink()
    placed_reference = None
    if made_reference is not None:
        placed_reference = replace(made_reference, file=str(placed(Path(made_reference.file))))
    return LadderRecord(ladder.role, points, matrix_record, placed_reference)


def f32_writer(model: Callable[[], Path], from_gguf: bool) -> Callable[[Path], Any]:
    """Writes a model's f32 GGUF: a GGUF dequantized by llama.cpp, or a checkpoint converted."""

    def write(out: Path) -> Any:
        if from_gguf:
            return quantize(model(), out, "f32", allow_requantize=True)
        return export_gguf(model(), out, "f32")

    return write


def ladder_files(record: LadderRecord) -> dict[str, Path]:
    """Type -> file of a ladder's record (the rungs quantized with their default matrix)."""
    return record.files()


def time_ladder(
    types: list[str],
    files: dict[str, dict[str, Path]],
    protocol: SpeedProtocol,
    reused: dict[str, JsonObject],
) -> dict[str, JsonObject]:
    """Per type, pp and tg of the pruned file against the original's (``files[role][type]``), A B B A,
    after each file's untimed run (``warm_up``, under ``warmup``; ``resident_after_timing``: the fraction
    of each file's pages still in the page cache after the round); a type in ``reused`` takes that
    result instead."""
    timed = {}
    for t in types:
        if t in reused:
            timed[t] = reused[t]
            continue
        pair = {role: files[role][t] for role in ("original", "pruned")}
        warm = {role: warm_up(path).to_json() for role, path in pair.items()}
        timed[t] = speed(pair["original"], pair["pruned"], protocol) | {
            "warmup": warm,
            "resident_after_timing": {role: page_cache_fraction(path) for role, path in pair.items()},
        }
    return timed


def _read(path: Path) -> JsonObject:
    return json.loads(path.read_text())


def frontier_stages(
    cfg: RunConfig,
    runner,
    base_runner,
    model_key: JsonObject,
    source: ModelSource,
    config: Any,
    original_ckpt: Callable[[], Path],
    run_dir: Path,
    base_dir: Path,
    native_file: Path | None,
    main_bench: JsonObject | None,
) -> JsonObject:
    """The frontier's three stages; returns ``{"frontier": FrontierRecord as JSON}`` for the report."""
    own = own_type(source, config)
    types = ladder_types(own)
    record = run_dir / "prune.json"
    protocol = DEFAULT_PROTOCOL.with_rounds(replace(SPEED_ROUNDS, threads=cfg.speed.threads))
    threads = protocol.resolved_threads()
    windows_key = {s: TOKENS_PER_SOURCE for s in [cfg.prune.eval_data, *cfg.prune.ood_data]}
    key = {
        "types": types,
        "windows": windows_key,
        "imatrix": default_imatrix_recipe("q4_k_m", record),
        "threads": threads,
        "runtime": version("llama-cpp-python"),
    }
    windows = None

    def get_windows():
        nonlocal windows
        if windows is None:
            windows = _windows(source, cfg)
        return windows

    slug = source.slug
    original = Ladder(
        "original",
        base_dir / "frontier",
        slug,
        f32_writer(lambda: Path(source.location) if source.is_gguf else original_ckpt(), source.is_gguf),
        lambda: Path(metadata_dir(source)),
        own,
        Path(source.location) if source.is_gguf else None,
    )
    pruned = Ladder(
        "pruned",
        run_dir / "frontier",
        f"{slug}-r{cfg.ratio_label}",
        f32_writer(lambda: run_dir / "hf", False),
        lambda: run_dir / "hf",
        own,
        native_file,
    )
    original_file, pruned_file = base_dir / "checks" / "frontier.json", run_dir / "checks" / "frontier.json"
    base_runner.run(
        Stage(
            "frontier",
            key | {"model": model_key},
            [original.folder, original_file],
            lambda: write_json(
                original_file,
                make_ladder(original, types, get_windows(), record, threads, None).to_json(),
            ),
        )
    )
    reference = LadderRecord.from_json(_read(original_file)).reference
    runner.run(
        Stage(
            "frontier",
            key | {"original": base_runner.hashes["frontier"]},
            [pruned.folder, pruned_file],
            lambda: write_json(
                pruned_file, make_ladder(pruned, types, get_windows(), record, threads, reference).to_json()
            ),
            needs=["prune", *([f"export_gguf_{own}"] if native_file else [])],
        )
    )
    ladders = {
        role: LadderRecord.from_json(_read(path))
        for role, path in (("original", original_file), ("pruned", pruned_file))
    }
    files = {role: ladder.files() for role, ladder in ladders.items()}
    reused = {}
    main_speed = ((main_bench or {}).get(own) or {}).get("types", {}).get(own, {}).get("speed")
    if native_file is not None and main_speed:
        reused[own] = main_speed | {"reused_from": "the main llama.cpp comparison"}
    speed_file = run_dir / "checks" / "frontier_speed.json"
    runner.run(
        Stage(
            "frontier_speed",
            {"types": types, "speed": protocol.as_dict(), "reused": sorted(reused)},
            [speed_file],
            lambda: write_json(speed_file, time_ladder(types, files, protocol, reused)),
            needs=["frontier", *(["bench_gguf"] if reused else [])],
        )
    )
    frontier = FrontierRecord(
        types=types,
        own_type=own,
        tokens_per_source=TOKENS_PER_SOURCE,
        speed_rounds={"warmup": SPEED_ROUNDS.warmup, "rounds": SPEED_ROUNDS.max_rounds},
        original=ladders["original"],
        pruned=ladders["pruned"],
        speed=_read(speed_file),
    )
    return {"frontier": frontier.to_json()}
