"""CvmfsSource: labels, layer lookup, repository health and errors, building node-local dirs once and atomically."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import threading
from pathlib import Path

import pytest

from cvmfs_snap.errors import IntegrityError, InvalidInputError, NotFoundError, UnavailableError
from cvmfs_snap.labelnames import CRI_LAYER_DIGEST, SNAPSHOT_LAYER_DIGEST, SNAPSHOT_REF, SNAPSHOT_SOURCE
from cvmfs_snap.layout import LayerRecord, RepositoryLayout
from cvmfs_snap.snapshotter.sources.base import LayerSource, RemoteLayer
from cvmfs_snap.snapshotter.sources.cvmfs import CvmfsSource
from cvmfs_snap.snapshotter.sources.overlaydirs import FORMAT_VERSION
from cvmfs_snap_devenv.images import BuiltLayer, Entry, layer
from cvmfs_snap_devenv.registry import Registry
from tests.support.layersource import lookup
from tests.support.layertrees import write_cvmfs_layer

CHAIN = "sha256:" + "c" * 64
HEALTH_LOGGER = "cvmfs_snap.snapshotter.sources.health"


def one_layer() -> BuiltLayer:
    return layer(["d/", ("d/f", b"f"), Entry("d/.wh.gone"), Entry(".wh..wh..opq")])


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, BuiltLayer]:
    lay = one_layer()
    root = tmp_path / "repo"
    write_cvmfs_layer(root, lay)
    return root, lay


def labels(digest: str, key: str = CRI_LAYER_DIGEST) -> dict[str, str]:
    return {SNAPSHOT_REF: CHAIN, key: digest}


def health_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == HEALTH_LOGGER]


# -- lookup ---------------------------------------------------------------------------------------------------


def test_lookup_published_layer(repo: tuple[Path, BuiltLayer], tmp_path: Path) -> None:
    root, lay = repo
    src: LayerSource = CvmfsSource(root, tmp_path / "state", name="cvmfs-a")
    for key in (CRI_LAYER_DIGEST, SNAPSHOT_LAYER_DIGEST):
        got = lookup(src, labels(lay.digest, key))
        assert got == RemoteLayer(source="cvmfs-a", digest=lay.digest,
                                  labels={SNAPSHOT_SOURCE: "cvmfs-a", SNAPSHOT_LAYER_DIGEST: lay.digest})
    both = {**labels(lay.digest), SNAPSHOT_LAYER_DIGEST: lay.digest}
    assert lookup(src, both) is not None


def test_lookup_not_published_or_incomplete(repo: tuple[Path, BuiltLayer], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    root, lay = repo
    src = CvmfsSource(root, tmp_path / "state")
    other = layer([("x", b"x")])
    assert lookup(src, labels(other.digest)) is None
    with pytest.raises(NotFoundError, match=other.digest):
        src.lowerdirs(other.digest)
    # without the chain ID or without a digest there is nothing to serve
    assert lookup(src, {CRI_LAYER_DIGEST: lay.digest}) is None
    assert lookup(src, {SNAPSHOT_REF: CHAIN}) is None
    # layer.json (written last by publishers) but no layerfs: broken, not complete
    partial = layer([("p", b"p")])
    lay_out = RepositoryLayout(root)
    lay_out.layer_metadata_dir(partial.digest).mkdir(parents=True)
    lay_out.layer_json(partial.digest).write_text(LayerRecord(partial.digest, partial.diff_id, partial.media_type,
                                                              1, 1, 1).to_json())
    # a malformed layer.json: not served, one warning naming the file however often it is asked
    broken = layer([("b", b"b")])
    write_cvmfs_layer(root, broken)
    lay_out.layer_json(broken.digest).write_text("{not json")
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        assert lookup(src, labels(broken.digest)) is None
        assert lookup(src, labels(partial.digest)) is None
    for digest in (broken.digest, partial.digest):
        warnings = [r for r in caplog.records if digest in r.getMessage()]
        assert len(warnings) == 1 and "layer.json exists but is malformed" in warnings[0].getMessage()


@pytest.mark.parametrize("digest", [
    "sha256:../../../../etc/passwd",
    "sha256:" + "a" * 63 + "/",
    "sha256:" + "A" * 64,
    "md5:" + "a" * 32,
    "sha512:" + "a" * 128,
    "../" + "a" * 64,
    "",
])
def test_hostile_digest_labels(repo: tuple[Path, BuiltLayer], tmp_path: Path, digest: str) -> None:
    root, _ = repo
    src = CvmfsSource(root, tmp_path / "state")
    for key in (CRI_LAYER_DIGEST, SNAPSHOT_LAYER_DIGEST):
        with pytest.raises(InvalidInputError):
            lookup(src, labels(digest, key))
    with pytest.raises(InvalidInputError):
        src.lowerdirs(digest)
    assert not (tmp_path / "state").exists() or not [p for p in (tmp_path / "state").iterdir()]


def test_contradictory_digest_labels(repo: tuple[Path, BuiltLayer], tmp_path: Path) -> None:
    root, lay = repo
    src = CvmfsSource(root, tmp_path / "state")
    with pytest.raises(InvalidInputError, match="contradictory"):
        lookup(src, {**labels(lay.digest), SNAPSHOT_LAYER_DIGEST: "sha256:" + "0" * 64})


# -- health ---------------------------------------------------------------------------------------------------


def test_missing_repository_is_unavailable_and_logged_once(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    lay = one_layer()
    src = CvmfsSource(tmp_path / "no-such-repo", tmp_path / "state", health_ttl=0)
    caplog.set_level(logging.INFO)
    for _ in range(4):
        assert lookup(src, labels(lay.digest)) is None
    with pytest.raises(UnavailableError, match="not available"):
        src.lowerdirs(lay.digest)
    recs = health_records(caplog)
    assert len(recs) == 1 and recs[0].levelno == logging.ERROR
    assert "unavailable" in recs[0].getMessage() and "ENOENT" in recs[0].getMessage()
    assert not src.health().available


def test_repository_vanishes_and_comes_back(repo: tuple[Path, BuiltLayer], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    root, lay = repo
    os.setxattr(root, "user.revision", b"42")
    os.setxattr(root, "user.fqrn", b"unpacked.example.org")
    src = CvmfsSource(root, tmp_path / "state", health_ttl=0)
    caplog.set_level(logging.INFO)
    assert lookup(src, labels(lay.digest)) is not None
    assert src.health().available
    st = src.repository_status()
    assert st.available and st.revision == 42 and st.fqrn == "unpacked.example.org"
    first = src.lowerdirs(lay.digest)

    os.rename(root, tmp_path / "away")
    for _ in range(3):
        assert lookup(src, labels(lay.digest)) is None
    with pytest.raises(UnavailableError):
        src.lowerdirs(lay.digest)
    os.rename(tmp_path / "away", root)
    for _ in range(3):
        assert lookup(src, labels(lay.digest)) is not None
    assert src.lowerdirs(lay.digest) == first

    msgs = [r.getMessage() for r in health_records(caplog)]
    assert len(msgs) == 3, msgs
    assert "is available (repository unpacked.example.org, revision 42)" in msgs[0]
    assert "unavailable" in msgs[1]
    assert "available again" in msgs[2]


def test_health_is_cached(repo: tuple[Path, BuiltLayer], tmp_path: Path) -> None:
    root, lay = repo
    src = CvmfsSource(root, tmp_path / "state", health_ttl=3600)
    assert lookup(src, labels(lay.digest)) is not None
    os.rename(root, tmp_path / "away")
    # within the TTL the cached "available" stands; the layer lookup itself then finds nothing
    assert src.health().available
    assert lookup(src, labels(lay.digest)) is None
    assert not src.health(force=True).available


# -- node-local dirs ------------------------------------------------------------------------------------------


def test_lowerdirs_built_once_under_concurrency(repo: tuple[Path, BuiltLayer], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    root, lay = repo
    state = tmp_path / "state"
    src = CvmfsSource(root, state)
    caplog.set_level(logging.INFO)
    results: list[list[Path]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        try:
            results.append(src.lowerdirs(lay.digest))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 8 and all(r == results[0] for r in results)
    built = [r for r in caplog.records if "built node-local overlay dirs" in r.getMessage()]
    assert len(built) == 1
    hexd = lay.digest[7:]
    assert sorted(os.listdir(state)) == [f"v{FORMAT_VERSION}"] and src.held() == [lay.digest]
    mask, layerfs, lower = results[0]
    built_at = state / f"v{FORMAT_VERSION}" / hexd
    assert mask == built_at / "upper" and lower == built_at / "lower"
    assert layerfs == RepositoryLayout(root.resolve()).layerfs(lay.digest)
    # whiteouts above the layerfs: the .wh.* files, the catalog marker, the deletion; the opaque root below it
    assert sorted(os.listdir(mask)) == [".cvmfscatalog", ".wh..wh..opq", "d"]
    assert sorted(os.listdir(mask / "d")) == [".wh.gone", "gone"]
    assert os.listdir(lower) == [] and os.getxattr(lower, "trusted.overlay.opaque") == b"y"
    wh = os.lstat(mask / "d" / "gone")
    assert (wh.st_mode & 0o170000, wh.st_rdev) == (0o020000, 0)
    # a second source on the same state dir (snapshotter restart) reuses the built dirs
    caplog.clear()
    assert CvmfsSource(root, state).lowerdirs(lay.digest) == results[0]
    assert not [r for r in caplog.records if "built node-local" in r.getMessage()]


def test_crash_leftovers_are_not_used(repo: tuple[Path, BuiltLayer], tmp_path: Path) -> None:
    root, lay = repo
    state = tmp_path / "state"
    hexd = lay.digest[7:]
    # a build that died half-way leaves only a temporary dir; a dir without meta.json is not a finished build:
    # it is not used, and not removed either (only release() removes what may be in use)
    (state / f".tmp-{hexd[:16]}-dead" / "upper").mkdir(parents=True)
    (state / hexd / "upper").mkdir(parents=True)
    src = CvmfsSource(root, state)
    assert not [n for n in os.listdir(state) if n.startswith(".tmp-")]
    dirs = src.lowerdirs(lay.digest)
    built_at = state / f"v{FORMAT_VERSION}" / hexd
    assert len(dirs) == 3 and json.loads((built_at / "meta.json").read_text())["version"] == FORMAT_VERSION
    assert dirs[0] == built_at / "upper" and (state / hexd / "upper").is_dir()
    assert sorted(os.listdir(state)) == sorted([hexd, f"v{FORMAT_VERSION}"])


def test_corrupt_index_fails_cleanly(tmp_path: Path) -> None:
    lay = layer(["d/", ("d/f", b"f")])
    root = tmp_path / "repo"
    write_cvmfs_layer(root, lay)
    lo = RepositoryLayout(root)
    rec = LayerRecord.from_json(lo.layer_json(lay.digest).read_text())
    rec.whiteouts = ["d/../../../../escape"]
    lo.layer_json(lay.digest).write_text(rec.to_json())
    state = tmp_path / "state"
    src = CvmfsSource(root, state)
    with pytest.raises(IntegrityError, match="unsafe path"):
        src.lowerdirs(lay.digest)
    assert os.listdir(state) == []
    assert not (tmp_path / "escape").exists()


def test_old_format_dirs_in_use_are_never_touched(repo: tuple[Path, BuiltLayer], tmp_path: Path) -> None:
    """After an upgrade, the dirs an older version built (lowerdirs of running containers) stay as they are: the
    new format is built beside them; release() (no snapshot uses the layer) removes every version."""
    root, lay = repo
    state = tmp_path / "state"
    hexd = lay.digest[7:]
    old = state / hexd
    (old / "upper" / "d").mkdir(parents=True)
    os.mknod(old / "upper" / "d" / "gone", 0o020000, os.makedev(0, 0))
    (old / "meta.json").write_text(json.dumps({"version": FORMAT_VERSION - 1, "upper": True, "lower": False}))
    before = os.lstat(old / "upper" / "d" / "gone")
    src = CvmfsSource(root, state)
    dirs = src.lowerdirs(lay.digest)
    assert dirs[0] == state / f"v{FORMAT_VERSION}" / hexd / "upper"
    after = os.lstat(old / "upper" / "d" / "gone")
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    assert json.loads((old / "meta.json").read_text())["version"] == FORMAT_VERSION - 1
    assert src.held() == [lay.digest]
    # a restart finds the new dirs and still leaves the old ones alone
    assert CvmfsSource(root, state).lowerdirs(lay.digest) == dirs and old.is_dir()
    src.release(lay.digest)
    assert not old.exists() and not dirs[0].exists() and src.held() == []
    assert src.lowerdirs(lay.digest) == dirs and dirs[0].exists()


def test_current_legacy_dirs_are_reused_in_place(repo: tuple[Path, BuiltLayer], tmp_path: Path) -> None:
    root, lay = repo
    state = tmp_path / "state"
    first = CvmfsSource(root, state).lowerdirs(lay.digest)
    hexd = lay.digest[7:]
    os.rename(state / f"v{FORMAT_VERSION}" / hexd, state / hexd)  # where releases before 0.x built them
    dirs = CvmfsSource(root, state).lowerdirs(lay.digest)
    assert dirs[0] == state / hexd / "upper" and first[0] != dirs[0]


def test_layer_removed_from_repository(repo: tuple[Path, BuiltLayer], tmp_path: Path) -> None:
    import shutil

    root, lay = repo
    src = CvmfsSource(root, tmp_path / "state")
    src.lowerdirs(lay.digest)
    shutil.rmtree(RepositoryLayout(root).layer_dir(lay.digest))
    with pytest.raises(NotFoundError, match="no longer published"):
        src.lowerdirs(lay.digest)


def test_repository_gone_is_unavailable_not_missing_layer(repo: tuple[Path, BuiltLayer], tmp_path: Path) -> None:
    """Within the health cache's lifetime the repository vanishes: Mounts must say "repository unavailable", never
    "layer no longer published, pull again" (wrong advice during a CVMFS outage), and work again once it is back."""
    root, lay = repo
    src = CvmfsSource(root, tmp_path / "state", health_ttl=3600)
    first = src.lowerdirs(lay.digest)
    root.rename(tmp_path / "away")
    with pytest.raises(UnavailableError, match="not available"):
        src.lowerdirs(lay.digest)
    (tmp_path / "away").rename(root)
    assert src.lowerdirs(lay.digest) == first


@pytest.mark.timeout(60)
def test_hung_repository_does_not_block(short_tmp: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A FUSE mount that never answers: lookups come back (None), Mounts fail with UnavailableError, and stuck
    worker threads stay bounded."""
    from cvmfs_snap.snapshotter.sources import health
    from tests.support.hangfs import hung_mount

    lay = one_layer()
    caplog.set_level(logging.INFO)
    with hung_mount(short_tmp / "cvmfs") as mnt:
        src = CvmfsSource(mnt, tmp_path / "state", health_ttl=0, fs_timeout=0.3)
        for _ in range(health.MAX_STUCK_CALLS + 4):
            assert lookup(src, labels(lay.digest)) is None
        with pytest.raises(UnavailableError, match="hung"):
            src.lowerdirs(lay.digest)
        stuck = [t for t in threading.enumerate() if t.name.startswith("cvmfs-fs-call")]
        assert 1 <= len(stuck) <= health.MAX_STUCK_CALLS
        recs = health_records(caplog)
        assert len(recs) == 1 and "no answer within 0.3 s" in recs[0].getMessage()
    # the FUSE daemon is gone: the kernel failed the pending calls and the threads ended
    for t in stuck:
        t.join(10)
    assert not [t for t in stuck if t.is_alive()]


