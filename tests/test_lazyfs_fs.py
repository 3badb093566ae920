"""The one lazy FUSE mount (cvmfs_snap/lazyfs/fs.py + tree.py), mounted for real: a layer's directory stacked by
a real overlayfs equals containerd's own unpack of the same eStargz blob, entry by entry (deletions, opaque dirs,
hardlinks, xattrs, devices); warm reads come from the page cache; corrupt data is EIO, never wrong bytes."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from cvmfs_snap_devenv.images import Entry, make_tar
from tests.support.estargz import corpus, esgz, to_estargz
from tests.support.layertrees import MTIMES, extract_like_containerd, mounted_overlay
from tests.support.lazyfs_mount import mounted_lazyfs
from tests.support.trees import Listing, listing
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root (overlayfs)")

START_NS = time.time_ns() - 10**9
ESTARGZ_OWN = {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}


def comparable(root: Path) -> Listing:
    """:func:`listing` of ``root``; whiteouts' mtimes are "now" in containerd's unpack (mknod); eStargz's own entries
    are hidden on purpose."""
    out: Listing = {}
    for path, rec in listing(root, mtimes=MTIMES).items():
        if path in ESTARGZ_OWN:
            continue
        if rec["type"] == "char" and rec["rdev"] == [0, 0]:
            rec.pop("mtime")
        if rec["type"] == "dir" and rec["mtime"] > START_NS:
            rec.pop("mtime")  # a directory the tar leaves out: made at unpack (attach) time
        out[path] = rec
    return out


def go_blob(tmp: Path, tar: bytes) -> bytes:
    src, out = tmp / "in.tar", tmp / "out.esgz"
    src.write_bytes(tar)
    import subprocess

    subprocess.run([esgz(), "build", str(src), str(out)], check=True, capture_output=True)
    return out.read_bytes()


BASE = make_tar(["etc/", ("etc/passwd", b"root:x:0:0"), ("etc/hosts", b"h"), "usr/", ("usr/old", b"o"),
                 ("usr/kept", b"lower")])


@pytest.mark.parametrize("name", sorted(corpus()))
def test_layer_dir_and_overlay_view_equal_containerd_unpack(tmp_path: Path, name: str) -> None:
    """The layer directory itself (what overlayfs gets as a lowerdir) equals containerd's unpack of the same blob,
    entry by entry; stacked on a base layer by a real overlayfs, the views are equal too."""
    blob, _ = to_estargz(corpus()[name])
    ref, base = tmp_path / "ref", tmp_path / "base"
    extract_like_containerd(blob_tar(blob), ref)
    extract_like_containerd(BASE, base)
    with mounted_lazyfs(tmp_path / "mnt") as m:
        m.add("a" * 64, blob)
        layer = tmp_path / "mnt" / ("a" * 64)
        assert comparable(layer) == comparable(ref)
        assert not ESTARGZ_OWN & set(listing(layer, mtimes=MTIMES))
        with mounted_overlay([layer, base], tmp_path / "lazy-view") as lazy_view, \
                mounted_overlay([ref, base], tmp_path / "ref-view") as ref_view:
            got, want = comparable(lazy_view), comparable(ref_view)
        assert got == want


def blob_tar(blob: bytes) -> bytes:
    """The tar stream of an eStargz blob (concatenated gzip members), as containerd's unpack reads it."""
    import gzip

    return gzip.decompress(blob)


def test_whiteouts_opaque_hardlinks_in_the_lower_stack(tmp_path: Path) -> None:
    """Two lazy layers stacked: the upper one's deletions and opaque dir hide the lower one's entries."""
    lower = make_tar(["etc/", ("etc/passwd", b"root"), ("etc/group", b"g"), "usr/", ("usr/old", b"o")])
    upper = make_tar(["etc/", Entry("etc/.wh.passwd"), "usr/", Entry("usr/.wh..wh..opq"), ("usr/new", b"n"),
                      ("bin-tool", b"t"), Entry("alias", type="hardlink", linkname="bin-tool")])
    with mounted_lazyfs(tmp_path / "mnt") as m:
        m.add("l" * 64, to_estargz(lower)[0])
        m.add("u" * 64, to_estargz(upper)[0])
        with mounted_overlay([tmp_path / "mnt" / ("u" * 64), tmp_path / "mnt" / ("l" * 64)],
                             tmp_path / "view") as view:
            assert sorted(os.listdir(view / "etc")) == ["group"]
            assert sorted(os.listdir(view / "usr")) == ["new"]
            assert os.stat(view / "alias").st_ino == os.stat(view / "bin-tool").st_ino
            assert (view / "alias").read_bytes() == b"t"
        assert os.stat(tmp_path / "mnt" / ("u" * 64) / "alias").st_nlink == 2


