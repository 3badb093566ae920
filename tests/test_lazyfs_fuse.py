"""Our FUSE kernel-protocol loop (cvmfs_snap/lazyfs/fuse.py), on a real mount: what its INIT answer buys (no-open
and no-opendir mode, cached listings, READDIRPLUS), counted in the requests that reach the process; its answers to
xattr size queries; a kernel too old is refused."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from cvmfs_snap.errors import UnavailableError
from cvmfs_snap.lazyfs import fuse
from cvmfs_snap.lazyfs.fs import LazyFS
from cvmfs_snap_devenv.images import Entry, make_tar
from tests.support.estargz import to_estargz
from tests.support.lazyfs_mount import MountedFS, mounted_lazyfs

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root (mount(2))")

LID = "f" * 64
FILES = {f"d/f{i:03d}": bytes([i]) * (100 + i) for i in range(60)}


def layer() -> bytes:
    tar = make_tar(["d/", *FILES.items(),
                    Entry("x", data=b"xv", pax={"SCHILY.xattr.user.note": "v" * 40, "SCHILY.xattr.user.other": "o"}),
                    ("big", bytes(range(256)) * 8192)])
    return to_estargz(tar)[0]


def read(p: Path) -> bytes:
    """As a C program reads a file (Python's buffered ``open`` also asks ``isatty``: an IOCTL request, which
    overlayfs never passes down to its layers)."""
    fd = os.open(p, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def counts(m: MountedFS) -> dict[str, int]:
    assert m.fs.session is not None
    return m.fs.session.request_counts()


def test_warm_opens_and_reads_make_no_request(tmp_path: Path) -> None:
    with mounted_lazyfs(tmp_path / "mnt") as m:
        m.add(LID, layer())
        d = tmp_path / "mnt" / LID / "d"
        for name, data in FILES.items():
            assert read(tmp_path / "mnt" / LID / name) == data
        os.listdir(d)
        before = counts(m)
        assert before.get("open", 0) <= 1  # answered ENOSYS once: the kernel opens without asking from then on
        for _ in range(3):
            for name, data in FILES.items():
                assert read(tmp_path / "mnt" / LID / name) == data
            assert sorted(os.listdir(d)) == sorted(n.split("/")[1] for n in FILES)
        assert before.get("opendir", 0) <= 1  # answered ENOSYS once, as open
        assert counts(m) == before  # opens, reads, closes, stats and listings: all from the kernel's caches


def test_the_mount_roots_listing_follows_attach_and_detach(tmp_path: Path) -> None:
    with mounted_lazyfs(tmp_path / "mnt") as m:
        m.add(LID, layer())
        assert os.listdir(tmp_path / "mnt") == [LID]
        other = "e" * 64
        m.add(other, layer())
        assert sorted(os.listdir(tmp_path / "mnt")) == [other, LID]  # cached listings: invalidated at attach
        m.remove(LID)
        assert os.listdir(tmp_path / "mnt") == [other]  # and at detach


def test_a_cold_listing_instantiates_its_entries(tmp_path: Path) -> None:
    with mounted_lazyfs(tmp_path / "mnt") as m:
        m.add(LID, layer())
        d = tmp_path / "mnt" / LID / "d"
        names = os.listdir(d)
        assert len(names) == len(FILES)
        before = counts(m)
        sizes = {n: os.stat(d / n).st_size for n in names}
        assert sizes == {n.split("/")[1]: len(v) for n, v in FILES.items()}
        assert counts(m).get("lookup", 0) == before.get("lookup", 0)  # READDIRPLUS answered them all
        assert counts(m).get("readdirplus", 0) >= 1


def test_reads_whose_bytes_are_in_memory_are_answered_by_the_fuse_thread(tmp_path: Path) -> None:
    with mounted_lazyfs(tmp_path / "mnt") as m:
        files = m.add(LID, layer())
        p = tmp_path / "mnt" / LID / "big"
        want = bytes(range(256)) * 8192
        assert read_all(p) == want and files.reads > 0 and files.ready_reads == 0
        files.ready = True
        drop_page_cache(p)
        n = files.reads
        assert read_all(p) == want
        assert files.reads == n and files.ready_reads > 0  # no READ went to the trio loop


def read_all(p: Path) -> bytes:
    with open(p, "rb", buffering=0) as f:
        return f.read()


def drop_page_cache(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_xattr_size_queries_and_ranges(tmp_path: Path) -> None:
    with mounted_lazyfs(tmp_path / "mnt") as m:
        m.add(LID, layer())
        p = os.fsencode(tmp_path / "mnt" / LID / "x")
        assert os.getxattr(p, "user.note") == b"v" * 40  # os.getxattr asks the size first, then the value
        assert sorted(os.listxattr(p)) == ["user.note", "user.other"]
        with pytest.raises(OSError) as e:
            os.getxattr(p, "user.absent")
        assert e.value.errno == errno.ENODATA
        # a buffer too small is ERANGE, from the handler itself
        session = m.fs.session
        assert session is not None
        ino = os.stat(p).st_ino
        body = memoryview(struct.pack("<II", 8, 0) + b"user.note\0")
        assert session._getxattr(ino, body) == errno.ERANGE
        assert session._getxattr(ino, memoryview(struct.pack("<II", 0, 0) + b"user.note\0")) == \
            struct.pack("<II", 40, 0)


def test_old_kernels_are_refused_at_init(tmp_path: Path) -> None:
    with mounted_lazyfs(tmp_path / "mnt") as m:
        session = m.fs.session
        assert session is not None
        both = fuse.NO_OPEN_SUPPORT | fuse.NO_OPENDIR_SUPPORT
        old = memoryview(struct.pack("<IIII", 7, 28, 0, both))
        assert session._init(0, old) == errno.EPROTO
        for offered in (0, fuse.NO_OPEN_SUPPORT, fuse.NO_OPENDIR_SUPPORT):
            assert session._init(0, memoryview(struct.pack("<IIII", 7, 40, 0, offered))) == errno.EPROTO
        ok = session._init(0, memoryview(struct.pack("<IIII", 7, 45, 1 << 20, 0xFFFFFFFF)))
        assert isinstance(ok, bytes) and len(ok) == 64
        major, minor, _ra, flags = struct.unpack_from("<IIII", ok)
        assert (major, minor) == (7, fuse.PROTO_MINOR) and flags == fuse.WANTED


def test_mounting_without_root_says_so(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setuid(65534)
            fuse.Session(LazyFS(), tmp_path)
        except UnavailableError as e:
            code = 0 if "needs root" in str(e) or "/dev/fuse" in str(e) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
