"""The README's main job (`scripts/demo` -> `cvmfs-snap demo`) runs end to end and cleans up after itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT


@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="busybox-static is not installed")
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    before = set(Path("/tmp").glob("csd-*"))
    r = subprocess.run([sys.executable, "-m", "cvmfs_snap.cli", "demo", "--data-mib", "4"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "hello from a layer served by CVMFS" in out
    assert "deleted file: gone" in out
    assert "container output identical to the native pull: yes" in out
    # the published layers were not downloaded by the node: only the config blob (a few hundred bytes)
    ours = next(line for line in out.splitlines() if "pull with cvmfs-snap" in line)
    assert "1 blobs / 0.00 MiB" in ours, ours
    # everything it made is gone (work dir, mounts)
    assert set(Path("/tmp").glob("csd-*")) == before
    assert "/tmp/csd-" not in Path("/proc/mounts").read_text()
