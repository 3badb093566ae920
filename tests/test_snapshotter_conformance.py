"""containerd's own snapshotter test suite (containerd 1.6.20 snapshots/testsuite) against our daemon, through
containerd's proxy client, with the harness in shared/tools/snapshotter-conformance."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.paths import shared_dir
from tests.support.snapshotter_daemon import running_daemon


def harness() -> Path | None:
    shared = shared_dir()
    if shared is not None and (shared / "tools/snapshotter-conformance/run.sh").is_file():
        return shared / "tools/snapshotter-conformance/run.sh"
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_containerd_snapshotter_conformance(short_tmp: Path) -> None:
    run = harness()
    if run is None:
        pytest.skip("snapshotter-conformance harness not found (shared/tools/snapshotter-conformance)")
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (golang-go): cannot build containerd's test suite")
    if os.geteuid() != 0:
        pytest.skip("the conformance suite mounts snapshots and must run as root")
    with running_daemon(short_tmp, "--config", "/dev/null") as sp:
        r = subprocess.run(["bash", str(run), str(sp.address)], capture_output=True, text=True, timeout=840,
                           env={**os.environ, "CONFORMANCE_TIMEOUT": "10m"})
    out = r.stdout + r.stderr
    assert "conformance: 20 passed, 0 failed" in out, out[-5000:]
    assert r.returncode == 0, out[-5000:]
    assert "Traceback" not in sp.log.read_text(), sp.log.read_text()[-5000:]
