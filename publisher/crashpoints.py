"""Named points where a test can have the publisher killed with SIGKILL (crash-safety tests).

``CVMFS_SNAP_PUBLISHER_CRASH_AT=<point>[:<n>]`` kills the process the n-th time (default first) execution reaches
``crash_point(<point>)``. Unset (always, in production) it costs one string comparison. Points are placed between
the steps whose order makes the publisher crash-safe, so the test can prove that every interruption is harmless.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "CVMFS_SNAP_PUBLISHER_CRASH_AT"
_SPEC = os.environ.get(ENV, "")
_lock = threading.Lock()
_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    if not _SPEC:
        return
    point, _, nth = _SPEC.partition(":")
    if point != name:
        return
    with _lock:
        _counts[name] = n = _counts.get(name, 0) + 1
        if n == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
