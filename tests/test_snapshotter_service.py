"""The gRPC service through a real channel on a unix socket, the daemon process, config, status and metrics."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2

from cvmfs_snap.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from cvmfs_snap.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from cvmfs_snap.errors import AlreadyExistsError, InvalidInputError, NotFoundError, UnavailableError
from cvmfs_snap.labelnames import CRI_LAYER_DIGEST, SNAPSHOT_REF
from cvmfs_snap.snapshotter import service
from cvmfs_snap.snapshotter.config import Config, load_config, parse_config
from cvmfs_snap.snapshotter.daemon import Daemon
from tests.support.layersource import FakeSource
from tests.support.snapshotter_daemon import DB_FILES, start_daemon, stop_daemon, wait_ready
from tests.support.trees import shape

D1 = "sha256:" + "1" * 64
CHAIN1 = "sha256:" + "a" * 64


@pytest.fixture
def served(short_tmp: Path) -> Iterator[tuple[Daemon, pb_grpc.SnapshotsStub, FakeSource]]:
    layer = short_tmp / "layer1"
    layer.mkdir()
    (layer / "hello").write_text("from the source\n")
    src = FakeSource(layers={D1: [layer]})
    d = Daemon(Config(metrics_address="127.0.0.1:0", grpc_workers=4), str(short_tmp / "s.sock"), short_tmp / "root",
               sources=[src])
    d.start()
    channel = grpc.insecure_channel(f"unix:{d.address}")
    try:
        yield d, pb_grpc.SnapshotsStub(channel), src
    finally:
        channel.close()
        d.stop()


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        call()  # type: ignore[operator]
    return ei.value.code()


def test_socket_is_private(served: tuple[Daemon, pb_grpc.SnapshotsStub, FakeSource]) -> None:
    d, _, _ = served
    st = os.stat(d.address)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_lifecycle_over_grpc(served: tuple[Daemon, pb_grpc.SnapshotsStub, FakeSource]) -> None:
    _, stub, _ = served
    r = stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="x", key="a", labels={"l": "v"}))
    assert [(m.type, list(m.options)) for m in r.mounts] == [("bind", ["rw", "rbind"])]
    assert stub.Mounts(pb.MountsRequest(key="a")).mounts == r.mounts
    info = stub.Stat(pb.StatSnapshotRequest(key="a")).info
    assert (info.name, info.kind, dict(info.labels)) == ("a", pb.ACTIVE, {"l": "v"})
    assert info.created_at == info.updated_at and info.created_at.seconds > 0
    stub.Commit(pb.CommitSnapshotRequest(name="c", key="a", labels={"k": "1"}))
    assert stub.Stat(pb.StatSnapshotRequest(key="c")).info.kind == pb.COMMITTED
    v = stub.View(pb.ViewSnapshotRequest(key="v", parent="c"))
    assert [(m.type, list(m.options)) for m in v.mounts] == [("bind", ["ro", "rbind"])]
    assert stub.Usage(pb.UsageRequest(key="c")).inodes == 1

    upd = stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="c", labels={"k": "2", "z": "3"}),
                                               update_mask=field_mask_pb2.FieldMask(paths=["labels.k"])))
    assert dict(upd.info.labels) == {"k": "2"}
    upd = stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="c", labels={"only": "1"})))
    assert dict(upd.info.labels) == {"only": "1"}

    names = [i.name for resp in stub.List(pb.ListSnapshotsRequest(filters=["kind==committed"])) for i in resp.info]
    assert names == ["c"]
    stub.Remove(pb.RemoveSnapshotRequest(key="v"))
    stub.Remove(pb.RemoveSnapshotRequest(key="c"))
    stub.Cleanup(pb.CleanupRequest())
    assert [i for resp in stub.List(pb.ListSnapshotsRequest()) for i in resp.info] == []


def test_error_codes(served: tuple[Daemon, pb_grpc.SnapshotsStub, FakeSource]) -> None:
    _, stub, _ = served
    stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
    stub.Commit(pb.CommitSnapshotRequest(name="p", key="a"))
    stub.Prepare(pb.PrepareSnapshotRequest(key="child", parent="p"))
    C = grpc.StatusCode
    assert code_of(lambda: stub.Stat(pb.StatSnapshotRequest(key="nope"))) == C.NOT_FOUND
    assert code_of(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="child"))) == C.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as ei:
        stub.Remove(pb.RemoveSnapshotRequest(key="p"))
    assert ei.value.code() == C.FAILED_PRECONDITION and "remove" in (ei.value.details() or "")
    assert code_of(lambda: stub.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="p", parent="x"), update_mask=field_mask_pb2.FieldMask(paths=["parent"])))) == (
        C.INVALID_ARGUMENT)
    assert code_of(lambda: stub.List(pb.ListSnapshotsRequest(filters=["name=="])).next()) == C.INVALID_ARGUMENT
    assert code_of(lambda: stub.Mounts(pb.MountsRequest(key="p"))) == C.FAILED_PRECONDITION


def test_error_mapping_table() -> None:
    from cvmfs_snap.errors import AuthError, CvmfsSnapError, FailedPreconditionError, UnsafeLayerError

    assert service.status_code(UnavailableError("x")) == grpc.StatusCode.UNAVAILABLE
    assert service.status_code(UnsafeLayerError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert service.status_code(FailedPreconditionError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert service.status_code(AuthError("x")) == grpc.StatusCode.UNKNOWN
    assert service.status_code(CvmfsSnapError("x")) == grpc.StatusCode.UNKNOWN


def test_remote_prepare_and_metrics(served: tuple[Daemon, pb_grpc.SnapshotsStub, FakeSource]) -> None:
    d, stub, src = served
    labels = {SNAPSHOT_REF: CHAIN1, CRI_LAYER_DIGEST: D1}
    assert code_of(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="extract-1", labels=labels))) == (
        grpc.StatusCode.ALREADY_EXISTS)
    # what containerd does next: find the target with a filter
    flt = f'labels."containerd.io/snapshot.ref"=={CHAIN1},parent==""'
    found = [i for resp in stub.List(pb.ListSnapshotsRequest(filters=[flt])) for i in resp.info]
    assert [(i.name, i.kind) for i in found] == [(CHAIN1, pb.COMMITTED)]
    v = stub.View(pb.ViewSnapshotRequest(key="v", parent=CHAIN1))
    assert v.mounts[0].source == str(src.layers[D1][0])
    # hostile labels -> INVALID_ARGUMENT
    bad = {SNAPSHOT_REF: "sha256:" + "b" * 64, CRI_LAYER_DIGEST: "sha256:../../x"}
    assert code_of(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="e2", labels=bad))) == (
        grpc.StatusCode.INVALID_ARGUMENT)
    stub.Prepare(pb.PrepareSnapshotRequest(key="local-one"))
    assert d.metrics_bound is not None
    host, port = d.metrics_bound
    text = httpx.get(f"http://{host}:{port}/metrics", timeout=10).text
    assert 'cvmfs_snap_snapshotter_prepare_total{outcome="fake"} 1.0' in text
    assert 'cvmfs_snap_snapshotter_prepare_total{outcome="local"} 1.0' in text
    assert 'cvmfs_snap_snapshotter_rpc_errors_total{code="INVALID_ARGUMENT",rpc="Prepare"} 1.0' in text
    assert 'cvmfs_snap_snapshotter_rpc_seconds_count{rpc="View"} 1.0' in text


def test_trailing_newline_and_source_errors(served: tuple[Daemon, pb_grpc.SnapshotsStub, FakeSource]) -> None:
    """A digest label with a trailing newline is hostile (full-match validation), on either label; a source's own
    InvalidInputError (say its registry answered 400) is not: that layer is pulled normally."""
    d, stub, src = served
    for key in (CRI_LAYER_DIGEST, "cvmfs-snap.io/layer-digest"):
        labels = {SNAPSHOT_REF: CHAIN1, key: D1 + "\n"}
        assert code_of(lambda labels=labels: stub.Prepare(pb.PrepareSnapshotRequest(key="nl", labels=labels))) == (
            grpc.StatusCode.INVALID_ARGUMENT)
    assert [i for resp in stub.List(pb.ListSnapshotsRequest()) for i in resp.info] == []
    src.fail_with = InvalidInputError("registry answered 400 Bad Request")
    r = stub.Prepare(pb.PrepareSnapshotRequest(key="local", labels={SNAPSHOT_REF: CHAIN1,
                                                                     CRI_LAYER_DIGEST: D1}))
    assert r.mounts[0].type == "bind"
    assert d.core.store.get("local").source == ""


def test_list_skips_a_corrupt_row(served: tuple[Daemon, pb_grpc.SnapshotsStub, FakeSource]) -> None:
    d, stub, _ = served
    for k in ("a", "b"):
        stub.Prepare(pb.PrepareSnapshotRequest(key=k))
    with d.core.store._lock:
        d.core.store._db.execute("UPDATE snapshots SET labels = '[1, 2]' WHERE key = 'a'")
    assert [i.name for resp in stub.List(pb.ListSnapshotsRequest()) for i in resp.info] == ["b"]
    stub.Remove(pb.RemoveSnapshotRequest(key="a"))


def test_second_instance_refuses_and_leaves_the_socket(
        served: tuple[Daemon, pb_grpc.SnapshotsStub, FakeSource], short_tmp: Path) -> None:
    d, stub, _ = served
    before = os.stat(d.address)
    other = Daemon(Config(grpc_workers=1), d.address, short_tmp / "root2", sources=[])
    with pytest.raises(UnavailableError, match=r"socket .* in use by another cvmfs-snap snapshotter"):
        other.start()
    other.stop()  # what main() does on the way out
    after = os.stat(d.address)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    stub.Prepare(pb.PrepareSnapshotRequest(key="still-answering"))
    # and the same with the real command: exit status != 0, the running instance keeps its socket
    (short_tmp / "c.toml").write_text("[cvmfs-snap]\nsources = []\n")
    r = subprocess.run([sys.executable, "-m", "cvmfs_snap.cli", "snapshotter", "--root", str(short_tmp / "root3"),
                        "--address", d.address, "--config", str(short_tmp / "c.toml")],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode != 0 and "in use by another cvmfs-snap snapshotter" in r.stderr, r.stderr
    assert os.path.exists(d.address)
    stub.Stat(pb.StatSnapshotRequest(key="still-answering"))
    # an instance of an older release (no lock file) still meets the live-socket check
    os.close(d._locks.pop())
    old = Daemon(Config(grpc_workers=1), d.address, short_tmp / "root4", sources=[])
    with pytest.raises(UnavailableError, match="already serving"):
        old.start()
    old.stop()
    assert os.path.exists(d.address)
    stub.Stat(pb.StatSnapshotRequest(key="still-answering"))


def test_list_is_batched(served: tuple[Daemon, pb_grpc.SnapshotsStub, FakeSource]) -> None:
    _, stub, _ = served
    n = service.LIST_BATCH + 5
    for i in range(n):
        stub.View(pb.ViewSnapshotRequest(key=f"v{i:04d}"))
    batches = [len(r.info) for r in stub.List(pb.ListSnapshotsRequest())]
    assert batches == [service.LIST_BATCH, 5]


def test_unexpected_exception_is_internal(served: tuple[Daemon, pb_grpc.SnapshotsStub, FakeSource]) -> None:
    d, stub, src = served
    src.fail_with = None

    def boom(_key: str) -> object:
        raise ZeroDivisionError("bug")

    d.core.stat = boom  # type: ignore[assignment,method-assign]
    with pytest.raises(grpc.RpcError) as ei:
        stub.Stat(pb.StatSnapshotRequest(key="x"))
    assert ei.value.code() == grpc.StatusCode.INTERNAL and "bug" in (ei.value.details() or "")


# -- config -----------------------------------------------------------------------------------------------------------
def test_config_defaults_and_official_keys(tmp_path: Path) -> None:
    assert Config().mountpoint == Path("/cvmfs/unpacked.cern.ch")
    assert parse_config({"repository": "other.cern.ch"}).mountpoint == Path("/cvmfs/other.cern.ch")
    cfg = parse_config({"repository": "x", "absolute-mountpoint": "/mnt/repo",
                        "cvmfs-snap": {"metrics-address": "127.0.0.1:9", "sources": ["cvmfs"], "grpc-workers": 3}})
    assert (cfg.mountpoint, cfg.metrics_address, cfg.sources, cfg.grpc_workers) == (
        Path("/mnt/repo"), "127.0.0.1:9", ["cvmfs"], 3)
    with pytest.raises(InvalidInputError, match="repository"):
        parse_config({"repository": 5})
    with pytest.raises(InvalidInputError, match="unknown layer source"):
        parse_config({"cvmfs-snap": {"sources": ["nfs"]}})
    with pytest.raises(InvalidInputError, match="absolute"):
        parse_config({"absolute-mountpoint": "relative/path"})
    with pytest.raises(NotFoundError, match="--config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("repository = \n")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text('repository = "sft.cern.ch"\nunknown-key = 1\n')
    assert load_config(good).mountpoint == Path("/cvmfs/sft.cern.ch")


# -- the daemon process -----------------------------------------------------------------------------------------------
def test_daemon_restart_keeps_state_and_stops_on_sigterm(short_tmp: Path) -> None:
    sock = short_tmp / "run" / "s.sock"
    cfg = short_tmp / "c.toml"
    cfg.write_text(f'absolute-mountpoint = "{short_tmp}/repo"\n')
    proc = start_daemon(short_tmp, "--config", str(cfg), "--log-level", "debug")
    try:
        wait_ready(proc)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            stub = pb_grpc.SnapshotsStub(ch)
            stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
            stub.Commit(pb.CommitSnapshotRequest(name="base", key="a"))
            m = stub.Prepare(pb.PrepareSnapshotRequest(key="run", parent="base")).mounts
    finally:
        assert stop_daemon(proc) == 0
    log = (short_tmp / "daemon.log").read_text()
    assert "got SIGTERM" in log and "stopped" in log
    assert not sock.exists()
    tree = shape(short_tmp / "root", skip_names=DB_FILES)

    # a stale socket file is replaced; state and dirs are kept as they were
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()
    proc = start_daemon(short_tmp, "--config", str(cfg))
    try:
        wait_ready(proc)
        assert shape(short_tmp / "root", skip_names=DB_FILES) == tree
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            stub = pb_grpc.SnapshotsStub(ch)
            assert stub.Mounts(pb.MountsRequest(key="run")).mounts == m
        # a second daemon on the same socket refuses to steal it
        second = subprocess.run(
            [sys.executable, "-m", "cvmfs_snap.cli", "snapshotter", "--root", str(short_tmp / "root2"),
             "--address", str(sock), "--config", str(cfg)], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and "in use by another cvmfs-snap snapshotter" in second.stderr
        # and a second daemon on the same root (another socket) refuses before touching anything there
        third = subprocess.run(
            [sys.executable, "-m", "cvmfs_snap.cli", "snapshotter", "--root", str(short_tmp / "root"),
             "--address", str(short_tmp / "other.sock"), "--config", str(cfg)], capture_output=True, text=True,
            timeout=60)
        assert third.returncode != 0 and "snapshotter root" in third.stderr and "in use" in third.stderr
        assert not (short_tmp / "other.sock").exists()

        status = subprocess.run([sys.executable, "-m", "cvmfs_snap.cli", "status", "--root", str(short_tmp / "root"),
                                 "--json"], capture_output=True, text=True, check=True, timeout=60)
        data = json.loads(status.stdout)
        assert {(s["name"], s["kind"], s["source"]) for s in data["snapshots"]} == {
            ("base", "committed", "local"), ("run", "active", "local")}
        assert data["counts"]["committed_by_source"] == {"local": 1}
    finally:
        assert stop_daemon(proc) == 0


def test_missing_explicit_config_is_an_error(short_tmp: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "cvmfs_snap.cli", "snapshotter", "--root", str(short_tmp / "r"),
                        "--address", str(short_tmp / "s.sock"), "--config", str(short_tmp / "nope.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "nope.toml" in r.stderr and "does not exist" in r.stderr
    assert not (short_tmp / "s.sock").exists()


def test_status_table_shows_origin(tmp_path: Path) -> None:
    from cvmfs_snap.snapshotter.core import Snapshotter

    layer = tmp_path / "layer"
    layer.mkdir()
    sn = Snapshotter(tmp_path / "root", sources=[FakeSource(name="cvmfs", layers={D1: [layer]})])
    with pytest.raises(AlreadyExistsError, match="already exists"):
        sn.prepare("e", "", {SNAPSHOT_REF: CHAIN1, CRI_LAYER_DIGEST: D1})
    sn.prepare("ctr", CHAIN1)
    sn.close()
    r = subprocess.run([sys.executable, "-m", "cvmfs_snap.cli", "status", "--root", str(tmp_path / "root")],
                       capture_output=True, text=True, check=True, timeout=60)
    lines = r.stdout.splitlines()
    assert any(line.startswith(CHAIN1) and f"cvmfs {D1}" in line for line in lines), r.stdout
    assert any(line.startswith("ctr ") and line.rstrip().endswith("local") for line in lines), r.stdout
    assert "2 snapshot(s): 1 active, 1 committed" in r.stdout
    assert "cvmfs: 1" in r.stdout


def test_generated_stubs_are_current() -> None:
    r = subprocess.run(["flock", "/tmp/cvmfs-snap-gen.lock", sys.executable, "-m", "cvmfs_snap.api.generate",
                        "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
