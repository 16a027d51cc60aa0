"""One live run per output folder: a second one is refused naming the holder's PID; a lock left
by a dead process is taken over."""

from __future__ import annotations

import pytest

from rmexport.cli import main
from rmexport.errors import OutputBusyError
from rmexport.lock import LOCK_NAME, hold_folder

from .test_cli_fuzz import PRUNE_FAST, RUN_FAST, hold_in_child, one_line_error


def test_second_run_names_the_holder_and_a_dead_lock_is_taken_over(tiny_checkpoints, tmp_path, capsys):
    root = tmp_path / "runs"
    run_dir = root / "llama-r0.25"
    argv = [
        "run",
        str(tiny_checkpoints["llama"]),
        "--out-root",
        str(root),
        *RUN_FAST.split(),
        "--ratio",
        "0.25",
    ]
    holder = hold_in_child(run_dir)
    try:
        assert main(argv) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"PID {holder.pid}" in line and str(run_dir) in line
        # The pipeline's own lock refuses too, were the checks skipped (a race between them).
        with pytest.raises(OutputBusyError, match=f"PID {holder.pid}"), hold_folder(run_dir):
            pass
    finally:
        holder.kill()
        holder.wait()
    # The killed holder's lock file is still there, with its PID: taken over, not refused.
    assert (run_dir / LOCK_NAME).read_text().strip() == str(holder.pid)
    assert main(argv) in (0, 1)
    capsys.readouterr()
    assert (run_dir / "report.json").is_file() and not (run_dir / LOCK_NAME).exists()


def test_a_prune_into_a_held_folder_is_refused_and_its_lock_goes_when_it_ends(
    tiny_checkpoints, tmp_path, capsys
):
    out = tmp_path / "pruned"
    argv = ["prune", str(tiny_checkpoints["llama"]), "--out", str(out), *PRUNE_FAST.split()]
    holder = hold_in_child(out)
    try:
        assert main(argv) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"PID {holder.pid}" in line and "--out" in line
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0
    capsys.readouterr()
    assert (out / "prune.json").is_file() and not (out / LOCK_NAME).exists()
