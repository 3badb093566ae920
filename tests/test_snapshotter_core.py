"""The snapshot core on a temp root: containerd semantics, remote snapshots through an in-test LayerSource, restart,
cleanup, and real overlay mounts of what it answers."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_snap.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from cvmfs_snap.labelnames import (
    CRI_LAYER_DIGEST,
    SNAPSHOT_LAYER_DIGEST,
    SNAPSHOT_REF,
    SNAPSHOT_REMOTE,
    SNAPSHOT_SOURCE,
)
from cvmfs_snap.snapshotter.core import Info, Mount, Snapshotter, b36
from cvmfs_snap.snapshotter.store import DB_NAME, Store
from tests.support.layersource import FakeSource
from tests.support.snapshotter_daemon import DB_FILES
from tests.support.trees import shape

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
CHAIN1 = "sha256:" + "a" * 64
CHAIN2 = "sha256:" + "b" * 64


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def prepare_outcome(self, outcome: str) -> None:
        self.seen.append(outcome)


@pytest.fixture
def sn(tmp_path: Path) -> Iterator[Snapshotter]:
    s = Snapshotter(tmp_path / "root")
    yield s
    s.close()


def opts(m: Mount) -> dict[str, str]:
    return dict(o.split("=", 1) for o in m.options if "=" in o)


def commit_layer(sn: Snapshotter, name: str, parent: str = "", files: dict[str, bytes] | None = None) -> None:
    sn.prepare(f"{name}-active", parent)
    fs = sn.fs_dir(sn.store.get(f"{name}-active"))
    for rel, data in (files or {}).items():
        (fs / rel).parent.mkdir(parents=True, exist_ok=True)
        (fs / rel).write_bytes(data)
    sn.commit(name, f"{name}-active")


def test_active_without_parent_is_rw_bind_of_a_0755_dir(sn: Snapshotter) -> None:
    mounts = sn.prepare("a", "")
    rec = sn.store.get("a")
    assert mounts == [Mount("bind", str(sn.fs_dir(rec)), ("rw", "rbind"))]
    assert stat.S_IMODE(os.stat(sn.fs_dir(rec)).st_mode) == 0o755
    assert sn.fs_dir(rec) == sn.root / "snapshots" / str(rec.id) / "fs"
    assert sn.mounts("a") == mounts
    info = sn.stat("a")
    assert (info.kind, info.parent, info.name) == ("active", "", "a")
    assert info.created == info.updated and info.created > 0


def test_created_has_nanosecond_precision_and_updated_moves(sn: Snapshotter) -> None:
    t1 = time.time_ns()
    sn.prepare("a", "", {"x": "1"})
    t2 = time.time_ns()
    info = sn.stat("a")
    assert t1 <= info.created <= t2
    info2 = sn.update(Info("a", "", "", 0, 0, {"y": "2"}))
    assert info2.labels == {"y": "2"} and info2.created == info.created and info2.updated >= info.updated


def test_overlay_mounts_for_children_and_views(sn: Snapshotter) -> None:
    commit_layer(sn, "base", files={"f": b"base"})
    commit_layer(sn, "mid", "base", {"g": b"mid"})
    base, mid = sn.store.get("base"), sn.store.get("mid")

    [m] = sn.prepare("work", "mid")
    w = sn.store.get("work")
    assert m.type == "overlay" and m.source == "overlay"
    o = opts(m)
    assert o["upperdir"] == str(sn.fs_dir(w)) and o["workdir"] == str(sn.work_dir(w))
    lowers = o["lowerdir"].split(":")
    assert lowers == [str(sn.root / "l" / b36(mid.id)), str(sn.root / "l" / b36(base.id))]
    assert [os.readlink(p) for p in lowers] == [str(sn.fs_dir(mid)), str(sn.fs_dir(base))]
    if os.path.exists("/sys/module/overlay/parameters/index"):
        assert "index=off" in m.options

    # a view of one parent: a read-only bind of the parent's dir
    assert sn.view("v1", "base") == [Mount("bind", str(sn.fs_dir(base)), ("ro", "rbind"))]
    # a view of several layers: overlay with lowerdirs only (no upperdir: read-only)
    [vm] = sn.view("v2", "mid")
    assert vm.type == "overlay" and "upperdir" not in opts(vm) and "workdir" not in opts(vm)
    assert opts(vm)["lowerdir"].split(":") == lowers
    # a view without parent: read-only bind of an empty dir
    [v3] = sn.view("v3", "")
    assert v3.options == ("ro", "rbind")


def test_errors_have_containerd_kinds(sn: Snapshotter) -> None:
    sn.prepare("a", "")
    with pytest.raises(AlreadyExistsError):
        sn.prepare("a", "")
    with pytest.raises(AlreadyExistsError):
        sn.view("a", "")
    with pytest.raises(NotFoundError):
        sn.prepare("b", "missing-parent")
    with pytest.raises(InvalidInputError):  # parent must be committed
        sn.prepare("b", "a")
    with pytest.raises(NotFoundError):
        sn.stat("nope")
    with pytest.raises(NotFoundError):
        sn.commit("c", "nope")
    sn.view("v", "")
    with pytest.raises(FailedPreconditionError):
        sn.commit("c", "v")
    sn.commit("c", "a")
    with pytest.raises(NotFoundError):  # the active key is gone after commit
        sn.stat("a")
    with pytest.raises(FailedPreconditionError):  # committed snapshots have no mounts
        sn.mounts("c")
    sn.prepare("a2", "")
    with pytest.raises(AlreadyExistsError):
        sn.commit("c", "a2")
    sn.prepare("child", "c")
    with pytest.raises(FailedPreconditionError, match="remove"):
        sn.remove("c")
    with pytest.raises(InvalidInputError):
        sn.prepare("big", "", {"k": "v" * 5000})
    with pytest.raises(NotFoundError):
        sn.remove("nope")


def test_commit_keeps_id_and_dir_records_usage_and_takes_commit_labels(sn: Snapshotter) -> None:
    sn.prepare("a", "", {"active-label": "1"})
    rec = sn.store.get("a")
    (sn.fs_dir(rec) / "data").write_bytes(b"x" * 10000)
    (sn.fs_dir(rec) / "dir").mkdir()
    os.link(sn.fs_dir(rec) / "data", sn.fs_dir(rec) / "dir" / "hardlink")
    active_usage = sn.usage("a")
    assert active_usage.inodes == 3  # fs root, data (once, despite the hard link), dir
    assert active_usage.size >= 10000
    sn.commit("c", "a", {"commit-label": "2"})
    c = sn.store.get("c")
    assert c.id == rec.id and (sn.fs_dir(c) / "data").exists()
    assert sn.stat("c").labels == {"commit-label": "2"}
    assert sn.usage("c") == active_usage


def test_update_field_masks(sn: Snapshotter) -> None:
    sn.prepare("a", "", {"keep": "k", "l1": "v1", "l2": "v2"})
    # no paths: replace labels, ignore name/parent changes
    info = sn.update(Info("a", "doesnotexist", "committed", 0, 0, {"l1": "x", "l3": "y"}))
    assert (info.labels, info.parent, info.kind) == ({"l1": "x", "l3": "y"}, "", "active")
    # single labels: set l1, delete l3 (absent from the given labels), leave the others
    info = sn.update(Info("a", "", "", 0, 0, {"l1": "updated", "l4": "ignored"}), ["labels.l1", "labels.l3"])
    assert info.labels == {"l1": "updated"}
    info = sn.update(Info("a", "", "", 0, 0, {"z": "1"}), ["labels"])
    assert info.labels == {"z": "1"}
    for path in ("parent", "name", "kind", "created_at"):
        with pytest.raises(InvalidInputError):
            sn.update(Info("a", "other", "", 0, 0, {}), [path])
    assert sn.stat("a").labels == {"z": "1"}
    with pytest.raises(NotFoundError):
        sn.update(Info("nope", "", "", 0, 0, {}))


def test_walk_filters(sn: Snapshotter) -> None:
    commit_layer(sn, "p")
    sn.prepare("a1", "p", {"containerd.io/snapshot.ref": "chain", "x": "1"})
    sn.view("v1", "p", {"x": "2"})
    names = lambda *f: sorted(i.name for i in sn.walk(list(f)))  # noqa: E731
    assert names() == ["a1", "p", "v1"]
    assert names("kind==committed") == ["p"]
    assert names('parent==""') == ["p"]
    assert names('parent!=""') == ["a1", "v1"]
    assert names('labels."containerd.io/snapshot.ref"==chain,parent==p') == ["a1"]
    assert names("labels.x") == ["a1", "v1"]
    assert names("labels.x==1", "labels.x==2") == ["a1", "v1"]
    assert names("name~=^a") == ["a1"]
    with pytest.raises(InvalidInputError):
        sn.walk(["name=="])


def test_remove_deletes_dir_and_links(sn: Snapshotter) -> None:
    commit_layer(sn, "base")
    sn.prepare("a", "base")
    sn.prepare("b", "base")  # a child overlay makes the short link of base
    base = sn.store.get("base")
    link = sn.root / "l" / b36(base.id)
    assert link.is_symlink()
    sn.remove("a")
    sn.remove("b")
    sn.remove("base")
    assert not link.exists() and not link.is_symlink()
    assert not sn.snapshot_dir(base).exists()
    assert sn.walk() == []


def test_cleanup_removes_only_unknown_dirs_and_links(sn: Snapshotter) -> None:
    commit_layer(sn, "base")
    sn.prepare("a", "base")
    keep = {p.name for p in (sn.root / "snapshots").iterdir()} | {p.name for p in (sn.root / "l").iterdir()}
    (sn.root / "snapshots" / "9999" / "fs").mkdir(parents=True)
    os.symlink("/nowhere", sn.root / "l" / b36(9999))
    removed = sn.cleanup()
    assert sorted(Path(r).name for r in removed) == sorted(["9999", b36(9999)])
    assert {p.name for p in (sn.root / "snapshots").iterdir()} | {p.name for p in (sn.root / "l").iterdir()} == keep


def test_state_survives_restart_without_touching_dirs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    s1 = Snapshotter(root)
    commit_layer(s1, "base", files={"f": b"1"})
    m1 = s1.prepare("a", "base", {"l": "v"})
    info1 = s1.stat("a")
    before = shape(root, skip_names=DB_FILES)
    s1.close()
    s2 = Snapshotter(root)
    after = shape(root, skip_names=DB_FILES)
    assert after == before
    assert s2.stat("a") == info1
    assert s2.mounts("a") == m1
    s2.prepare("b", "")
    assert s2.store.get("b").id > s2.store.get("a").id  # ids are never reused
    s2.close()


# -- remote snapshots -------------------------------------------------------------------------------------------------
def remote_labels(chain: str, digest: str) -> dict[str, str]:
    return {SNAPSHOT_REF: chain, CRI_LAYER_DIGEST: digest, "containerd.io/snapshot/cri.image-ref": "x/y:z"}


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for digest, n in ((D1, 1), (D2, 3)):
        dirs = []
        for i in range(n):
            d = tmp_path / "cvmfs" / digest[7:15] / f"part{i}"
            d.mkdir(parents=True)
            (d / f"{digest[7]}-{i}").write_text(f"layer {digest[7]} part {i}\n")
            dirs.append(d)
        out[digest] = dirs
    return out


def test_prepare_with_served_layer_commits_remote_snapshot(tmp_path: Path, layers: dict[str, list[Path]]) -> None:
    src = FakeSource(layers=layers)
    seen = Outcomes()
    sn = Snapshotter(tmp_path / "root", sources=[src], observer=seen)
    with pytest.raises(AlreadyExistsError):
        sn.prepare("extract-1 " + CHAIN1, "", remote_labels(CHAIN1, D1))
    assert sn.store.find("extract-1 " + CHAIN1) is None
    info = sn.stat(CHAIN1)
    assert (info.kind, info.parent) == ("committed", "")
    assert info.labels[SNAPSHOT_REMOTE] and info.labels[SNAPSHOT_SOURCE] == "fake"
    assert info.labels[SNAPSHOT_LAYER_DIGEST] == D1 and info.labels["fake.example/served"] == "yes"
    assert info.labels[SNAPSHOT_REF] == CHAIN1  # containerd finds it with this label after AlreadyExists
    assert [i.name for i in sn.walk([f'labels."containerd.io/snapshot.ref"=={CHAIN1},parent==""'])] == [CHAIN1]
    assert not sn.snapshot_dir(sn.store.get(CHAIN1)).exists()  # no local dir for remote layers

    # the second layer on top, then a container
    with pytest.raises(AlreadyExistsError):
        sn.prepare("extract-2 " + CHAIN2, CHAIN1, remote_labels(CHAIN2, D2))
    # already there: AlreadyExists without asking the source again
    n = len(src.lookups)
    with pytest.raises(AlreadyExistsError):
        sn.prepare("extract-3 " + CHAIN2, CHAIN1, remote_labels(CHAIN2, D2))
    assert len(src.lookups) == n
    assert seen.seen == ["fake", "fake"]

    [m] = sn.prepare("container", CHAIN2)
    assert seen.seen[-1] == "local"
    lowers = opts(m)["lowerdir"].split(":")
    assert [os.readlink(p) for p in lowers] == [str(d) for d in layers[D2] + layers[D1]]
    assert all(Path(p).parent == sn.root / "l" for p in lowers)
    # a view of one remote layer with one dir is a read-only bind of that dir
    assert sn.view("v", CHAIN1) == [Mount("bind", str(layers[D1][0]), ("ro", "rbind"))]

    # removing remote snapshots drops records and links, never the source's dirs
    for key in ("container", "v", CHAIN2, CHAIN1):
        sn.remove(key)
    assert all(d.is_dir() for ds in layers.values() for d in ds)
    assert os.listdir(sn.root / "l") == []
    sn.close()


def test_unserved_layer_and_failing_source_fall_back_to_local(tmp_path: Path, layers: dict[str, list[Path]]) -> None:
    src = FakeSource(layers=layers)
    sn = Snapshotter(tmp_path / "root", sources=[FakeSource(name="broken", fail_with=RuntimeError("boom")), src])
    other = "sha256:" + "3" * 64
    [m] = sn.prepare("extract-x", "", remote_labels(CHAIN1, other))  # nobody serves it: a normal snapshot
    assert m.type == "bind" and sn.stat("extract-x").kind == "active"
    # the broken source is skipped, the next one still serves
    with pytest.raises(AlreadyExistsError):
        sn.prepare("extract-y", "", remote_labels(CHAIN2, D1))
    # hostile labels: InvalidInput, nothing created
    with pytest.raises(InvalidInputError):
        sn.prepare("extract-z", "", remote_labels("sha256:" + "c" * 64, "sha256:../../etc"))
    assert sn.store.find("extract-z") is None and sn.store.find("sha256:" + "c" * 64) is None
    # a source that is down at Mounts time: Unavailable naming the layer
    src.fail_with = UnavailableError("down")
    with pytest.raises(UnavailableError, match=D1):
        sn.prepare("c", CHAIN2)
    assert sn.store.find("c") is None  # nothing half-made left behind
    sn.close()


def test_missing_source_after_restart_is_unavailable(tmp_path: Path, layers: dict[str, list[Path]]) -> None:
    sn = Snapshotter(tmp_path / "root", sources=[FakeSource(layers=layers)])
    with pytest.raises(AlreadyExistsError):
        sn.prepare("e", "", remote_labels(CHAIN1, D1))
    sn.close()
    sn = Snapshotter(tmp_path / "root", sources=[])
    with pytest.raises(UnavailableError, match="not configured"):
        sn.view("v", CHAIN1)
    sn.close()


def _compact(options: list[str]) -> tuple[str, list[str]]:
    """containerd mount.All's compactLowerdirOption: lowerdirs relative to their longest common parent."""
    idx = next(i for i, o in enumerate(options) if o.startswith("lowerdir="))
    dirs = options[idx][len("lowerdir="):].split(":")
    common = os.path.commonprefix(dirs)  # noqa: RUF071 - containerd compares characters
    common = os.path.dirname(common) + "/"
    return common, [*options[:idx], *options[idx + 1:], "lowerdir=" + ":".join(d[len(common):] for d in dirs)]


