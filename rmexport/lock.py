"""One live run per output folder: an advisory lock file holding the writer's PID.

The lock is ``fcntl.flock`` on ``<folder>/.rmexport.lock``: the kernel releases it when its
process dies however it dies, so a lock a killed run left behind is simply taken over, and the
PID written in the file only serves the message naming the holder.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputBusyError

__all__ = ["LOCK_NAME", "check_not_held", "hold_folder"]

LOCK_NAME = ".rmexport.lock"


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "an unknown process"


def _busy(folder: Path, lock: Path, option: str) -> OutputBusyError:
    return OutputBusyError(
        f"{option} {folder} is in use by another rmexport run ({_holder(lock)})",
        hint="wait for that run to finish, or choose another output folder",
    )


def check_not_held(folder: Path | str, option: str = "output folder") -> None:
    """OutputBusyError if a live process holds ``folder``; creates nothing."""
    lock = Path(folder) / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return  # no lock file (or no folder): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(Path(folder), lock, option) from None
    finally:
        os.close(fd)


@contextmanager
def hold_folder(folder: Path | str, option: str = "output folder") -> Iterator[None]:
    """Hold ``folder`` (created if missing) for this process while the block runs; raise
    OutputBusyError, naming the holder's PID, if a live process holds it. On exit the lock file
    is removed, and the folders made for it too, as far as they are empty."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _remove_if_empty(made)
            raise _busy(folder, lock, option) from None
        # The holder we waited on may have removed the file between our open and our lock:
        # then we hold a lock nobody else can see, and must lock the file now at that path.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
        _remove_if_empty(made)


def _remove_if_empty(made: list[Path]) -> None:
    """Remove the folders made for the lock, deepest first, as far as they are empty."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return
