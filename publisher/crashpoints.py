"""Named points where a test can have the publisher killed with SIGKILL (crash-safety tests).

``CVMFS_SNAP_PUBLISHER_CRASH_AT=<point>[:<n>]`` kills the process the n-th time (default first) execution reaches
``crash_point(<point>)``. Unset (always, in production) it costs one string comparison. Points are placed between
the steps whose order makes the publisher crash-safe, so the test can prove that every interruption is harmless.

Layer worker processes (:mod:`publisher.workers`) count together with the publisher (one shared counter), and a
point reached in a worker kills the publisher first, then the worker: what ``kill -9`` of the whole service does.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # multiprocessing.sharedctypes costs 10 ms of imports that only crash tests need
    from multiprocessing.context import BaseContext
    from multiprocessing.sharedctypes import Synchronized

ENV = "CVMFS_SNAP_PUBLISHER_CRASH_AT"
_SPEC = os.environ.get(ENV, "")
_lock = threading.Lock()
_counts: dict[str, int] = {}
_shared: Synchronized[int] | None = None  # the armed point's count, shared with worker processes
_publisher_pid: int | None = None  # set in worker processes: the publisher to kill first


class SharedState(NamedTuple):
    counter: Synchronized[int]
    publisher_pid: int


def crash_point(name: str) -> None:
    if not _SPEC:
        return
    point, _, nth = _SPEC.partition(":")
    if point != name:
        return
    with _lock:
        if _shared is not None:
            with _shared.get_lock():
                _shared.value += 1
                n = _shared.value
        else:
            _counts[name] = n = _counts.get(name, 0) + 1
        if n == int(nth or 1):
            if _publisher_pid is not None:
                os.kill(_publisher_pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


def share_with_workers(ctx: BaseContext) -> SharedState | None:
    """In the publisher, before starting worker processes: the state they need (None when no point is armed)."""
    global _shared
    if not _SPEC:
        return None
    with _lock:
        if _shared is None:
            point = _SPEC.partition(":")[0]
            _shared = ctx.Value("i", _counts.get(point, 0))
        return SharedState(_shared, os.getpid())


def join_from_worker(state: SharedState | None) -> None:
    """In a worker process: count with the publisher and kill it too."""
    global _shared, _publisher_pid
    if state is not None:
        _shared, _publisher_pid = state.counter, state.publisher_pid
