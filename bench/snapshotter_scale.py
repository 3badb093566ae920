"""How the snapshotter daemon scales with the number of snapshots (numbers only, no asserts).

    python bench/snapshotter_scale.py [--images 20] [--depth 10] [--local 200] [--workers 16]

Runs the real ``cvmfs-snap snapshotter`` process (as on a node) with the CVMFS source on a repository directory
holding ``images x depth`` published layers (tiny layerfs trees plus layer.json, as the publisher leaves them), and
drives it through its gRPC socket like containerd does:

* remote Prepare: ``Prepare(extract key, parent, {snapshot.ref: chain, cri.layer-digest: layer})`` of every layer of
  every image, answered ``AlreadyExists`` (the layer is served from CVMFS): ``images x depth`` remote snapshots;
* local Prepare + Commit: an unpublished layer (no labels), as containerd unpacks a downloaded one;
* container Prepare: two active snapshots on top of each image (``depth`` CVMFS layers below them; the first one
  builds each layer's node-local whiteout directories), then Mounts.

Prints latency p50/p99 per call kind and the daemon's VmRSS/VmHWM (from /proc/PID/status) when idle, after the
remote snapshots and after everything.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cvmfs_snap.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from cvmfs_snap.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from cvmfs_snap.fsutil import remove_tree_quietly
from cvmfs_snap.labelnames import CRI_LAYER_DIGEST, SNAPSHOT_REF
from cvmfs_snap.layout import LayerRecord, RepositoryLayout
from cvmfs_snap.mediatypes import OCI_LAYER_GZIP
from tests.support.snapshotter_daemon import start_daemon, stop_daemon, wait_ready


def publish_fake_layers(repo: Path, n: int) -> list[str]:
    """``n`` complete layers as the publisher leaves them: a small layerfs (a dir, a file, a whiteout) + layer.json."""
    layout = RepositoryLayout(repo)
    digests = []
    for i in range(n):
        digest = f"sha256:{i + 1:064x}"
        fs = layout.layerfs(digest)
        (fs / "data").mkdir(parents=True)
        (fs / "data" / f"f{i}").write_text(f"layer {i}\n")
        (fs / "data" / f".wh.f{i - 1}").write_bytes(b"")
        (fs / ".cvmfscatalog").write_bytes(b"")
        layout.layer_metadata_dir(digest).mkdir()
        rec = LayerRecord(digest=digest, diff_id=f"sha256:{i + 1:064x}", media_type=OCI_LAYER_GZIP,
                          compressed_size=100, uncompressed_size=1000, entries=3,
                          whiteouts=[f"data/f{i - 1}"])
        layout.layer_json(digest).write_text(rec.to_json())
        digests.append(digest)
    return digests


def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def timed(fn: Callable[[Any], object], request: Any, expect: grpc.StatusCode | None = None) -> float:
    t = time.perf_counter()
    try:
        fn(request)
        if expect is not None:
            raise RuntimeError(f"expected {expect.name}, the call succeeded")
    except grpc.RpcError as exc:
        if exc.code() != expect:
            raise
    return time.perf_counter() - t


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20, help="published images (default 20)")
    ap.add_argument("--depth", type=int, default=10, help="layers per image (default 10): images x depth remote")
    ap.add_argument("--local", type=int, default=200, help="local layers Prepared+Committed (default 200)")
    ap.add_argument("--workers", type=int, default=16, help="grpc-workers of the daemon (default 16)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (the snapshotter makes overlay whiteout devices)")

    tmp = Path(tempfile.mkdtemp(prefix="cs-scale-", dir="/tmp"))
    repo = tmp / "repo"
    digests = publish_fake_layers(repo, a.images * a.depth)
    cfg = tmp / "c.toml"
    cfg.write_text(f'absolute-mountpoint = "{repo}"\n[cvmfs-snap]\ngrpc-workers = {a.workers}\n')
    sp = start_daemon(tmp, "--config", str(cfg), "--log-level", "warn", address=tmp / "s.sock")
    proc = sp.proc
    lat: dict[str, list[float]] = {}
    mem: list[tuple[str, dict[str, int], int]] = []
    try:
        wait_ready(sp)
        ch = grpc.insecure_channel(f"unix:{sp.address}")
        stub = pb_grpc.SnapshotsStub(ch)

        def n_snapshots() -> int:
            return sum(len(r.info) for r in stub.List(pb.ListSnapshotsRequest()))

        mem.append(("idle", proc_mem(proc.pid), n_snapshots()))

        tops = []
        for img in range(a.images):
            parent = ""
            for d in range(a.depth):
                digest = digests[img * a.depth + d]
                chain = f"sha256:{img:032x}{d:032x}"
                labels = {SNAPSHOT_REF: chain, CRI_LAYER_DIGEST: digest}
                lat.setdefault("Prepare remote (AlreadyExists)", []).append(timed(
                    stub.Prepare, pb.PrepareSnapshotRequest(key=f"extract-{img}-{d}", parent=parent, labels=labels),
                    grpc.StatusCode.ALREADY_EXISTS))
                parent = chain
            tops.append(parent)
        mem.append((f"{a.images * a.depth} remote", proc_mem(proc.pid), n_snapshots()))

        parent = ""
        for i in range(a.local):
            key, name = f"extract-local-{i}", f"local-{i}"
            lat.setdefault("Prepare local (layer unpack)", []).append(
                timed(stub.Prepare, pb.PrepareSnapshotRequest(key=key, parent=parent)))
            lat.setdefault("Commit local", []).append(
                timed(stub.Commit, pb.CommitSnapshotRequest(name=name, key=key)))
            parent = name if i % 10 != 9 else ""  # chains of 10, like 20 images of 10 layers
        for img, top in enumerate(tops):
            key = f"container-{img}"
            # the first container of an image builds each layer's node-local whiteout dirs (Prepare returns mounts)
            lat.setdefault(f"Prepare 1st container, {a.depth} CVMFS layers", []).append(
                timed(stub.Prepare, pb.PrepareSnapshotRequest(key=key, parent=top)))
            lat.setdefault(f"Prepare 2nd container, {a.depth} CVMFS layers", []).append(
                timed(stub.Prepare, pb.PrepareSnapshotRequest(key=key + "-b", parent=top)))
            lat.setdefault(f"Mounts, {a.depth} CVMFS layers", []).append(timed(stub.Mounts, pb.MountsRequest(key=key)))
        lat.setdefault("List (all)", []).extend(
            timed(lambda r: list(stub.List(r)), pb.ListSnapshotsRequest()) for _ in range(10))
        mem.append(("+ local + containers", proc_mem(proc.pid), n_snapshots()))
        ch.close()
    finally:
        stop_daemon(sp)
        remove_tree_quietly(tmp)

    print(f"\nsnapshotter gRPC latency ({a.images} images x {a.depth} layers, {a.local} local layers, "
          f"{a.workers} workers, {os.cpu_count()} CPUs)")
    print(f"{'call':<42} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for k, v in lat.items():
        print(f"{k:<42} {len(v):>5} {pct(v, 0.5) * 1e3:>8.2f} {pct(v, 0.99) * 1e3:>8.2f} "
              f"{statistics.fmean(v) * 1e3:>8.2f}")
    print(f"\n{'daemon memory':<24} {'snapshots':>9} {'VmRSS MiB':>10} {'VmHWM MiB':>10}")
    for what, m, n in mem:
        print(f"{what:<24} {n:>9} {m['VmRSS'] / 1024:>10.1f} {m['VmHWM'] / 1024:>10.1f}")


if __name__ == "__main__":
    main()
