"""Build a wheel of this checkout the way a site admin does (``pip wheel --no-deps``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO_ROOT


def build_wheel(dest: Path, project: str = ".") -> Path:
    """The wheel of ``project`` (a directory of this checkout with a pyproject.toml: ``.`` is cvmfs-snap, ``devenv``
    the development harness), built from a copy of the sources so the checkout gets no build/ directory."""
    src = dest / "src"
    shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache", "tests", "bench"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest), str(src / project)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dest.glob("*.whl")
    return wheel
