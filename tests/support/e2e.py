"""Helpers for the node end-to-end tests (tests/test_e2e_*.py).

The whole data path with real processes: publish an image with ``cvmfs-snap-publisher convert-single-image --backend
local`` into a directory that stands for ``/cvmfs/<repo>``, run ``cvmfs-snap snapshotter`` as a proxy plugin of a
private containerd, pull with ``cvmfs-snap pull``, and look at the result the way a container would: mount a view of
the image's top snapshot and list it entry by entry
(:func:`tests.support.trees.view_listing`), so two snapshotters can be compared.

Everything here starts processes by PID and unmounts only what it mounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_snap.snapshotter.defaults import PROXY_PLUGIN
from cvmfs_snap_devenv.containerd import Containerd, start_containerd
from cvmfs_snap_devenv.registry import blob_gets
from tests.support.snapshotter_daemon import SnapshotterProcess, running_daemon

PLUGIN = PROXY_PLUGIN
REPO_NAME = "unpacked.test.ch"
#: xattrs the kernel's overlayfs keeps for itself: they describe how a tree is stacked, not the image


def publish(root: Path, ref: str, *, insecure_host: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``cvmfs-snap-publisher convert-single-image --backend local`` of ``ref`` into ``root``; fails the caller
    with the publisher's output if it does not exit 0."""
    r = subprocess.run(
        [sys.executable, "-m", "publisher.cli", "convert-single-image", "--backend", "local", "--root", str(root),
         "--repo", REPO_NAME, "--insecure-registry", insecure_host, "--skip-flat", "--no-progress", ref],
        capture_output=True, text=True, timeout=timeout,
    )
    if r.returncode != 0:
        raise AssertionError(f"publishing {ref} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n"
                             f"{r.stderr[-4000:]}")
    return r


def cvmfs_snap_pull(cd: Containerd, ref: str, *, snapshotter: str = PLUGIN, namespace: str = "default",
                    check: bool = True, timeout: float = 600) -> tuple[subprocess.CompletedProcess[str],
                                                                     dict[str, Any]]:
    """``cvmfs-snap pull --json`` through ``cd``; returns the process and its parsed JSON (empty if it failed)."""
    r = subprocess.run(
        [sys.executable, "-m", "cvmfs_snap.cli", "pull", "--address", cd.address, "--namespace", namespace,
         "--snapshotter", snapshotter, "--plain-http", "--json", ref],
        capture_output=True, text=True, timeout=timeout,
    )
    if r.returncode != 0:
        if check:
            raise AssertionError(f"cvmfs-snap pull {ref} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
        return r, {}
    out: dict[str, Any] = json.loads(r.stdout)
    return r, out


def write_config(path: Path, mountpoint: Path, extra: str = "") -> Path:
    path.write_text(f'repository = "{REPO_NAME}"\nabsolute-mountpoint = "{mountpoint}"\n{extra}')
    return path


@dataclass
class Node:
    """A worker node: our snapshotter daemon and a containerd that uses it as proxy plugin ``cvmfs-snapshotter``."""

    snapshotter: SnapshotterProcess
    containerd: Containerd
    repo: Path  # the directory standing for /cvmfs/<repo>
    config: Path

    def log(self) -> str:
        return self.snapshotter.log.read_text(errors="replace")


@contextmanager
def node(tmp: Path, repo: Path, *, log_level: str = "debug") -> Iterator[Node]:
    """Start the snapshotter (config: ``absolute-mountpoint = repo``) and a private containerd in ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = write_config(tmp / "snap.toml", repo)
    with running_daemon(tmp, "--config", str(cfg), "--log-level", log_level) as sp, \
            start_containerd(tmp / "ctd", proxy_plugins={PLUGIN: str(sp.address)}) as cd:
        yield Node(sp, cd, repo, cfg)


PAGE_SIZE = os.sysconf("SC_PAGESIZE")


def compact_lowerdirs(options: list[str]) -> tuple[str | None, list[str]]:
    """What containerd 1.6's ``mount.All`` does with overlay options that approach a page (mount_linux.go,
    ``compactLowerdirOption``): lowerdirs relative to the parent of their longest common prefix, mounted from
    there. Returns (directory to mount from or None, options)."""
    if len(",".join(options)) < PAGE_SIZE - 512:
        return None, options
    idx = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if idx == -1:
        return None, options
    dirs = options[idx][len("lowerdir="):].split(":")
    if len(dirs) == 1:
        return None, options
    common = os.path.commonprefix(dirs)  # noqa: RUF071 - string prefix on purpose, as containerd does
    if not common:
        return None, options
    common = os.path.dirname(common)
    if common in ("", "/"):
        return None, options
    common += "/"
    rel = [d[len(common):] for d in dirs]
    return common, [*options[:idx], *options[idx + 1:], "lowerdir=" + ":".join(rel)]


@contextmanager
def mounted_view(cd: Containerd, snapshotter: str, parent: str, key: str) -> Iterator[Path]:
    """Mount a read-only view of the committed snapshot ``parent`` (an image's top chain ID) the way containerd
    would mount it for a container; yields the mount point. The view and the mount are removed afterwards."""
    r = cd.ctr("snapshots", "--snapshotter", snapshotter, "view", "--mounts", key, parent, check=False)
    if r.returncode != 0:
        raise AssertionError(f"ctr snapshots view {key} {parent} on {snapshotter} failed: {r.stderr}")
    mounts = json.loads(r.stdout)
    target = Path(tempfile.mkdtemp(prefix="cs-view-", dir="/tmp"))
    done: list[Path] = []
    try:
        for m in mounts:
            mtype = m.get("Type") or m.get("type")
            source = m.get("Source") or m.get("source")
            options = list(m.get("Options") or m.get("options") or [])
            if mtype == "bind":
                flags = ["--rbind"] if "rbind" in options else ["--bind"]
                subprocess.run(["mount", *flags, source, str(target)], check=True, capture_output=True)
                done.append(target)
                if "ro" in options:
                    subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True,
                                   capture_output=True)
            else:
                cwd, options = compact_lowerdirs(options) if mtype == "overlay" else (None, options)
                opts = ",".join(options)
                if len(opts) >= PAGE_SIZE:
                    raise AssertionError(f"mount options of {parent} do not fit in a page even as containerd "
                                         f"compacts them ({len(opts)} bytes)")
                r2 = subprocess.run(["mount", "-t", mtype, source, str(target), "-o", opts], capture_output=True,
                                    text=True, cwd=cwd)
                if r2.returncode != 0:
                    raise AssertionError(f"mount -t {mtype} failed: {r2.stderr}\noptions: {opts}")
                done.append(target)
        yield target
    finally:
        for t in reversed(done):
            subprocess.run(["umount", str(t)], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            target.rmdir()
        cd.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, check=False)


def snapshotter_status(root: Path) -> dict[str, Any]:
    """``cvmfs-snap status --json`` of a snapshotter root (read-only, safe while the daemon runs)."""
    r = subprocess.run([sys.executable, "-m", "cvmfs_snap.cli", "status", "--root", str(root), "--json"],
                       capture_output=True, text=True, check=True, timeout=60)
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def blob_gets_after(log: Path, digest: str, mark: int) -> int:
    """How many GETs of blob ``digest`` the docker-registry access log shows after byte offset ``mark``."""
    return sum(1 for g in blob_gets(log, mark) if g.digest == digest)


def blob_bytes_after(log: Path, mark: int) -> tuple[int, int]:
    """(count, bytes) of blob GETs answered after byte offset ``mark`` of a docker-registry access log."""
    gets = blob_gets(log, mark)
    return len(gets), sum(g.size for g in gets)


