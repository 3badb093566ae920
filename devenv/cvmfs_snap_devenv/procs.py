"""Stopping what the demo and tests started: processes by PID (never by name: other daemons of the same program may
run on the host), and mounts below a directory they own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from cvmfs_snap.lazyfs.control import PID
from cvmfs_snap.snapshotter.mountinfo import unescape


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 10.0, group: bool = True) -> int:
    """SIGTERM ``proc`` (its whole process group when ``group``: it was started with ``start_new_session``), wait up
    to ``timeout`` seconds, then SIGKILL the group. Returns the exit status."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()
    return proc.returncode


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    base = os.path.realpath(path)
    found: list[str] = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 2:
                continue
            mp = unescape(fields[1])
            if mp == base or mp.startswith(base + "/"):
                found.append(mp)
    return sorted(found, key=len, reverse=True)


def unmount_below(path: Path) -> None:
    """Lazily unmount everything mounted at or below ``path`` (best effort)."""
    for mp in mounts_below(path):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


def stop_pid_file(pid_file: Path, *, timeout: float = 10.0) -> None:
    """SIGTERM the process whose pid ``pid_file`` holds (e.g. the lazyfs process a snapshotter started in its own
    session, ``<root>/lazy/lazyfs.pid``), wait up to ``timeout`` s, then SIGKILL it. Missing file or process: no-op."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(int(timeout / 0.05)):
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_lazyfs(lazy_root: Path) -> None:
    """Stop the lazyfs process of a snapshotter's ``<root>/lazy`` and unmount whatever it left below it."""
    stop_pid_file(lazy_root / PID)
    unmount_below(lazy_root)
