"""Count blob downloads in a docker-registry access log (``registry.log`` of the registry fixtures)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from cvmfs_snap_devenv.registry import blob_gets as all_blob_gets


def blob_gets(log: Path) -> Counter[str]:
    """digest -> how many GETs of that blob the access log shows."""
    return Counter(g.digest for g in all_blob_gets(log))


def settled_blob_gets(log: Path, expected_total: int, wait: float = 10.0) -> Counter[str]:
    """:func:`blob_gets` once at least ``expected_total`` GETs are logged (the registry writes its access log
    after answering, so the last lines may lag the client by a moment), or after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        found = blob_gets(log)
        if sum(found.values()) >= expected_total or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
