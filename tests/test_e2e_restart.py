"""End to end: the snapshotter dies (SIGKILL) under a running container whose layers are served from CVMFS, and is
started again on the same root and socket. The container keeps reading its files (containerd mounted them, not us),
and containerd keeps using the restarted snapshotter for new containers of the same image."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from cvmfs_snap_devenv.containerd import start_containerd
from cvmfs_snap_devenv.images import Pusher, image
from cvmfs_snap_devenv.registry import Registry
from tests.support.e2e import PLUGIN, cvmfs_snap_pull, publish, snapshotter_status, write_config
from tests.support.runnable import busybox_layer, data_layer, require_busybox
from tests.support.snapshotter_daemon import start_daemon, stop_daemon, wait_ready
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.timeout(300)]


def test_sigkill_and_restart_under_a_running_container(registry: Registry, short_tmp: Path) -> None:
    require_busybox()
    img = image([busybox_layer(), data_layer("payload", b"served from cvmfs\n" * 100)])
    p = Pusher(registry.url)
    try:
        p.image("e2e/restart", "v1", img)
    finally:
        p.close()
    ref = registry.ref("e2e/restart", "v1")
    repo = short_tmp / "cvmfs"
    publish(repo, ref, insecure_host=registry.host)
    cfg = write_config(short_tmp / "snap.toml", repo)
    args = ("--config", str(cfg), "--log-level", "debug")

    first = start_daemon(short_tmp, *args)
    second = None
    try:
        wait_ready(first)
        with start_containerd(short_tmp / "ctd", proxy_plugins={PLUGIN: str(first.address)}) as cd:
            _, out = cvmfs_snap_pull(cd, ref)
            assert [lay["outcome"] for lay in out["layers"]] == ["remote", "remote"]
            cd.ctr("run", "-d", "--snapshotter", PLUGIN, ref, "e2e-long", "/bin/sleep", "600")
            r = cd.ctr("task", "exec", "--exec-id", "before", "e2e-long", "/bin/sh", "-c", "wc -l < /data/payload")
            assert r.stdout.strip() == "100"

            os.kill(first.proc.pid, signal.SIGKILL)
            assert first.proc.wait(30) == -signal.SIGKILL
            # the container does not depend on the snapshotter process: its overlay mount stays
            r = cd.ctr("task", "exec", "--exec-id", "during", "e2e-long", "/bin/cat", "/data/payload", check=False)
            assert r.returncode == 0 and r.stdout == "served from cvmfs\n" * 100, r.stderr

            second = start_daemon(short_tmp, *args, root=first.root, address=first.address)
            sroot = second.root
            wait_ready(second)
            r = cd.ctr("task", "exec", "--exec-id", "after", "e2e-long", "/bin/sh", "-c",
                       "cat /data/payload | wc -l; cat /etc/hostname", check=False)
            assert r.returncode == 0 and r.stdout.split() == ["100", "cvmfs-snap-test"], r.stderr

            # a new container of the same image goes through the restarted snapshotter (Prepare, Mounts, Remove)
            r = cd.ctr("run", "--rm", "--snapshotter", PLUGIN, ref, "e2e-second", "/bin/sh", "-c",
                       "cat /data/payload | wc -l", check=False)
            assert r.returncode == 0 and r.stdout.strip() == "100", r.stderr + second.log.read_text()[-3000:]
            # the two CVMFS layers and the long-running container's upper dir; containerd's garbage collector
            # removes the --rm container's snapshot shortly after it exits
            expected = [("active", "local"), ("committed", "cvmfs"), ("committed", "cvmfs")]
            wait_for(lambda: sorted((s["kind"], s["source"]) for s in snapshotter_status(sroot)["snapshots"])
                     == expected, f"the snapshotter to hold {expected}")

            # stop the long-running container cleanly; containerd removes its snapshot through the new process
            cd.ctr("task", "kill", "-s", "SIGKILL", "e2e-long")
            cd.ctr("task", "rm", "-f", "e2e-long")
            cd.ctr("containers", "rm", "e2e-long")
            # containerd's garbage collector removes the snapshot from the backend shortly after
            wait_for(lambda: [s["kind"] for s in snapshotter_status(sroot)["snapshots"]] == ["committed"] * 2,
                     "containerd to remove the container's snapshot through the restarted snapshotter")
        assert stop_daemon(second) == 0
        assert "Traceback" not in second.log.read_text()
    finally:
        for sp in (first, second):
            if sp is not None and sp.proc.poll() is None:
                stop_daemon(sp)
