"""The snapshot core after things went wrong: lost metadata under a running overlay container, a crash between a
snapshot's directory and its row (kill -9 of a real process), a corrupt row, 5,000-level trees in upper dirs."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cvmfs_snap.errors import AlreadyExistsError, IntegrityError
from cvmfs_snap.fsutil import make_deep_tree, walk_fd
from cvmfs_snap.labelnames import CRI_LAYER_DIGEST, SNAPSHOT_REF
from cvmfs_snap.snapshotter.core import Mount, Snapshotter
from cvmfs_snap.snapshotter.mountinfo import is_pinned, pinned_paths
from cvmfs_snap.snapshotter.store import DB_NAME
from tests.test_snapshotter_core import commit_layer

DEPTH = 5000

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount overlayfs")


@contextmanager
def mounted(m: Mount, target: Path) -> Iterator[Path]:
    """Mount what the snapshotter answered, as containerd would (absolute paths: no compaction needed here)."""
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", m.type, m.source, "-o", ",".join(m.options), str(target)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def lose_metadata(root: Path, how: str) -> None:
    db = root / DB_NAME
    if how == "emptied":
        for suffix in ("-wal", "-shm"):
            (root / (DB_NAME + suffix)).unlink(missing_ok=True)
        db.write_bytes(b"")
    else:  # a garbage WAL: sqlite ignores frames whose checksums fail, and the rows in it are gone
        with sqlite3.connect(db) as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            c.execute("DELETE FROM snapshots")
        c.close()
        (root / (DB_NAME + "-wal")).write_bytes(os.urandom(64 << 10))


# -- metadata loss --------------------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("how", ["emptied", "garbage-wal"])
def test_metadata_loss_never_deletes_a_running_containers_dirs(tmp_path: Path, how: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "root"
    sn = Snapshotter(root)
    commit_layer(sn, "base", files={"lower-file": b"from the image\n"})
    [m] = sn.prepare("ctr", "base")
    ctr = sn.store.get("ctr")
    base = sn.store.get("base")
    ctr_dir, base_dir = sn.snapshot_dir(ctr), sn.snapshot_dir(base)
    with mounted(m, tmp_path / "rootfs") as rootfs:
        (rootfs / "written-by-container").write_text("precious\n")
        sn.close()
        lose_metadata(root, how)

        sn2 = Snapshotter(root)
        assert sn2.walk() == []
        new = []
        for i in range(4):  # the old code handed out ids 1, 2, ... again and removed their directories
            sn2.prepare(f"new{i}", "")
            new.append(sn2.store.get(f"new{i}").id)
        assert not {ctr.id, base.id} & set(new)
        caplog.set_level(logging.WARNING)
        removed = sn2.cleanup()
        assert str(ctr_dir) not in removed and str(base_dir) not in removed
        assert any("a mount uses it" in r.getMessage() for r in caplog.records)
        # a second Cleanup still sees that the lower dir is in use (its short link was kept)
        sn2.cleanup()
        assert (rootfs / "written-by-container").read_text() == "precious\n"
        assert (rootfs / "lower-file").read_text() == "from the image\n"
        assert (ctr_dir / "fs" / "written-by-container").is_file() and (base_dir / "fs" / "lower-file").is_file()
    # unmounted, the unknown directories are provably unused: Cleanup collects them
    removed = sn2.cleanup()
    assert str(ctr_dir) in removed and str(base_dir) in removed
    assert not ctr_dir.exists() and not base_dir.exists()
    assert sorted(int(p.name) for p in (root / "snapshots").iterdir()) == sorted(new)
    sn2.close()


def test_pinned_paths_parse_overlay_bind_and_relative_lowerdirs(tmp_path: Path) -> None:
    links = tmp_path / "l"
    links.mkdir()
    os.symlink(str(tmp_path / "snapshots" / "7" / "fs"), links / "7")
    info = tmp_path / "mountinfo"
    info.write_text(
        "20 1 0:5 / / rw - ext4 /dev/sda1 rw\n"
        "30 20 0:44 / /run/ctr/rootfs rw - overlay overlay rw,lowerdir=7:8-1,"
        f"upperdir={tmp_path}/snapshots/9/fs,workdir={tmp_path}/snapshots/9/work\n"
        f"31 20 0:5 {tmp_path}/snapshots/12/fs /run/view rw - ext4 /dev/sda1 rw\n"
        "32 20 0:46 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"
    )
    pinned = pinned_paths([links], [links], mountinfo=str(info))
    for n, used in (("7", True), ("8", False), ("9", True), ("12", True), ("13", False)):
        assert is_pinned(tmp_path / "snapshots" / n, pinned) is used, n
    assert is_pinned(links / "8-1", pinned) and "/mnt/with space" in pinned
    assert not is_pinned(tmp_path / "snapshots" / "1", pinned)  # "1" must not match "12"


# -- crash between directory and row --------------------------------------------------------------------------

_CRASHER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from cvmfs_snap.snapshotter.core import Snapshotter
    root, point = Path(sys.argv[1]), sys.argv[2]
    sn = Snapshotter(root)
    real_rename = os.rename
    def rename(src, dst, *a, **k):
        if point == "before-rename" and "/.tmp-" in str(src):
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst, *a, **k)
        if point == "after-rename" and "/.tmp-" in str(src):
            os.kill(os.getpid(), signal.SIGKILL)  # the row's transaction never commits
    os.rename = rename
    sn.prepare("victim", "")
""")


