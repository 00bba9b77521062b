"""Worker processes for decoding many films at once (the decode cache, the audit).

A pool's workers are forked with the parent's open files, the run's training lock among
them, and wait on a pipe the parent's death does not close. A parent killed outright (the
out-of-memory killer, `kill -9`, a full disk's SIGBUS) left them running, holding the lock,
so that resuming the run was refused as "being trained by another process". On Linux each
worker now dies with its parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers do not outlive this process (on Linux)."""
    return ProcessPoolExecutor(workers, initializer=_die_with, initargs=(os.getpid(),))


def _die_with(parent: int) -> None:
    """Killed when the process that started this one ends: the pool's process under fork; a
    forkserver (Python 3.14's default), which itself ends with the pool's process."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:  # the pool's process gone before the line above: nobody would send the signal
        os.kill(parent, 0)
    except ProcessLookupError:
        os._exit(1)