def test_index_entries_outside_real_dirs_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An index naming paths through a symlink or a missing dir must not make the mask/lower dirs add (or turn a
    symlink into) a directory."""
    from tests.support.layertrees import mounted_overlay

    lay = layer(["real/", ("real/x", b"x"), Entry("linkdir", "symlink", linkname="real")])
    root = tmp_path / "repo"
    write_cvmfs_layer(root, lay, marker=False)
    lo = RepositoryLayout(root)
    rec = LayerRecord.from_json(lo.layer_json(lay.digest).read_text())
    rec.whiteouts = ["linkdir/x", "missing/y"]
    rec.opaque_dirs = ["linkdir", "missing"]
    lo.layer_json(lay.digest).write_text(rec.to_json())
    caplog.set_level(logging.WARNING)
    dirs = CvmfsSource(root, tmp_path / "state").lowerdirs(lay.digest)
    assert dirs == [lo.layerfs(lay.digest).resolve()]
    # 2 deletions, 2 opaque dirs, and the 4 .wh.* files they imply
    assert any("8 whiteout index entries" in r.getMessage() and "were ignored" in r.getMessage()
               for r in caplog.records)
    with mounted_overlay(dirs, tmp_path / "m") as m:
        assert os.readlink(m / "linkdir") == "real" and (m / "real/x").read_bytes() == b"x"


# -- a client claiming ownership (CVMFS_CLAIM_OWNERSHIP=yes) --------------------------------------------------


def chown_tree(top: Path, uid: int, gid: int) -> None:
    from cvmfs_snap.fsutil import walk

    for d, _dirs, files in walk(top):
        os.lchown(d, uid, gid)
        for f in files:
            os.lchown(os.path.join(d, f), uid, gid)


def test_claiming_client_is_refused_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's tar (and layer.json's digest of it) says root owns d/ and d/f; a claiming client shows the
    cvmfs user everywhere. That source serves nothing (normal pulls) and says why, once."""
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    lay = one_layer()
    with tarfile.open(fileobj=io.BytesIO(lay.tar)) as tf:
        assert {(m.uid, m.gid) for m in tf.getmembers()} == {(0, 0)}  # what the image records
    root = tmp_path / "repo"
    write_cvmfs_layer(root, lay)
    cvmfs_user = (4242, 4343)
    # a healthy client shows the recorded owners: served
    assert lookup(CvmfsSource(root, tmp_path / "s0", claim_owner=cvmfs_user), labels(lay.digest)) is not None
    chown_tree(RepositoryLayout(root).layerfs(lay.digest), *cvmfs_user)
    src = CvmfsSource(root, tmp_path / "state", claim_owner=cvmfs_user)
    caplog.set_level(logging.INFO)
    for _ in range(3):
        assert lookup(src, labels(lay.digest)) is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "CVMFS_CLAIM_OWNERSHIP=no" in errors[0].getMessage()
    assert "uid 4242, gid 4343" in errors[0].getMessage()
    health = src.health()
    assert not health.available and "claims ownership" in health.reason
    # the check is off without a cvmfs user on the node
    assert lookup(CvmfsSource(root, tmp_path / "s1", claim_owner=None), labels(lay.digest)) is not None
    # remounted without claiming: served again after the verdict's TTL
    monkeypatch.setattr("cvmfs_snap.snapshotter.sources.cvmfs.OWNER_TTL", 0.0)
    chown_tree(RepositoryLayout(root).layerfs(lay.digest), 0, 0)
    assert lookup(src, labels(lay.digest)) is not None
    assert src.health().available
    assert any("real owners again" in r.getMessage() for r in caplog.records)