@pytest.mark.parametrize("point", ["before-rename", "after-rename"])
def test_kill_9_between_directory_and_row(tmp_path: Path, point: str) -> None:
    root = tmp_path / "root"
    sn = Snapshotter(root)
    sn.prepare("first", "")
    first = sn.store.get("first").id
    sn.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", _CRASHER, str(root), point], env=env, capture_output=True,
                       text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    left = sorted(n for n in os.listdir(root / "snapshots") if n != str(first))
    assert len(left) == 1 and left[0].startswith(".tmp-" if point == "before-rename" else str(first + 1)), left

    sn = Snapshotter(root)
    assert [i.name for i in sn.walk()] == ["first"]  # never a row without a directory
    sn.prepare("victim", "")
    assert sn.store.get("victim").id != first + 1 or point == "before-rename"
    assert sn.fs_dir(sn.store.get("victim")).is_dir()
    orphan = root / "snapshots" / left[0]
    old = time.time() - 3600
    os.utime(orphan, (old, old))  # a temporary dir younger than a minute may belong to a running Prepare
    assert str(orphan) in sn.cleanup()
    assert sorted(os.listdir(root / "snapshots")) == sorted(str(sn.store.get(k).id) for k in ("first", "victim"))
    sn.close()


# -- corrupt rows ---------------------------------------------------------------------------------------------