def test_go_esgz_blob(tmp_path: Path) -> None:
    """A blob built by the Go reference tool: same tree as containerd's unpack of it."""
    for name in ("whiteouts", "hardlinks", "xattrs"):
        blob = go_blob(tmp_path, corpus()[name])
        ref = tmp_path / f"ref-{name}"
        extract_like_containerd(blob_tar(blob), ref)
        with mounted_lazyfs(tmp_path / "mnt") as m:
            m.add("g" * 64, blob)
            assert comparable(tmp_path / "mnt" / ("g" * 64)) == comparable(ref), name


def test_warm_reads_hit_the_page_cache_and_bad_bytes_are_eio(tmp_path: Path) -> None:
    big = bytes(range(256)) * 9000
    blob, _ = to_estargz(corpus()["big"])
    with mounted_lazyfs(tmp_path / "mnt") as m:
        files = m.add("b" * 64, blob)
        p = tmp_path / "mnt" / ("b" * 64) / "big"
        assert p.read_bytes() == big
        n = files.reads
        for _ in range(3):
            assert p.read_bytes() == big
        assert files.reads == n  # keep_cache: no read reached Python again
        files.corrupt("after")
        q = tmp_path / "mnt" / ("b" * 64) / "after"
        with pytest.raises(OSError) as e:
            q.read_bytes()
        assert e.value.errno == errno.EIO


def test_detach_and_root_listing(tmp_path: Path) -> None:
    blob, _ = to_estargz(corpus()["empty"])
    with mounted_lazyfs(tmp_path / "mnt") as m:
        m.add("c" * 64, blob)
        m.add("d" * 64, blob)
        assert sorted(os.listdir(tmp_path / "mnt")) == ["c" * 64, "d" * 64]
        assert sorted(os.listdir(tmp_path / "mnt" / ("c" * 64))) == ["e1", "e2", "emptydir"]
        m.remove("c" * 64)
        # detach invalidates the kernel's entry asynchronously (lazyfs/fs.py): gone soon, not at once
        wait_for(lambda: sorted(os.listdir(tmp_path / "mnt")) == ["d" * 64], "the root listing without c")
        wait_for(lambda: not (tmp_path / "mnt" / ("c" * 64)).exists(), "the detached layer's entry to go")
        assert os.statvfs(tmp_path / "mnt").f_files >= 4
        with pytest.raises(OSError) as e:
            (tmp_path / "mnt" / ("d" * 64) / "e1").write_bytes(b"x")
        assert e.value.errno in (errno.EROFS, errno.EACCES)


def test_prefetched_files_are_pushed_into_the_page_cache_at_lookup(tmp_path: Path) -> None:
    """notify_store: the first read of a prefetched file needs no round trip to the process."""
    data = os.urandom(300_000)
    blob, _ = to_estargz(make_tar([("entry", data), ("other", b"o")]))
    with mounted_lazyfs(tmp_path / "mnt") as m:
        files = m.add("p" * 64, blob, store=True)
        p = tmp_path / "mnt" / ("p" * 64) / "entry"
        os.stat(p)  # the kernel looks it up: the process pushes its data
        deadline = time.monotonic() + 10
        while files.reads == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        pushed = files.reads
        assert pushed >= 1
        assert p.read_bytes() == data
        assert files.reads == pushed  # served from the page cache


@pytest.mark.parametrize("name", ["whiteouts", "hardlinks", "xattrs", "devices", "long-names", "replaced"])
def test_unpacked_copy_equals_containerd_unpack(tmp_path: Path, name: str) -> None:
    """The node-local copy of a complete layer (unpack.py) is the same tree as containerd's unpack."""
    import trio  # type: ignore[import-untyped]

    from cvmfs_snap.lazyfs.tree import build_tree
    from cvmfs_snap.lazyfs.unpack import unpack_layer
    from tests.support.lazyfs_mount import BlobFiles

    blob, _ = to_estargz(corpus()[name])
    ref = tmp_path / "ref"
    extract_like_containerd(blob_tar(blob), ref)
    files = BlobFiles(blob)
    dest = tmp_path / "unpacked" / "layer"
    trio.run(unpack_layer, build_tree(files.stargz.toc), files, dest)
    assert comparable(dest) == comparable(ref)
    assert not [p for p in os.listdir(dest.parent) if ".tmp-" in p]