# -- what cvmfs_server ingest loses: xattrs and hard links (layer.json `xattrs`, `hardlinks`) -------------------

CAP = bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000")


def ingested_layer(tmp_path: Path) -> tuple[Path, BuiltLayer]:
    """A layer as ``cvmfs_server ingest`` leaves it: no xattrs in the tree, the hard link pair as two copies;
    layer.json records both."""
    import base64

    lay = layer(["bin/", Entry("bin/ping", data=b"#!/bin/sh\necho ping\n", mode=0o4755, uid=12, gid=34),
                 "hl/", Entry("hl/a", data=b"linked\n", mode=0o640, uid=1000, gid=1000),
                 Entry("hl/b", data=b"linked\n", mode=0o644, uid=1000, gid=1000),  # a later header wins
                 "xd/", ("xd/inner", b"i"), ("big", b"0123456789")])
    root = tmp_path / "repo"
    write_cvmfs_layer(root, lay, marker=False)
    lo = RepositoryLayout(root)
    rec = LayerRecord.from_json(lo.layer_json(lay.digest).read_text())

    def b64(v: bytes) -> str:
        return base64.b64encode(v).decode()

    rec.xattrs = {"bin/ping": {"security.capability": b64(CAP), "user.x": b64(b"y"),
                               "trusted.overlay.opaque": b64(b"y"), "trusted.t": b64(b"t")},
                  "xd": {"user.dir": b64(b"yes")}, "big": {"user.big": b64(b"1")}}
    rec.hardlinks = [["hl/b", "hl/a"]]
    lo.layer_json(lay.digest).write_text(rec.to_json())
    return root, lay


