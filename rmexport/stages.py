"""Resumable stages: each writes its outputs atomically, then a manifest with the hash of its inputs.

A stage whose manifest holds the same hash (its own key, the hashes of the stages it reads, the
rmexport version) and whose outputs still exist is skipped. Outputs are written into temporary
siblings and renamed into place by the stage itself; the manifest is written last, so an
interrupted stage simply runs again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import STAGING_PREFIX, is_stale_staging, write_json
from .hooks import signal_point
from .log import get_logger
from .records import JsonObject

__all__ = ["Stage", "StageRunner", "remove_partial_outputs"]

log = get_logger(__name__)


@dataclass
class Stage:
    name: str
    key: JsonObject  # every input that changes the outputs, as JSON (hashed)
    outputs: list[Path]
    run: Callable[[], Any]
    needs: list[str] = field(default_factory=list)


class StageRunner:
    def __init__(self, manifest_dir: Path, force: bool = False) -> None:
        self.manifest_dir = manifest_dir
        self.force = force
        self.hashes: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def _manifest(self, name: str) -> Path:
        return self.manifest_dir / f"{name}.json"

    def _hash(self, stage: Stage) -> str:
        payload = {
            "key": stage.key,
            "needs": {n: self.hashes[n] for n in stage.needs},
            "version": __version__,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def is_current(self, stage: Stage) -> bool:
        digest = self._hash(stage)
        manifest = self._manifest(stage.name)
        if self.force or not manifest.is_file():
            return False
        try:
            saved = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            return False
        return saved.get("hash") == digest and all(p.exists() for p in stage.outputs)

    def run(self, stage: Stage) -> Any:
        digest = self._hash(stage)
        self.hashes[stage.name] = digest
        if self.is_current(stage):
            self.reused.append(stage.name)
            self.seconds[stage.name] = json.loads(self._manifest(stage.name).read_text()).get("seconds", 0.0)
            log.info("%s: up to date, reused", stage.name)
            return None
        log.info("%s ...", stage.name)
        started = time.perf_counter()
        self._manifest(stage.name).unlink(missing_ok=True)
        signal_point(stage.name)
        result = stage.run()
        elapsed = time.perf_counter() - started
        self.seconds[stage.name] = elapsed
        write_json(
            self._manifest(stage.name), {"hash": digest, "seconds": round(elapsed, 2), "key": stage.key}
        )
        log.info("%s done in %.1f s", stage.name, elapsed)
        return result


def _is_partial(entry: Path) -> bool:
    name = entry.name
    if name.startswith(STAGING_PREFIX):
        return is_stale_staging(entry)
    # Temporaries of earlier versions (no writer pid in the name): '.hf.*', '.onnx.tmp-*', '.x.tmp'.
    return (
        name.startswith(".")
        and name != ".stages"
        and (".tmp" in name or name.startswith((".hf", ".onnx", ".gguf")))
    )


def remove_partial_outputs(folder: Path) -> list[Path]:
    """Delete the temporaries interrupted runs left in ``folder`` and its direct subfolders
    (``gguf/``, ``checks/`` ...): staging entries of processes that are gone, and the older
    dot-named temporaries. Staging entries of a live process are kept. Returns what was removed."""
    if not folder.is_dir():
        return []
    removed = []
    folders = [folder, *(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))]
    for parent in folders:
        for entry in parent.iterdir():
            if _is_partial(entry):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    if removed:
        log.info("removed %d partial output(s) of an interrupted run under %s", len(removed), folder)
    return removed
