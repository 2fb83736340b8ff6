"""One gateway per ledger file: an exclusive lock on ``<ledger>.lock``, held for the life of the
process and let go by the kernel when it ends, however it ends."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def lock_ledger(path: Path) -> int | None:
    """Take the lock of the ledger at ``path``: the lock file's descriptor, to close to let go
    (None where the platform has no flock). Raises ValueError naming both files if another
    process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one gateway per ledger is then the operator's to keep
        logger.warning("cannot lock %s on this platform: run one gateway per ledger", path)
        return None
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"the ledger {path} is in use by another running gateway (lock {lock}); "
            "give each gateway its own ledger"
        ) from None
    return fd
