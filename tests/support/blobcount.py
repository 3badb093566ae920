"""Count blob downloads in a docker-registry access log (``registry.log`` of the registry fixtures)."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

_BLOB_GET = re.compile(r'"GET /v2/[^ "]+/blobs/(sha256:[0-9a-f]{64}) HTTP')


def blob_gets(log: Path) -> Counter[str]:
    """digest -> how many GETs of that blob the access log shows."""
    found: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        m = _BLOB_GET.search(line)
        if m:
            found[m.group(1)] += 1
    return found


def settled_blob_gets(log: Path, expected_total: int, wait: float = 10.0) -> Counter[str]:
    """:func:`blob_gets` once at least ``expected_total`` GETs are logged (the registry writes its access log
    after answering, so the last lines may lag the client by a moment), or after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        found = blob_gets(log)
        if sum(found.values()) >= expected_total or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
