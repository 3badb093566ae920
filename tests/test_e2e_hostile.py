"""End to end: a Prepare whose layer labels are hostile (a digest that walks out of the repository, another
algorithm, a malformed digest) is refused with InvalidArgument, both through containerd's snapshot API (as a client
of containerd would send it) and on our socket directly, and nothing is created: no snapshot record in containerd or
in the snapshotter, no directory, nothing read or written outside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from cvmfs_snap.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from cvmfs_snap.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from cvmfs_snap.labelnames import CRI_LAYER_DIGEST, SNAPSHOT_LAYER_DIGEST, SNAPSHOT_REF
from tests.support.e2e import PLUGIN, node, snapshotter_status
from tests.support.trees import names

pytestmark = [pytest.mark.timeout(180)]

CHAIN = "sha256:" + "c" * 64
HOSTILE = [
    (CRI_LAYER_DIGEST, "sha256:../../etc"),
    (CRI_LAYER_DIGEST, "sha256:../../../../../../../../etc/passwd"),
    (CRI_LAYER_DIGEST, "md5:d41d8cd98f00b204e9800998ecf8427e"),
    (CRI_LAYER_DIGEST, "sha256:" + "A" * 64),
    (CRI_LAYER_DIGEST, "sha256:" + "a" * 63 + "/"),
    (CRI_LAYER_DIGEST, "../.layers"),
    (SNAPSHOT_LAYER_DIGEST, "sha256:../../etc"),
]


def test_hostile_layer_labels_are_refused(short_tmp: Path) -> None:
    repo = short_tmp / "cvmfs"
    (repo / ".layers").mkdir(parents=True)
    # what a traversal from .layers/<xx>/<digest>/layerfs would reach if the digest were used as a path
    (repo / "etc").mkdir()
    (repo / "etc" / "layerfs").mkdir()
    with node(short_tmp / "n", repo) as n:
        snap_root = n.snapshotter.root
        repo_before = names(repo)
        snaps_before = sorted(os.listdir(snap_root / "snapshots"))
        ctd = grpc.insecure_channel(f"unix://{n.containerd.address}")
        ours = grpc.insecure_channel(f"unix://{n.snapshotter.address}")
        try:
            via_containerd = pb_grpc.SnapshotsStub(ctd)
            direct = pb_grpc.SnapshotsStub(ours)
            md = [("containerd-namespace", "default")]
            for i, (label, value) in enumerate(HOSTILE):
                labels = {SNAPSHOT_REF: CHAIN, label: value}
                ways = [("containerd", via_containerd, md), ("direct", direct, None)]
                if not label.startswith("containerd.io/snapshot/"):
                    ways = ways[1:]  # containerd passes only containerd.io/snapshot/* labels on to a snapshotter
                for how, stub, meta in ways:
                    key = f"hostile-{how}-{i}"
                    with pytest.raises(grpc.RpcError) as ei:
                        stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=PLUGIN, key=key, labels=labels),
                                     metadata=meta, timeout=30)
                    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (how, value, ei.value.details())
                    details = ei.value.details() or ""
                    assert value[:20] in details, details  # names the offending label

            # nothing was created, anywhere
            assert [info for r in via_containerd.List(pb.ListSnapshotsRequest(snapshotter=PLUGIN), metadata=md,
                                                      timeout=30) for info in r.info] == []
            assert [info for r in direct.List(pb.ListSnapshotsRequest(), timeout=30) for info in r.info] == []
        finally:
            ctd.close()
            ours.close()
        assert snapshotter_status(snap_root)["snapshots"] == []
        assert sorted(os.listdir(snap_root / "snapshots")) == snaps_before
        assert names(repo) == repo_before
        assert not (snap_root / "cvmfs").exists() or names(snap_root / "cvmfs") == []
        assert n.snapshotter.proc.poll() is None
        # a well-formed Prepare still works afterwards
        r = n.containerd.ctr("snapshots", "--snapshotter", PLUGIN, "prepare", "ok-after-hostile")
        assert r.returncode == 0
        assert "Traceback" not in n.log()
