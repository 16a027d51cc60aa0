"""Files and folders that appear whole or not at all: written beside their target, then renamed.

Every staging entry sits in the target's parent and is named
``.rmexport-staging-<pid>-<target name>.<random>``: recognisable, and tied to the process that
writes it, so a later run can tell a folder a killed process left behind (its pid is gone) from
one another run is still writing. ``remove_stale_staging`` deletes the former. Finished outputs
get the modes the user's umask gives ordinary files and folders (``mkdtemp``/``mkstemp`` make
them private), see ``finalize_modes``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from .errors import DiskFullError
from .hooks import fail_write_point, signal_point

__all__ = [
    "STAGING_PREFIX",
    "disk_full_error",
    "disk_full_guard",
    "existing_ancestor",
    "finalize_modes",
    "is_stale_staging",
    "remove_stale_staging",
    "replace_dir",
    "staged_dir",
    "staged_file",
    "staging_name",
    "umask",
    "write_json",
]

STAGING_PREFIX = ".rmexport-staging-"
_STAGING = re.compile(rf"^{re.escape(STAGING_PREFIX)}(\d+)-")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _size_of(path: Path) -> int:
    """Bytes under ``path`` (a file, or a folder and everything in it); 0 if it is gone."""
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
        return path.lstat().st_size
    except OSError:
        return 0


def _size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def disk_full_error(target: Path, written: int) -> DiskFullError:
    """The one-line error for a write to ``target`` that ran out of space after ``written`` bytes:
    those bytes are the least it needs, beside what is free there now."""
    try:
        free = shutil.disk_usage(target.parent if target.parent.exists() else Path.cwd()).free
    except OSError:
        free = 0
    return DiskFullError(
        f"no space left on the device writing {target}: it needs at least {_size(written)}, "
        f"{_size(free)} free there; nothing was left half-written",
        hint="free some space or write to another folder",
    )


def existing_ancestor(path: Path | str) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (e.g. for a free-space check
    before the output folder is created)."""
    ancestor = Path(path).expanduser().absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


@contextmanager
def disk_full_guard(target: Path, staging: Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) inside the block into DiskFullError for ``target``,
    measuring what ``staging`` held when it happened."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        raise disk_full_error(target, _size_of(staging)) from e


def write_json(path: Path | str, data: Any) -> None:
    """Write ``data`` as indented JSON next to ``path`` and rename it into place, so that a reader
    (or a resumed run) never finds half a file. Values JSON cannot hold are written as strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(data, indent=2, default=str) + "\n"
    try:
        tmp.write_text(text)
        signal_point(f"wrote:{path.name}")
        fail_write_point(path.name, str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        raise disk_full_error(path, len(text.encode())) from e
    finally:
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def finalize_modes(path: Path | str) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a plain ``open``/``mkdir``
    would: folders and executable files 0777 & ~umask, other files 0666 & ~umask. Symlinks are
    left alone."""
    mask = umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask

    def fix(p: Path) -> None:
        if p.is_symlink():
            return
        if p.is_dir():
            os.chmod(p, dir_mode)
        else:
            executable = p.stat().st_mode & 0o100
            os.chmod(p, dir_mode if executable else file_mode)

    path = Path(path)
    fix(path)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                fix(Path(root) / name)


def staging_name(target: Path | str) -> str:
    """Prefix of the staging entries for ``target`` written by this process."""
    return f"{STAGING_PREFIX}{os.getpid()}-{Path(target).name}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def is_stale_staging(path: Path) -> bool:
    """True for a staging entry whose writing process is gone."""
    match = _STAGING.match(path.name)
    return bool(match) and not _pid_alive(int(match.group(1)))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_staging(folder: Path | str) -> list[Path]:
    """Delete the staging entries in ``folder`` that killed processes left; return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if is_stale_staging(entry):
            _remove(entry)
            removed.append(entry)
    return removed


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; return the folders it created, deepest last."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            break


def replace_dir(staged: Path, target: Path) -> None:
    """Move the finished folder ``staged`` to ``target`` (same filesystem), replacing an earlier
    one; the old folder is moved aside first, so ``target`` is never half old, half new."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=staging_name(target) + "old.", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, target)


@contextmanager
def _staged_write(target: Path, tmp: Path, place: Callable[[], None]) -> Iterator[None]:
    """The body writes ``tmp``; then it gets the usual modes and ``place`` puts it onto ``target``.
    A full disk anywhere in between is one ``DiskFullError``; the fault hooks fire at their points."""
    with disk_full_guard(target, tmp):
        signal_point(f"write:{target.name}")
        yield
        signal_point(f"wrote:{target.name}")
        fail_write_point(target.name, str(tmp))
        finalize_modes(tmp)
        place()


@contextmanager
def staged_dir(target: Path | str) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success give it the usual modes and
    put it in place of ``target``; on any exception (KeyboardInterrupt included) remove it, and
    any parent folders created for it."""
    target = Path(target).absolute()
    created = _make_parents(target.parent)
    remove_stale_staging(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=staging_name(target), dir=target.parent))
    try:
        with _staged_write(target, tmp, place=lambda: replace_dir(tmp, target)):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


@contextmanager
def staged_file(target: Path | str) -> Iterator[Path]:
    """Yield a path beside ``target`` to write; on success give it the usual mode and rename it
    onto ``target``. Helpers may write further files named ``<yielded path>.<suffix>``: they are
    removed either way."""
    target = Path(target).absolute()
    created = _make_parents(target.parent)
    remove_stale_staging(target.parent)
    fd, name = tempfile.mkstemp(prefix=staging_name(target), dir=target.parent)
    os.close(fd)
    tmp = Path(name)

    def remove_extras() -> None:
        for extra in tmp.parent.glob(glob_escape(tmp.name) + ".*"):
            _remove(extra)

    try:
        with _staged_write(target, tmp, place=lambda: os.replace(tmp, target)):
            yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_extras()
        _remove_created(created)
        raise
    remove_extras()
