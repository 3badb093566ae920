"""Run ``cvmfs-snap snapshotter`` as a real process for tests: started here, stopped by PID with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from cvmfs_snap.snapshotter.store import DB_NAME

#: the snapshotter store's SQLite files in its root (they change on every open; the rest of the root must not)
DB_FILES = frozenset({DB_NAME, f"{DB_NAME}-journal", f"{DB_NAME}-wal", f"{DB_NAME}-shm"})


@dataclass
class SnapshotterProcess:
    proc: subprocess.Popen[bytes]
    address: Path
    root: Path
    log: Path


def start_daemon(tmp: Path, *extra: str, root: Path | None = None,
                 address: Path | None = None) -> SnapshotterProcess:
    root = root or tmp / "root"
    address = address or tmp / "run" / "s.sock"
    log = tmp / "daemon.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cvmfs_snap.cli", "snapshotter", "--root", str(root), "--address", str(address),
             *extra],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return SnapshotterProcess(proc, address, root, log)


def wait_ready(sp: SnapshotterProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if sp.proc.poll() is not None:
            raise RuntimeError(f"snapshotter exited: {sp.log.read_text()[-3000:]}")
        if sp.address.exists():
            ch = grpc.insecure_channel(f"unix:{sp.address}")
            try:
                grpc.channel_ready_future(ch).result(timeout=5)
                return
            except grpc.FutureTimeoutError:
                pass
            finally:
                ch.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"snapshotter did not start: {sp.log.read_text()[-3000:]}")
        time.sleep(0.05)


def stop_daemon(sp: SnapshotterProcess) -> int:
    """SIGTERM by PID, wait; SIGKILL the process group if it does not stop. Returns the exit status."""
    if sp.proc.poll() is None:
        os.kill(sp.proc.pid, signal.SIGTERM)
    try:
        return sp.proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(sp.proc.pid, signal.SIGKILL)
        sp.proc.wait()
        raise


@contextmanager
def running_daemon(tmp: Path, *extra: str, root: Path | None = None,
                   address: Path | None = None) -> Iterator[SnapshotterProcess]:
    sp = start_daemon(tmp, *extra, root=root, address=address)
    try:
        wait_ready(sp)
        yield sp
    finally:
        stop_daemon(sp)
