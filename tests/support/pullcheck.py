"""Helpers for the pull/CRI tests: a short-path containerd, registry access-log counting, containerd state queries
through our own client (content store, snapshots, image records)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from cvmfs_snap.containerd.client import ContainerdClient, SnapshotInfo
from cvmfs_snap.fsutil import remove_tree_quietly
from cvmfs_snap_devenv.containerd import Containerd, start_containerd
from cvmfs_snap_devenv.procs import stop_process, unmount_below
from cvmfs_snap_devenv.registry import blob_gets as all_blob_gets


@contextmanager
def containerd_in_tmp(proxy_plugins: Mapping[str, str] | None = None, cri_snapshotter: str | None = None,
                      insecure_registries: list[str] | None = None) -> Iterator[Containerd]:
    """A private containerd under a fresh short /tmp directory (socket paths must stay short)."""

    d = Path(tempfile.mkdtemp(prefix="cs-pull-", dir="/tmp"))
    try:
        with start_containerd(d / "c", proxy_plugins=proxy_plugins, cri_snapshotter=cri_snapshotter,
                              insecure_registries=insecure_registries) as cd:
            yield cd
    finally:
        unmount_below(d)
        remove_tree_quietly(d)


def blob_gets(log: Path, digest: str) -> int:
    """How many GET requests for blob ``digest`` the docker-registry access log shows."""
    return sum(1 for g in all_blob_gets(log) if g.digest == digest)


def client(cd: Containerd, namespace: str = "default") -> ContainerdClient:
    return ContainerdClient(cd.address, namespace)


COMMITTED, ACTIVE = 3, 2


def snapshots(cd: Containerd, snapshotter: str, namespace: str = "default") -> dict[str, SnapshotInfo]:
    """name -> info of every snapshot of ``snapshotter`` in ``namespace`` (containerd's metadata view)."""
    with client(cd, namespace) as c:
        return {s.name: s for s in c.list_snapshots(snapshotter)}


def committed(cd: Containerd, snapshotter: str, namespace: str = "default") -> dict[str, SnapshotInfo]:
    return {k: v for k, v in snapshots(cd, snapshotter, namespace).items() if v.kind == COMMITTED}


def active(cd: Containerd, snapshotter: str, namespace: str = "default") -> list[str]:
    return [k for k, v in snapshots(cd, snapshotter, namespace).items() if v.kind == ACTIVE]


@contextmanager
def fakeremote(binary: str, remote: bool = True) -> Iterator[tuple[str, Path]]:
    """Run go-reference's ``fakeremote`` proxy snapshotter; yields (socket, prepare log). Killed by PID."""
    import subprocess
    import time

    d = Path(tempfile.mkdtemp(prefix="cs-fr-", dir="/tmp"))
    sock, log = d / "fr.sock", d / "prepare.jsonl"
    with open(d / "stderr", "wb") as errf:
        proc = subprocess.Popen([binary, "--address", str(sock), "--root", str(d / "root"), "--log", str(log),
                                 f"--remote={'true' if remote else 'false'}"],
                                stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fakeremote did not start: {(d / 'stderr').read_text()[-2000:]}")
            time.sleep(0.05)
        yield str(sock), log
    finally:
        stop_process(proc)
        unmount_below(d)
        remove_tree_quietly(d)
