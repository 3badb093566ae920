"""End to end on one node: a published image, an unpublished one and a mixed one (base layers published, the top
layer not) all pull with ``cvmfs-snap pull`` through our snapshotter and run under runc. The registry's access log
proves what was downloaded: never a published layer, always an unpublished one."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_snap_devenv.images import BuiltImage, Pusher, image
from cvmfs_snap_devenv.registry import Registry, log_mark
from tests.support.e2e import PLUGIN, blob_gets_after, cvmfs_snap_pull, node, publish, snapshotter_status
from tests.support.runnable import busybox_layer, data_layer, require_busybox

pytestmark = [pytest.mark.timeout(300)]


def test_published_unpublished_and_mixed_images(fresh_registry: Registry, short_tmp: Path) -> None:
    require_busybox()
    registry = fresh_registry
    bb = busybox_layer()
    published = image([bb, data_layer("a", b"published a\n")])
    # busybox on top of another layer: other chain IDs, other blob (zstd), nothing of it is in the repository
    unpublished = image([data_layer("b", b"unpublished b\n"), busybox_layer("zstd")])
    # the published image plus one more layer: its base is served from CVMFS, its top is downloaded
    mixed = image([*published.layers, data_layer("c", b"mixed top c\n", codec="zstd")])
    imgs: dict[str, BuiltImage] = {"published": published, "unpublished": unpublished, "mixed": mixed}
    p = Pusher(registry.url)
    try:
        for name, img in imgs.items():
            p.image(f"e2e/{name}", "v1", img)
    finally:
        p.close()
    refs = {name: registry.ref(f"e2e/{name}", "v1") for name in imgs}
    repo = short_tmp / "cvmfs"
    publish(repo, refs["published"], insecure_host=registry.host)

    with node(short_tmp / "n", repo) as n:
        mark = log_mark(registry.log)
        outcomes = {}
        for name in ("published", "unpublished", "mixed"):
            # one namespace each: containerd keeps snapshots per namespace, so no image finds another's layers
            _, out = cvmfs_snap_pull(n.containerd, refs[name], namespace=name)
            outcomes[name] = [lay["outcome"] for lay in out["layers"]]
        assert outcomes == {"published": ["remote", "remote"], "unpublished": ["pulled", "pulled"],
                            "mixed": ["remote", "remote", "pulled"]}

        for lay in published.layers:
            assert blob_gets_after(registry.log, lay.digest, mark) == 0, f"published {lay.digest} was downloaded"
        for lay in [*unpublished.layers, mixed.layers[-1]]:
            assert blob_gets_after(registry.log, lay.digest, mark) == 1, f"unpublished {lay.digest}"

        expected = {"published": "published a\n", "unpublished": "unpublished b\n",
                    "mixed": "published a\nmixed top c\n"}
        for name, text in expected.items():
            r = n.containerd.ctr("run", "--rm", "--snapshotter", PLUGIN, refs[name], f"e2e-mixed-{name}",
                                 "/bin/sh", "-c", "cat /data/*; cat /etc/hostname", namespace=name, check=False)
            assert r.returncode == 0, f"{name}: {r.stderr}\n{n.log()[-3000:]}"
            assert r.stdout == text + "cvmfs-snap-test\n", name

        st = snapshotter_status(n.snapshotter.root)
        by_source = st["counts"]["committed_by_source"]
        # remote snapshots are named by chain ID in the snapshotter (containerd links them into each namespace),
        # so published and mixed share 2; local ones are unpacked per namespace: 2 (unpublished) + 1 (mixed top)
        assert by_source == {"cvmfs": 2, "local": 3}, st["counts"]
        assert "Traceback" not in n.log()
