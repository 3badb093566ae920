"""``cvmfs-snap pull`` through a proxy snapshotter that serves layers remotely: the layer blobs are never downloaded
(not in containerd's content store, no blob GET in the registry's access log), and the Prepare labels are exactly
those containerd's own CRI pull path sends (cross-checked with the Go reference ``rpull``).

Uses /work/shared/tools/go-reference ``fakeremote`` and ``rpull``; skipped when they are not built
(``GOREF_BIN=/tmp/go-reference/bin /work/shared/tools/go-reference/build.sh``).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_snap.containerd import labels as L
from cvmfs_snap.containerd.pull import run_pull
from cvmfs_snap.containerd.unpack import Outcome
from cvmfs_snap.labelnames import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    GC_REF_SNAPSHOT,
    SNAPSHOT_REF,
)
from cvmfs_snap_devenv.containerd import Containerd
from cvmfs_snap_devenv.images import BuiltImage, Pusher, image, layer
from cvmfs_snap_devenv.registry import Registry
from tests.support.pullcheck import blob_gets, client, committed, containerd_in_tmp, fakeremote
from tests.support.runnable import goref_bin

pytestmark = pytest.mark.timeout(300)


@dataclass
class Remote:
    cd: Containerd
    log: Path

    def prepares(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def remote() -> Iterator[Remote]:
    binary = goref_bin("fakeremote")
    if binary is None:
        pytest.skip("go-reference fakeremote not built (run /work/shared/tools/go-reference/build.sh)")
    with fakeremote(binary) as (sock, log), containerd_in_tmp(proxy_plugins={"fakeremote": sock}) as cd:
        yield Remote(cd, log)


def _push(reg: Registry, repo: str, n: int = 2) -> tuple[str, BuiltImage]:
    img = image([layer([(f"f{i}", f"{repo} layer {i}".encode() * 100)]) for i in range(n)])
    Pusher(reg.url).image(repo, "v1", img)
    return reg.ref(repo, "v1"), img


def test_remote_layers_are_not_downloaded(fresh_registry: Registry, remote: Remote) -> None:
    ref, img = _push(fresh_registry, "remote/skip", 3)
    res = run_pull(ref, address=remote.cd.address, namespace="skip", snapshotter="fakeremote")
    assert [lay.outcome for lay in res.layers] == [Outcome.REMOTE] * 3
    assert res.downloaded == 0
    chains = L.chain_ids([lay.diff_id for lay in img.layers])
    with client(remote.cd, "skip") as c:
        for lay in img.layers:
            assert c.content_info(lay.digest) is None, "a remote layer's blob reached the content store"
        cfg = c.content_info(img.config_digest)
        assert cfg is not None and cfg.labels[GC_REF_SNAPSHOT + "fakeremote"] == chains[-1]
        rec = c.get_image(ref)
        assert rec is not None and rec.target.digest == img.manifest_digest
    for lay in img.layers:
        assert blob_gets(fresh_registry.log, lay.digest) == 0
    assert blob_gets(fresh_registry.log, img.config_digest) == 1
    snaps = committed(remote.cd, "fakeremote", "skip")
    assert set(snaps) == set(chains)

    # what the snapshotter saw: containerd's unpack key format, the parent chain, the CRI labels
    seen = [p for p in remote.prepares() if isinstance(p["labels"], dict)
            and p["labels"].get(CRI_IMAGE_REF) == ref]
    assert [p["labels"][SNAPSHOT_REF] for p in seen] == chains  # type: ignore[index]
    for i, p in enumerate(seen):
        labels = p["labels"]
        assert isinstance(labels, dict)
        assert labels[CRI_LAYER_DIGEST] == img.layers[i].digest
        assert labels[CRI_MANIFEST_DIGEST] == img.manifest_digest
        assert labels[CRI_IMAGE_LAYERS] == ",".join(x.digest for x in img.layers[i:])
        # containerd's metadata layer prefixes "<namespace>/<id>/" to our key "extract-<unique> <chainID>"
        assert re.fullmatch(r"skip/\d+/extract-\d+-[A-Za-z0-9_-]{4} " + re.escape(chains[i]), str(p["key"]))
        assert p["outcome"] == "remote"


def test_without_cri_labels_layers_are_pulled(fresh_registry: Registry, remote: Remote) -> None:
    ref, img = _push(fresh_registry, "remote/nolabels", 2)
    res = run_pull(ref, address=remote.cd.address, namespace="nolabels", snapshotter="fakeremote",
                   cri_labels=False)
    assert [lay.outcome for lay in res.layers] == [Outcome.PULLED] * 2
    with client(remote.cd, "nolabels") as c:
        for lay in img.layers:
            assert c.content_info(lay.digest) is not None
    for lay in img.layers:
        assert blob_gets(fresh_registry.log, lay.digest) == 1


def test_labels_match_containerd_rpull(registry: Registry, remote: Remote) -> None:
    """containerd's Go client with CRI's label handler (rpull) and our pull hand the snapshotter the same labels."""
    rpull = goref_bin("rpull")
    if rpull is None:
        pytest.skip("go-reference rpull not built")
    ref, img = _push(registry, "remote/crosscheck", 3)
    r = subprocess.run([rpull, "--address", remote.cd.address, "--namespace", "viarpull", "--snapshotter",
                        "fakeremote", "--plain-http", "--json", ref], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    theirs = json.loads(r.stdout)
    assert theirs["layersInContentStore"] == 0
    run_pull(ref, address=remote.cd.address, namespace="viaours", snapshotter="fakeremote")

    def labels_by_chain(ns: str) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for p in remote.prepares():
            lab = p["labels"]
            if isinstance(lab, dict) and lab.get(CRI_IMAGE_REF) == ref and str(p["key"]).startswith(ns + "/"):
                out[lab[SNAPSHOT_REF]] = lab
        return out

    a = labels_by_chain("viarpull")
    b = labels_by_chain("viaours")
    chains = L.chain_ids([lay.diff_id for lay in img.layers])
    assert set(a) == set(chains) and a == b
    assert [lay["chainID"] for lay in theirs["layers"]] == chains
    ours = committed(remote.cd, "fakeremote", "viaours")
    for lay in theirs["layers"]:
        for k, v in lay["snapshotLabels"].items():
            if k.startswith("containerd.io/snapshot"):
                assert ours[lay["chainID"]].labels.get(k) == v, k
