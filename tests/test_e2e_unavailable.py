"""End to end: the CVMFS repository is not there (never mounted, or gone under a running snapshotter). Images still
pull, every layer the normal way; the snapshotter says so in its log once, keeps serving, and a container that needs
a layer from the missing repository fails with an error naming the repository instead of hanging."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_snap_devenv.images import BuiltImage, Pusher, image
from cvmfs_snap_devenv.registry import Registry, log_mark
from tests.support.e2e import PLUGIN, Node, blob_gets_after, cvmfs_snap_pull, node, publish
from tests.support.runnable import busybox_layer, data_layer, require_busybox

pytestmark = [pytest.mark.timeout(300)]

UNAVAILABLE_LINE = "is unavailable"


def outage_lines(n: Node) -> list[str]:
    """Log lines at warning level or above reporting the repository unavailable (per-layer debug lines aside)."""
    return [line for line in n.log().splitlines()
            if UNAVAILABLE_LINE in line and (" ERROR " in line or " WARNING " in line)]


def push(registry: Registry, name: str, payload: bytes, codec: str) -> tuple[str, BuiltImage]:
    """A runnable image sharing no chain ID (data layer first) and, with its own ``codec``, no blob with others."""
    img = image([data_layer("file", payload, codec), busybox_layer(codec)])
    p = Pusher(registry.url)
    try:
        p.image(name, "v1", img)
    finally:
        p.close()
    return registry.ref(name, "v1"), img


def pull_normally(n: Node, registry: Registry, ref: str, img: BuiltImage, namespace: str) -> None:
    """Pull must work, every layer downloaded; the image runs."""
    mark = log_mark(registry.log)
    _, out = cvmfs_snap_pull(n.containerd, ref, namespace=namespace)
    assert [lay["outcome"] for lay in out["layers"]] == ["pulled"] * len(img.layers), out
    for lay in img.layers:
        assert blob_gets_after(registry.log, lay.digest, mark) == 1
    r = n.containerd.ctr("run", "--rm", "--snapshotter", PLUGIN, ref, f"e2e-unav-{namespace}", "/bin/cat",
                         "/data/file", namespace=namespace, check=False)
    assert r.returncode == 0, r.stderr + n.log()[-3000:]


def test_repository_never_mounted(fresh_registry: Registry, short_tmp: Path) -> None:
    require_busybox()
    ref1, img1 = push(fresh_registry, "e2e/unav1", b"one\n", "gzip")
    ref2, img2 = push(fresh_registry, "e2e/unav2", b"two\n", "zstd")
    with node(short_tmp / "n", short_tmp / "no" / "such" / "repository") as n:
        pull_normally(n, fresh_registry, ref1, img1, "one")
        pull_normally(n, fresh_registry, ref2, img2, "two")
        assert n.snapshotter.proc.poll() is None, "the snapshotter died"
        lines = outage_lines(n)
        assert len(lines) == 1, lines  # logged once for the whole outage, not per layer or per pull
        assert str(short_tmp / "no" / "such" / "repository") in lines[0] and "ENOENT" in lines[0]
        assert "Traceback" not in n.log()


def test_repository_disappears_under_running_snapshotter(fresh_registry: Registry, short_tmp: Path) -> None:
    require_busybox()
    ref1, _ = push(fresh_registry, "e2e/gone1", b"one\n", "gzip")
    ref2, img2 = push(fresh_registry, "e2e/gone2", b"two\n", "zstd")
    repo = short_tmp / "cvmfs"
    publish(repo, ref1, insecure_host=fresh_registry.host)
    publish(repo, ref2, insecure_host=fresh_registry.host)
    with node(short_tmp / "n", repo) as n:
        _, out = cvmfs_snap_pull(n.containerd, ref1)
        assert [lay["outcome"] for lay in out["layers"]] == ["remote", "remote"]

        repo.rename(short_tmp / "away")
        # published, but the repository is gone: pulled normally (namespace "two": nothing shared with ref1)
        pull_normally(n, fresh_registry, ref2, img2, "two")
        # a container of the image served from the vanished repository fails, naming it, and does not hang
        r = n.containerd.ctr("run", "--rm", "--snapshotter", PLUGIN, ref1, "e2e-gone-1", "/bin/true", check=False,
                             timeout=120)
        assert r.returncode != 0
        assert str(repo) in r.stderr, r.stderr
        assert n.snapshotter.proc.poll() is None, "the snapshotter died"
        assert len(outage_lines(n)) <= 1

        # the repository comes back: the image that needs it runs again
        (short_tmp / "away").rename(repo)
        r = n.containerd.ctr("run", "--rm", "--snapshotter", PLUGIN, ref1, "e2e-gone-2", "/bin/cat", "/data/file",
                             check=False)
        assert r.returncode == 0 and r.stdout == "one\n", r.stderr + n.log()[-3000:]
        assert "Traceback" not in n.log()
