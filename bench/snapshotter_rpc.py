"""Latency of the snapshotter's gRPC calls on this machine (not a test: numbers only).

    python bench/snapshotter_rpc.py [--layers 128] [--reps 3]

Starts the daemon in-process on a private temp root and unix socket, then times through a real gRPC channel:
Prepare+Commit of a chain of local layers, Prepare of remote layers (AlreadyExists path, an in-script source serving
3 directories per layer), View/Mounts of the full stack, Stat and List.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.snapshotter_scale import timed
from cvmfs_snap.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from cvmfs_snap.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from cvmfs_snap.fsutil import remove_tree_quietly
from cvmfs_snap.labelnames import CRI_LAYER_DIGEST, SNAPSHOT_REF
from cvmfs_snap.snapshotter.config import Config
from cvmfs_snap.snapshotter.daemon import Daemon
from cvmfs_snap.snapshotter.sources.base import LayerRequest, RemoteLayer, SourceHealth


class DirSource:
    """A LayerSource serving 3 plain directories per layer (no CVMFS): the RPC path's own cost."""

    name = "bench"

    def __init__(self, base: Path) -> None:
        self.base = base

    def lookup(self, request: LayerRequest) -> RemoteLayer | None:
        return RemoteLayer(self.name, request.digest) if request.digest else None

    def mount_dirs(self, request: LayerRequest) -> list[Path]:
        return [self.base / request.digest[7:] / f"p{i}" for i in range(3)]

    def check(self, request: LayerRequest) -> None:
        pass

    def release(self, digest: str) -> None:
        pass

    def held(self) -> list[str]:
        return []

    def state_paths(self, digest: str) -> list[Path]:
        return []

    def restore(self, requests: Sequence[LayerRequest]) -> None:
        pass

    def health(self) -> SourceHealth:
        return SourceHealth(True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cs-bench-snap-", dir="/tmp"))
    d = Daemon(Config(grpc_workers=4), str(tmp / "s.sock"), tmp / "root", sources=[DirSource(tmp / "src")])
    d.start()
    results: dict[str, list[float]] = {}
    try:
        with grpc.insecure_channel(f"unix:{d.address}") as ch:
            stub = pb_grpc.SnapshotsStub(ch)
            lst = lambda req: list(stub.List(req))  # noqa: E731
            for rep in range(a.reps):
                def add(what: str, seconds: float) -> None:
                    results.setdefault(what, []).append(seconds)

                parent = ""
                for i in range(a.layers):
                    key, name = f"r{rep}-a{i}", f"r{rep}-c{i}"
                    add("Prepare(local)", timed(stub.Prepare, pb.PrepareSnapshotRequest(key=key, parent=parent)))
                    add("Commit(empty)", timed(stub.Commit, pb.CommitSnapshotRequest(name=name, key=key)))
                    parent = name
                add(f"View({a.layers} local)", timed(stub.View, pb.ViewSnapshotRequest(key=f"r{rep}-v", parent=parent)))
                rparent = ""
                for i in range(a.layers):
                    chain = f"sha256:{rep:032x}{i:032x}"
                    labels = {SNAPSHOT_REF: chain, CRI_LAYER_DIGEST: f"sha256:{i:064x}"}
                    add("Prepare(remote->AlreadyExists)", timed(
                        stub.Prepare, pb.PrepareSnapshotRequest(key="x", parent=rparent, labels=labels),
                        grpc.StatusCode.ALREADY_EXISTS))
                    rparent = chain
                add(f"Prepare(on {a.layers} remote x3, new links)",
                    timed(stub.Prepare, pb.PrepareSnapshotRequest(key=f"r{rep}-ctr", parent=rparent)))
                add(f"Prepare(on {a.layers} remote x3, links exist)",
                    timed(stub.Prepare, pb.PrepareSnapshotRequest(key=f"r{rep}-ctr2", parent=rparent)))
                add("Mounts(same)", timed(stub.Mounts, pb.MountsRequest(key=f"r{rep}-ctr")))
                add("Stat", timed(stub.Stat, pb.StatSnapshotRequest(key=parent)))
                add("List(all)", timed(lst, pb.ListSnapshotsRequest()))
            total = sum(len(r.info) for r in stub.List(pb.ListSnapshotsRequest()))
    finally:
        d.stop()
        remove_tree_quietly(tmp)
    print(f"{'call':<36} {'n':>5} {'median ms':>10} {'p90 ms':>8}")
    for k, v in results.items():
        v = sorted(v)
        p90 = v[min(len(v) - 1, int(len(v) * 0.9))]
        print(f"{k:<36} {len(v):>5} {statistics.median(v) * 1e3:>10.2f} {p90 * 1e3:>8.2f}")
    print(f"snapshots at the end: {total}")


if __name__ == "__main__":
    main()
