"""Faults on demand at named points of a run, so that tests of interruptions and full disks hit
the moment they name instead of racing the machine. Inert unless their variables are set.

- ``RMEXPORT_SIGNAL_AT=NAME`` (and ``RMEXPORT_SIGNAL=INT|TERM|KILL``, default INT): the process
  signals itself on reaching the first point whose name starts with NAME. Points are the stages
  (``prune``, ``export_gguf_f16``, ``calibrate+fit 1/1``, ``save`` ...) and every atomic write,
  once its staging entry exists (``write:<target name>``) and once its content is written but
  not yet renamed into place (``wrote:<target name>``).
- ``RMEXPORT_FAIL_WRITE=NAME``: the atomic write of a target so named fails with ENOSPC, as a
  full disk would, after its content was written.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["fail_write_point", "signal_point"]


def signal_point(name: str) -> None:
    wanted = os.environ.get("RMEXPORT_SIGNAL_AT")
    if not wanted or not name.startswith(wanted):
        return
    sig = getattr(signal, "SIG" + os.environ.get("RMEXPORT_SIGNAL", "INT").upper())
    os.kill(os.getpid(), sig)


def fail_write_point(target_name: str, staging: str) -> None:
    if os.environ.get("RMEXPORT_FAIL_WRITE") == target_name:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), staging)
