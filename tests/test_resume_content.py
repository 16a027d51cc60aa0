"""Resume keyed on content: a source rewritten in place between runs (same path, same size, same
modification time, other bytes) invalidates every stage that read it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rmexport.cli import main

from .test_cli_fuzz import RUN_FAST


def _rewrite_middle_keeping_size_and_mtime(path: Path) -> None:
    """Other bytes in the middle of the file (a decoder block's weights), same size, and the
    modification time set back: what a careless copy or an in-place edit tool can leave."""
    import numpy as np

    stat = path.stat()
    middle = stat.st_size // 2 // 4 * 4  # float32 weights: halve 1024 of them
    with path.open("r+b") as f:
        f.seek(middle)
        halved = np.frombuffer(f.read(4096), dtype=np.float32) / 2
        f.seek(middle)
        f.write(halved.tobytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_a_changed_source_invalidates_every_stage_that_read_it(tiny_checkpoints, tmp_path, capsys):
    source = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "llama")
    root = tmp_path / "runs"
    argv = ["run", str(source), "--out-root", str(root), *RUN_FAST.split(), "--ratio", "0.25"]
    report_file = root / "llama-r0.25" / "report.json"

    def run() -> list[str]:
        assert main(argv) in (0, 1)
        capsys.readouterr()
        return json.loads(report_file.read_text())["reused_stages"]

    run()
    assert {"prune", "export_gguf_f16", "validate_gguf"} <= set(run()), "unchanged: everything reused"
    _rewrite_middle_keeping_size_and_mtime(source / "model.safetensors")
    assert {"prune", "export_gguf_f16", "validate_gguf"}.isdisjoint(run())
