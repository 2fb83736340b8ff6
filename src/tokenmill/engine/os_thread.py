"""The engine's step thread under a name of its own in the operating system.

Linux gives every thread of a process the process's name, so ``top -H``,
``ps -L`` and ``/proc/PID/task/*/comm`` show a serving process as a row of
identical ``tokenmill`` threads. Naming the step thread ``ENGINE_THREAD``
before it runs a kernel also names the OpenMP team torch starts from it (a new
thread takes its creator's name), so the engine's CPU can be told from the
front's: the event loop, gRPC's threads and the tokenizer stay ``tokenmill``.
"""

from __future__ import annotations

import ctypes
import sys

ENGINE_THREAD = "tm-engine"
_PR_SET_NAME = 15  # prctl(2); the kernel keeps 15 bytes of the name
_NAME_BYTES = 15


def name_this_thread(name: str) -> bool:
    """Give the calling thread ``name`` (its first 15 bytes) in the OS; False where it cannot be
    set (not Linux, no C library found). Python's own thread name is not changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_NAME, name.encode()[:_NAME_BYTES], 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