def test_mask_restores_xattrs_and_hardlinks(tmp_path: Path) -> None:
    from tests.support.layertrees import mounted_overlay

    root, lay = ingested_layer(tmp_path)
    layerfs = RepositoryLayout(root).layerfs(lay.digest)
    assert os.listxattr(layerfs / "bin/ping") == [] and os.stat(layerfs / "hl/a").st_nlink == 1
    dirs = CvmfsSource(root, tmp_path / "state").lowerdirs(lay.digest)
    assert len(dirs) == 2 and f"/v{FORMAT_VERSION}/" in str(dirs[0])
    with mounted_overlay(dirs, tmp_path / "m") as m:
        ping = m / "bin/ping"
        assert sorted(os.listxattr(ping)) == ["security.capability", "trusted.t", "user.x"]
        assert os.getxattr(ping, "security.capability") == CAP and os.getxattr(ping, "user.x") == b"y"
        st, orig = os.stat(ping), os.stat(layerfs / "bin/ping")
        assert (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == (orig.st_mode, 12, 34, orig.st_mtime_ns)
        assert ping.read_bytes() == b"#!/bin/sh\necho ping\n"
        a, b = os.stat(m / "hl/a"), os.stat(m / "hl/b")
        assert a.st_ino == b.st_ino and a.st_nlink == 2 and (a.st_uid, a.st_mode & 0o777) == (1000, 0o644)
        assert (m / "hl/b").read_bytes() == b"linked\n"
        assert os.getxattr(m / "xd", "user.dir") == b"yes" and (m / "xd/inner").read_bytes() == b"i"
        assert os.stat(m / "xd").st_mtime_ns == os.stat(layerfs / "xd").st_mtime_ns
        assert os.getxattr(m / "big", "user.big") == b"1"


def test_mask_copy_limit_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.support.layertrees import mounted_overlay

    root, lay = ingested_layer(tmp_path)
    src = CvmfsSource(root, tmp_path / "state")
    src.dirs.copy_limit = 12  # big (10 bytes, first in layer.json's sorted order) fits; bin/ping and hl/a do not
    caplog.set_level(logging.WARNING)
    dirs = src.lowerdirs(lay.digest)
    warnings = [r.getMessage() for r in caplog.records if "xattrs or hard links CVMFS lost" in r.getMessage()]
    assert len(warnings) == 1 and "2 of them" in warnings[0]
    with mounted_overlay(dirs, tmp_path / "m") as m:
        assert os.getxattr(m / "big", "user.big") == b"1"
        assert os.listxattr(m / "bin/ping") == [] and os.stat(m / "hl/a").st_nlink == 1


def test_malformed_xattr_value_is_integrity_error(tmp_path: Path) -> None:
    root, lay = ingested_layer(tmp_path)
    lo = RepositoryLayout(root)
    rec = LayerRecord.from_json(lo.layer_json(lay.digest).read_text())
    rec.xattrs = {"bin/ping": {"user.x": "not base64!"}}
    lo.layer_json(lay.digest).write_text(rec.to_json())
    with pytest.raises(IntegrityError, match="malformed value of xattr"):
        CvmfsSource(root, tmp_path / "state").lowerdirs(lay.digest)
    assert not list((tmp_path / "state").glob(".tmp-*"))


@pytest.mark.parametrize("kind", ["fake", "real"])
def test_ingested_layer_gets_xattrs_and_hardlinks_back_on_the_node(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Registry
) -> None:
    """Published with the cvmfs-ingest backend (the recording stand-in, or the real stratum-0 where there is one),
    read through the node's view of the repository: the container's tree has the tar's xattrs and shared inode."""
    import uuid

    from cvmfs_snap.oci import RegistryClient
    from cvmfs_snap_devenv import images as im
    from publisher.pipeline import Publisher
    from tests.support.cvmfs_targets import make_target
    from tests.support.layertrees import mounted_overlay

    target = make_target(kind, "cvmfs-ingest", tmp_path, monkeypatch)
    marker = uuid.uuid4().hex
    lay = im.layer(["bin/", Entry("bin/tool", data=f"tool {marker}\n".encode(), mode=0o755, uid=1000, gid=1000),
                    Entry("bin/tool-link", type="hardlink", linkname="bin/tool"),
                    Entry("bin/ping", data=b"ping", mode=0o4755,
                          pax={"SCHILY.xattr.security.capability": CAP.decode("latin-1"),
                               "SCHILY.xattr.user.x": "y"})])
    name = f"node-xattrs/{kind}-{marker[:8]}"
    im.push_image(registry.url, name, "v1", im.image([lay]))
    with RegistryClient(timeout=30, retries=1) as client:
        backend = target.backend()
        backend.recover()
        with Publisher(backend, client, concurrency=1) as pub:
            res = pub.publish_image(registry.ref(name, "v1"))
    assert res.ok, res.error
    seen = target.client_path()
    lfs = RepositoryLayout(seen).layerfs(lay.digest)
    assert os.listxattr(lfs / "bin/ping") == []  # what CVMFS lost
    dirs = CvmfsSource(seen, tmp_path / "state", claim_owner=None).lowerdirs(lay.digest)
    with mounted_overlay(dirs, tmp_path / "m") as m:
        assert os.getxattr(m / "bin/ping", "security.capability") == CAP
        assert os.getxattr(m / "bin/ping", "user.x") == b"y"
        assert os.stat(m / "bin/ping").st_mode & 0o7777 == 0o4755
        a, b = os.stat(m / "bin/tool"), os.stat(m / "bin/tool-link")
        assert a.st_ino == b.st_ino and a.st_nlink == 2 and a.st_uid == 1000
        assert (m / "bin/tool-link").read_text() == f"tool {marker}\n"
