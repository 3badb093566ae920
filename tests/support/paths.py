"""Where things live: the repository, and the shared harness folder beside it (CI lays a copy of shared/ next to the
clone; sessions have it at /work/shared)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path | None:
    """The shared/ folder with the Go harnesses, or None when it is not there (tests that need it skip)."""
    candidates = [os.environ.get("CVMFS_SNAP_SHARED", ""), str(REPO_ROOT.parent / "shared"), "/work/shared"]
    for c in candidates:
        if c and (Path(c) / "tools").is_dir():
            return Path(c)
    return None