def test_one_corrupt_row_is_skipped_by_list_and_reported_once(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    sn = Snapshotter(tmp_path / "root")
    for k in ("a", "b", "c"):
        sn.prepare(k, "")
    with sn.store._lock:  # corrupt one row the way a bad disk or a hand edit would
        sn.store._db.execute("UPDATE snapshots SET labels = '{not json' WHERE key = 'b'")
        sn.store._db.execute("UPDATE snapshots SET created = 'yesterday' WHERE key = 'c'")
    caplog.set_level(logging.WARNING)
    assert [i.name for i in sn.walk()] == ["a"]
    assert [i.name for i in sn.walk()] == ["a"]
    warnings = [r.getMessage() for r in caplog.records if "skipping a snapshot" in r.getMessage()]
    assert len(warnings) == 2 and "'b'" in warnings[0] and "'c'" in warnings[1]
    with pytest.raises(IntegrityError, match="corrupt"):
        sn.stat("b")
    sn.remove("b")  # the way out the message gives
    assert [i.name for i in sn.walk()] == ["a"] and not sn.snapshot_dir(sn.store.get("a")).parent.joinpath("2").exists()
    sn.close()


# -- deep trees -----------------------------------------------------------------------------------------------


def test_5000_level_tree_in_an_upper_dir_commits_removes_and_cleans_up(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "root")
    sn.prepare("deep-active", "")
    make_deep_tree(sn.fs_dir(sn.store.get("deep-active")), DEPTH)
    sn.commit("deep", "deep-active")
    usage = sn.usage("deep")
    assert usage.inodes == DEPTH + 2  # fs, 5,000 dirs, the leaf
    sn.prepare("ctr", "")
    ctr = sn.store.get("ctr")
    make_deep_tree(sn.fs_dir(ctr), DEPTH)
    assert sn.usage("ctr").inodes == DEPTH + 2
    sn.remove("ctr")
    assert not sn.snapshot_dir(ctr).exists()
    # a deep directory the metadata does not know (a failed remove, a crash)
    orphan = sn.root / "snapshots" / "4242"
    make_deep_tree(orphan / "fs", DEPTH)
    assert str(orphan) in sn.cleanup()
    assert not orphan.exists()
    sn.remove("deep")
    assert sorted(os.listdir(sn.root / "snapshots")) == []
    assert [rel for rel, _fd, _d, _f in walk_fd(sn.root / "snapshots")] == [""]
    sn.close()


# -- schema upgrade -------------------------------------------------------------------------------------------


def test_metadata_of_the_previous_schema_is_read_and_upgraded(tmp_path: Path) -> None:
    from cvmfs_snap.snapshotter.sources.base import LayerRequest
    from cvmfs_snap.snapshotter.store import Store
    from tests.support.layersource import FakeSource

    root = tmp_path / "root"
    root.mkdir()
    with sqlite3.connect(root / DB_NAME) as c:  # what releases with schema 1 wrote
        c.executescript("""
            CREATE TABLE snapshots (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')), parent TEXT NOT NULL DEFAULT '',
                labels TEXT NOT NULL DEFAULT '{}', created INTEGER NOT NULL, updated INTEGER NOT NULL,
                source TEXT NOT NULL DEFAULT '', digest TEXT NOT NULL DEFAULT '', size INTEGER NOT NULL DEFAULT 0,
                inodes INTEGER NOT NULL DEFAULT 0);
            INSERT INTO snapshots (key, kind, labels, created, updated, source, digest)
                VALUES ('chain', 'committed', '{}', 1, 1, 'cvmfs', 'sha256:%s');
            PRAGMA user_version=1;
        """ % ("1" * 64))
    c.close()
    ro = Store(root / DB_NAME, readonly=True)  # `cvmfs-snap status` before the daemon was upgraded
    assert [(r.key, r.request) for r in ro.all()] == [("chain", "")]
    ro.close()
    sn = Snapshotter(root)
    rec = sn.store.get("chain")
    assert (rec.source, rec.request) == ("cvmfs", "")
    assert sn.store.remote_layers() == [("cvmfs", "chain", "sha256:" + "1" * 64, "")]
    sn.sources = [src := FakeSource(name="cvmfs")]
    sn.restore_sources()  # a snapshot stored before requests were: the bare request of its digest and name
    assert src.restored == [LayerRequest("chain", "sha256:" + "1" * 64)]
    sn.close()


@needs_root
def test_metadata_loss_keeps_the_cvmfs_dirs_a_running_container_uses(tmp_path: Path) -> None:
    from cvmfs_snap.snapshotter.sources.cvmfs import CvmfsSource
    from cvmfs_snap_devenv.images import Entry, layer
    from tests.support.layertrees import write_cvmfs_layer

    lay = layer(["d/", ("d/f", b"f"), Entry("d/.wh.gone")])
    repo = tmp_path / "repo"
    write_cvmfs_layer(repo, lay)
    root = tmp_path / "root"
    chain1, chain2 = "sha256:" + "c" * 64, "sha256:" + "d" * 64

    def snapshotter() -> tuple[Snapshotter, CvmfsSource]:
        src = CvmfsSource(repo, root / "cvmfs", claim_owner=None)
        return Snapshotter(root, sources=[src]), src

    sn, src = snapshotter()
    with pytest.raises(AlreadyExistsError, match="already exists"):
        sn.prepare("x", "", {SNAPSHOT_REF: chain1, CRI_LAYER_DIGEST: lay.digest})
    [m] = sn.prepare("ctr", chain1)
    with mounted(m, tmp_path / "rootfs") as rootfs:
        assert sorted(os.listdir(rootfs / "d")) == ["f"]  # the mask hides d/.wh.gone
        sn.close()
        lose_metadata(root, "emptied")
        sn, src = snapshotter()
        sn.cleanup()
        assert src.held() == [lay.digest]
        # the same layer pulled again, then removed: its dirs are still the running container's lowerdirs
        with pytest.raises(AlreadyExistsError, match="already exists"):
            sn.prepare("y", "", {SNAPSHOT_REF: chain2, CRI_LAYER_DIGEST: lay.digest})
        sn.view("v", chain2)
        sn.remove("v")
        sn.remove(chain2)
        sn.cleanup()
        assert src.held() == [lay.digest]
        assert sorted(os.listdir(rootfs / "d")) == ["f"]
    sn.cleanup()
    assert src.held() == []
    sn.close()


def test_cleanup_names_rows_whose_directory_is_gone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cvmfs_snap.fsutil import remove_tree

    sn = Snapshotter(tmp_path / "root")
    sn.prepare("a", "")
    remove_tree(sn.snapshot_dir(sn.store.get("a")))  # what the row-first Prepare of older releases could leave
    caplog.set_level(logging.WARNING)
    sn.cleanup()
    assert any("'a' has no directory" in r.getMessage() for r in caplog.records)
    sn.remove("a")
    sn.close()


def test_cleanup_racing_prepares_never_takes_a_live_directory(tmp_path: Path) -> None:
    import threading

    sn = Snapshotter(tmp_path / "root")
    stop = threading.Event()
    errors: list[BaseException] = []

    def prepares(n: int) -> None:
        try:
            for i in range(60):
                sn.prepare(f"t{n}-{i}", "")
                if i % 3 == 0:
                    sn.remove(f"t{n}-{i}")
        except BaseException as exc:
            errors.append(exc)

    def cleanups() -> None:
        while not stop.is_set():
            try:
                sn.cleanup()
            except BaseException as exc:
                errors.append(exc)
                return

    workers = [threading.Thread(target=prepares, args=(n,)) for n in range(4)]
    cleaner = threading.Thread(target=cleanups)
    cleaner.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    cleaner.join()
    assert not errors
    infos = sn.walk()
    assert len(infos) == 4 * 40
    for info in infos:
        assert sn.fs_dir(sn.store.get(info.name)).is_dir(), info.name
    assert sorted(os.listdir(sn.root / "snapshots")) == sorted(str(sn.store.get(i.name).id) for i in infos)
    sn.close()
