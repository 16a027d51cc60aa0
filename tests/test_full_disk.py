"""A full disk at each atomic write: exit 2, one line naming the path and the space needed, nothing
half-written."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from rmexport.atomic import STAGING_PREFIX, staged_dir, staged_file, write_json
from rmexport.cli import main
from rmexport.errors import DiskFullError

from .test_cli_fuzz import PRUNE_FAST, RUN_FAST, _listing, one_line_error

PRUNE_ARGS = PRUNE_FAST.split() + ["--ratio", "0.5", "--ood-data", "none"]

FULL_DISK = [
    pytest.param("export gguf {llama} --out {out}/g/m.gguf --type f16", "m.gguf", id="gguf-export"),
    pytest.param("export onnx {llama} --out {out}/onnx", "onnx", id="onnx-export"),
    pytest.param("prune {llama} --out {out}/p " + " ".join(PRUNE_ARGS), "hf", id="prune-checkpoint"),
    pytest.param("prune {llama} --out {out}/p " + " ".join(PRUNE_ARGS), "maps.safetensors", id="prune-maps"),
    pytest.param("prune {llama} --out {out}/p " + " ".join(PRUNE_ARGS), "prune.json", id="prune-record"),
    pytest.param("run {llama} --out-root {out}/r " + RUN_FAST, "prune.json", id="run-prune-record"),
    pytest.param(
        "validate gguf {gguf} --reference {llama} --prompts 1 --json {out}/v.json",
        "v.json",
        id="validate-json",
    ),
]


@pytest.fixture(scope="module")
def small_gguf(tiny_checkpoints, tmp_path_factory) -> Path:
    from converters.gguf_export import export_gguf

    return export_gguf(
        tiny_checkpoints["llama"], tmp_path_factory.mktemp("gguf") / "llama-f32.gguf", type="f32"
    )


@pytest.mark.parametrize(("template", "target"), FULL_DISK)
def test_full_disk_is_one_line_and_leaves_nothing(
    template, target, tiny_checkpoints, small_gguf, tmp_path, capsys, monkeypatch
):
    """ENOSPC when the write of ``target`` has written its content: exit 2, one line naming the
    path and the space it needs, and the output folder exactly as before (nothing half-written)."""
    argv = template.format(out=tmp_path, llama=tiny_checkpoints["llama"], gguf=small_gguf).split()
    before = _listing(tmp_path)
    monkeypatch.setenv("RMEXPORT_FAIL_WRITE", target)
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "no space left" in line and target in line, line
    assert float(re.search(r"needs at least ([0-9.]+) (bytes|MiB|GiB)", line).group(1)) > 0
    assert _listing(tmp_path) == before


def test_a_write_that_fills_the_disk_midway_is_removed(tmp_path):
    """ENOSPC raised by the writer itself, half-way through, in each atomic helper."""
    target = tmp_path / "new" / "model.gguf"
    with pytest.raises(DiskFullError, match="needs at least 1.0 MiB"), staged_file(target) as tmp:
        tmp.write_bytes(b"x" * 2**20)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    with (
        pytest.raises(DiskFullError, match=re.escape(str(tmp_path / "new" / "hf"))),
        staged_dir(tmp_path / "new" / "hf"),
    ):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(OSError) as other, staged_file(target):
        raise OSError(errno.EACCES, "permission denied")
    assert not isinstance(other.value, DiskFullError)
    assert not any(tmp_path.iterdir())
    write_json(tmp_path / "ok.json", {"a": 1})  # and the helpers still work
    assert [p.name for p in tmp_path.iterdir()] == ["ok.json"]
    assert not list(tmp_path.glob(STAGING_PREFIX + "*"))
