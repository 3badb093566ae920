"""End to end: a 128-layer image (containerd's practical maximum), every layer published, pulls through our
snapshotter without a download and runs: the overlay mount of 128 CVMFS layers (each with its whiteout
directories) fits in one page of mount options, and every layer's files, including deletions by upper layers, are
what the container sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_snap.containerd import labels as L
from cvmfs_snap_devenv.images import Entry, Pusher, image, layer
from cvmfs_snap_devenv.registry import Registry, log_mark
from tests.support.e2e import PLUGIN, blob_gets_after, cvmfs_snap_pull, mounted_view, node, publish
from tests.support.runnable import busybox_layer, require_busybox

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DEPTH = 128


def test_128_layer_image_pulls_and_runs(fresh_registry: Registry, short_tmp: Path) -> None:
    require_busybox()
    registry = fresh_registry
    layers = [busybox_layer()]
    for i in range(1, DEPTH):
        entries: list[Entry | tuple[str, bytes] | str] = ["data/", (f"data/l{i:03d}", f"layer {i}\n".encode())]
        if i % 2 == 0:  # every even layer deletes the file of the layer below it: whiteouts at every depth
            entries.append(Entry(f"data/.wh.l{i - 1:03d}"))
        layers.append(layer(entries, codec="zstd" if i % 3 == 0 else "gzip"))
    img = image(layers)
    p = Pusher(registry.url)
    try:
        p.image("e2e/deep", "v1", img)
    finally:
        p.close()
    ref = registry.ref("e2e/deep", "v1")
    repo = short_tmp / "cvmfs"
    publish(repo, ref, insecure_host=registry.host)

    with node(short_tmp / "n", repo, log_level="info") as n:
        mark = log_mark(registry.log)
        _, out = cvmfs_snap_pull(n.containerd, ref)
        assert [lay["outcome"] for lay in out["layers"]] == ["remote"] * DEPTH
        assert sum(blob_gets_after(registry.log, lay.digest, mark) for lay in layers) == 0

        kept = [f"l{i:03d}" for i in range(1, DEPTH) if i % 2 == 0 or i == DEPTH - 1]
        kept = sorted(set(kept))
        # the view containerd would mount: one overlay mount whose options fit in a page (mounted_view checks)
        top = L.chain_ids([lay.diff_id for lay in layers])[-1]
        with mounted_view(n.containerd, PLUGIN, top, "deep-view") as root:
            assert sorted(p.name for p in (root / "data").iterdir()) == kept

        r = n.containerd.ctr("run", "--rm", "--snapshotter", PLUGIN, ref, "e2e-deep", "/bin/sh", "-c",
                             "ls /data | wc -l; cat /data/l126 /data/l127; test ! -e /data/l001 && echo gone",
                             check=False)
        assert r.returncode == 0, r.stderr + n.log()[-3000:]
        assert r.stdout.split("\n") == [str(len(kept)), "layer 126", "layer 127", "gone", ""]
        assert "Traceback" not in n.log()
