"""A FUSE file system that never answers: how a CVMFS client stuck on dead proxies looks to its users.

Run as a separate process (``python -m tests.support.hangfs MOUNTPOINT``) so the test can kill it by PID; killing it
makes the kernel fail the pending requests (ENOTCONN), which releases the threads blocked in them.
Use :func:`hung_mount` from tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio  # type: ignore[import-untyped]

from cvmfs_snap.lazyfs.fuse import Session


class HangFS:
    """Answers the kernel's INIT, then never anything: the first request blocks the loop for good (the kernel
    queues the later ones), as a CVMFS client waiting on dead proxies does."""

    def init(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        def hang(*args: Any) -> Any:
            threading.Event().wait()
        return hang


def main(mountpoint: str) -> None:
    session = Session(HangFS(), Path(mountpoint), "hangfs", "hangfs")  # type: ignore[arg-type]
    try:
        trio.run(session.serve)
    finally:
        session.close(unmount_it=False)


def _mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


@contextmanager
def hung_mount(mountpoint: Path) -> Iterator[Path]:
    """Mount a HangFS at ``mountpoint`` (never stat it before it is mounted) and tear it down by PID afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.hangfs", str(mountpoint)], cwd=root,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not _mounted(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hangfs did not mount at {mountpoint} (exit status {proc.poll()})")
            time.sleep(0.05)
        yield mountpoint
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


if __name__ == "__main__":
    main(sys.argv[1])