def test_128_remote_layers_of_3_long_dirs_fit_one_page_and_mount(tmp_path: Path) -> None:
    """128 remote layers x 3 lowerdirs under ~100-character CVMFS-like paths: after containerd's compaction the
    options fit a page, and the kernel mounts them (mount(8) from the common dir, as mount.All does)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount overlayfs")
    long = tmp_path / ("cvmfs/unpacked.cern.ch/.layers/" + "x" * 40)
    layers: dict[str, list[Path]] = {}
    chain: list[tuple[str, str]] = []
    for i in range(128):
        digest = f"sha256:{i:064x}"
        dirs = []
        for j in range(3):
            d = long / digest[7:] / f"p{j}"
            d.mkdir(parents=True)
            (d / f"f{i}-{j}").write_text("x")
            dirs.append(d)
        assert len(str(dirs[0])) > 100
        layers[digest] = dirs
        chain.append((f"sha256:{i + 1000:064x}", digest))
    sn = Snapshotter(tmp_path / "r", sources=[FakeSource(layers=layers)])
    parent = ""
    for cid, digest in chain:
        with pytest.raises(AlreadyExistsError):
            sn.prepare("extract " + cid, parent, remote_labels(cid, digest))
        parent = cid
    [m] = sn.view("top", parent)
    assert len(opts(m)["lowerdir"].split(":")) == 384
    common, compacted = _compact(list(m.options))
    assert common == str(sn.root / "l") + "/"
    data = ",".join(compacted)
    assert len(data) < 4096 - 512, len(data)
    target = tmp_path / "mnt"
    target.mkdir()
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", data, str(target)], cwd=common,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        assert (target / "f0-0").exists() and (target / "f127-2").exists()
        assert len(os.listdir(target)) == 384
    finally:
        subprocess.run(["umount", str(target)], check=True)
    sn.close()


def test_store_readonly_sees_daemon_writes(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "root")
    sn.prepare("a", "")
    ro = Store(tmp_path / "root" / DB_NAME, readonly=True)
    assert [r.key for r in ro.all()] == ["a"]
    sn.prepare("b", "")
    assert [r.key for r in ro.all()] == ["a", "b"]
    ro.close()
    sn.close()
    with pytest.raises(NotFoundError):
        Store(tmp_path / "nothing" / DB_NAME, readonly=True)
