"""The layer source seam as the core drives it: one parsed request stored with the snapshot, reference-counted
release on Remove and Cleanup, restore at start, the registry, and the CVMFS source's node-local dirs staying put
while any snapshot uses their layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cvmfs_snap.errors import AlreadyExistsError, InvalidInputError, UnavailableError
from cvmfs_snap.labelnames import CRI_IMAGE_LAYERS, CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, SNAPSHOT_REF
from cvmfs_snap.snapshotter.config import parse_config
from cvmfs_snap.snapshotter.core import Snapshotter
from cvmfs_snap.snapshotter.daemon import build_sources
from cvmfs_snap.snapshotter.sources.base import HostileLabelsError, LayerRequest
from cvmfs_snap.snapshotter.sources.cvmfs import CvmfsSource
from cvmfs_snap.snapshotter.sources.registry import KNOWN_SOURCES
from cvmfs_snap_devenv.images import Entry, layer
from tests.support.layersource import FakeSource
from tests.support.layertrees import write_cvmfs_layer

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
M1 = "sha256:" + "e" * 64


def chain(n: int) -> str:
    return f"sha256:{n:064x}"


def labels(target: str, digest: str, **extra: str) -> dict[str, str]:
    return {SNAPSHOT_REF: target, CRI_LAYER_DIGEST: digest, **extra}


def remote(sn: Snapshotter, target: str, digest: str, parent: str = "", **extra: str) -> None:
    with pytest.raises(AlreadyExistsError):
        sn.prepare(f"extract {target}", parent, labels(target, digest, **extra))


def test_request_is_parsed_once_and_stored(tmp_path: Path) -> None:
    d = tmp_path / "l1"
    d.mkdir()
    src = FakeSource(layers={D1: [d]})
    sn = Snapshotter(tmp_path / "root", sources=[src])
    extra = {CRI_IMAGE_REF: "reg.example/app:1", CRI_MANIFEST_DIGEST: M1,
             CRI_IMAGE_LAYERS: f"{D1}, {D2}", "containerd.io/snapshot/stargz/toc.digest": D2,
             "containerd.io/snapshot/remote/other": "x"}
    remote(sn, chain(1), D1, **extra)
    [req] = src.lookups
    # every containerd.io/snapshot/* layer annotation, by its label name; the CRI labels have their own fields
    assert req == LayerRequest(chain(1), D1, "reg.example/app:1", M1, (D1, D2),
                               {"containerd.io/snapshot/stargz/toc.digest": D2,
                                "containerd.io/snapshot/remote/other": "x"})
    assert req.toc_digest == D2
    sn.view("v", chain(1))
    assert src.mounted == [req]  # Mounts gets the very request, from the store
    sn.close()
    # and after a restart, restore() gets every stored request of the source
    src2 = FakeSource(layers={D1: [d]})
    sn2 = Snapshotter(tmp_path / "root", sources=[src2])
    sn2.restore_sources()
    assert src2.restored == [req]
    sn2.close()


def test_only_hostile_labels_fail_a_prepare(tmp_path: Path) -> None:
    d = tmp_path / "l1"
    d.mkdir()
    src = FakeSource(layers={D1: [d]})
    sn = Snapshotter(tmp_path / "root", sources=[src])
    with pytest.raises(HostileLabelsError):
        sn.prepare("x", "", labels(chain(1), "sha256:../../etc"))
    with pytest.raises(HostileLabelsError, match="contradictory"):
        sn.prepare("x", "", {**labels(chain(1), D1), "cvmfs-snap.io/layer-digest": D2})
    for failure in (InvalidInputError("registry: 400"), UnavailableError("down"), RuntimeError("bug")):
        src.fail_with = failure
        assert sn.prepare(f"local-{type(failure).__name__}", "", labels(chain(2), D1))[0].type == "bind"
    assert src.lookups[-1].digest == D1
    # a malformed manifest label is only information: it never fails a Prepare
    src.fail_with = None
    remote(sn, chain(3), D1, **{CRI_MANIFEST_DIGEST: "nonsense"})
    assert src.lookups[-1].manifest_digest == ""
    sn.close()


def test_release_is_reference_counted_on_remove_and_cleanup(tmp_path: Path) -> None:
    dirs = {D1: [tmp_path / "a"], D2: [tmp_path / "b"]}
    for ds in dirs.values():
        ds[0].mkdir()
    src = FakeSource(layers=dirs)
    sn = Snapshotter(tmp_path / "root", sources=[src])
    remote(sn, chain(1), D1)
    remote(sn, chain(2), D1, parent=chain(1))  # the same layer in another chain
    remote(sn, chain(3), D2)
    sn.remove(chain(2))
    assert src.released == []
    sn.cleanup()
    assert src.released == []  # both layers still used
    sn.remove(chain(1))
    assert src.released == [D1]
    src.state.add(D1)  # state the source kept although released (a failed release, an older run)
    sn.cleanup()
    assert src.released == [D1, D1] and src.held() == [D2]
    sn.close()


def test_registry_is_the_one_list_of_sources(tmp_path: Path) -> None:
    assert "cvmfs" in KNOWN_SOURCES
    cfg = parse_config({"repository": "r.example", "cvmfs-snap": {"sources": ["cvmfs"]}})
    [src] = build_sources(cfg, tmp_path)
    assert isinstance(src, CvmfsSource) and src.name == "cvmfs"
    assert src.dirs.state_dir == (tmp_path / "cvmfs").resolve()
    assert src.root == Path("/cvmfs/r.example")
    with pytest.raises(InvalidInputError, match="unknown layer source 'nfs'"):
        parse_config({"cvmfs-snap": {"sources": ["nfs"]}})
    with pytest.raises(InvalidInputError, match="twice"):
        parse_config({"cvmfs-snap": {"sources": ["cvmfs", "cvmfs"]}})


def test_budgets_are_per_source(tmp_path: Path) -> None:
    cfg = parse_config({"absolute-mountpoint": str(tmp_path / "repo")})
    [a, lazy_a] = build_sources(cfg, tmp_path / "r1")  # the default: cvmfs, then lazy
    [b, _] = build_sources(cfg, tmp_path / "r2")
    assert lazy_a.name == "lazy" and lazy_a.budget is not a.budget  # type: ignore[attr-defined]
    assert isinstance(a, CvmfsSource) and isinstance(b, CvmfsSource)
    assert a.budget is not b.budget
    a.budget.running = a.budget.limit  # a's calls all hang
    assert not a.health(force=True).available
    assert "still hanging" in a.repository_status().reason
    (tmp_path / "repo").mkdir()
    assert b.health(force=True).available


# -- the CVMFS source under the core ----------------------------------------------------------------------------


def test_cvmfs_dirs_stay_while_any_snapshot_uses_the_layer(tmp_path: Path) -> None:
    lay = layer(["d/", ("d/f", b"f"), Entry("d/.wh.gone")])
    repo = tmp_path / "repo"
    write_cvmfs_layer(repo, lay)
    src = CvmfsSource(repo, tmp_path / "root" / "cvmfs", claim_owner=None)
    sn = Snapshotter(tmp_path / "root", sources=[src])
    remote(sn, chain(1), lay.digest)
    remote(sn, chain(2), lay.digest, parent=chain(1))
    [m] = sn.prepare("ctr", chain(2))
    mask = src.lowerdirs(lay.digest)[0]
    ino = os.lstat(mask / "d" / "gone").st_ino
    sn.remove("ctr")
    sn.remove(chain(2))
    sn.cleanup()
    assert os.lstat(mask / "d" / "gone").st_ino == ino  # chain 1 still uses the layer
    sn.remove(chain(1))
    assert not mask.exists() and src.held() == []
    # a layer whose dirs were built but whose snapshot is gone (crash before Remove finished): Cleanup collects
    src.lowerdirs(lay.digest)
    assert src.held() == [lay.digest]
    sn.cleanup()
    assert src.held() == []
    assert m.type == "overlay"
    sn.close()


def test_source_options_set_each_sources_time_budget(tmp_path: Path) -> None:
    cfg = parse_config({"absolute-mountpoint": str(tmp_path / "repo"), "cvmfs-snap": {"source-options": {
        "cvmfs": {"timeout": 0.5, "build-timeout": 20, "max-hanging-calls": 2}}}})
    [src, _] = build_sources(cfg, tmp_path / "root")
    assert isinstance(src, CvmfsSource)
    assert (src.fs_timeout, src.build_timeout, src.budget.limit) == (0.5, 20.0, 2)
    assert src.health_monitor.ttl == 5.0  # the default where the file says nothing
    for bad, msg in (({"cvmfs": {"timeout": 0}}, "positive"), ({"cvmfs": {"tmeout": 1}}, "unknown option"),
                     ({"nfs": {}}, "unknown layer source"), ({"cvmfs": {"timeout": "10"}}, "positive")):
        with pytest.raises(InvalidInputError, match=msg):
            parse_config({"cvmfs-snap": {"source-options": bad}})


def test_daemon_restores_sources_at_start(short_tmp: Path) -> None:
    from cvmfs_snap.snapshotter.config import Config
    from cvmfs_snap.snapshotter.daemon import Daemon

    d = short_tmp / "l1"
    d.mkdir()
    first = FakeSource(layers={D1: [d]})
    dm = Daemon(Config(grpc_workers=1), str(short_tmp / "s.sock"), short_tmp / "root", sources=[first])
    assert first.restored == []
    remote(dm.core, chain(1), D1, **{CRI_IMAGE_REF: "reg.example/app:1"})
    dm.stop()
    again = FakeSource(layers={D1: [d]})
    dm = Daemon(Config(grpc_workers=1), str(short_tmp / "s.sock"), short_tmp / "root", sources=[again])
    assert [(r.target, r.digest, r.image_ref) for r in again.restored] == [(chain(1), D1, "reg.example/app:1")]
    dm.stop()
