"""The lock shared by publishers and GC: ``<state_dir>/gc.lock``, shared while an image is published, exclusive
while GC sweeps (see :mod:`publisher.gc` for why both are needed)."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cvmfs_snap.errors import UnavailableError

GC_LOCK_NAME = "gc.lock"


@contextmanager
def gc_lock(state_dir: str | os.PathLike[str], *, exclusive: bool, timeout: float = 600.0) -> Iterator[None]:
    """Hold ``<state_dir>/gc.lock``: shared while publishing an image, exclusive while GC sweeps.

    A blocking wait would hang a GC forever behind a busy daemon, so the lock is polled and, after ``timeout``
    seconds, :class:`UnavailableError` says who to wait for.
    """
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / GC_LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    what = "publishing is running" if exclusive else "garbage collection is running"
                    raise UnavailableError(
                        f"could not lock {path} within {timeout:.0f}s: {what}; retry when it has finished"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


__all__ = ["GC_LOCK_NAME", "gc_lock"]
