"""apply_layer: what a container sees is kept (types, modes, owners, mtimes, xattrs, links, devices, long names),
later entries replace earlier ones as tar/containerd do, and whiteouts work in both modes."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layer import (
    ApplyResult,
    Limits,
    WhiteoutIndex,
    apply_layer,
    iter_layer,
    open_layer,
    scan_tree_whiteouts,
)
from cvmfs_snap.mediatypes import OCI_LAYER_TAR
from cvmfs_snap_devenv.images import Entry, make_tar
from tests.support.hostile import END, header, pax_block, raw_file, tar_of
from tests.support.trees import names, sparse_tar

CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # VFS_CAP v2, cap_net_raw+ep
T0 = 1_600_000_000


def apply(entries: list[Entry | tuple[str, bytes] | str] | bytes, target: Path, mode: str = "layer",
          **kw: Any) -> ApplyResult:
    tar = entries if isinstance(entries, bytes) else make_tar(entries)
    return apply_layer(io.BytesIO(tar), target, mode=mode, **kw)  # type: ignore[arg-type]


def test_metadata_is_kept(tmp_path: Path) -> None:
    entries: list[Entry | tuple[str, bytes] | str] = [
        Entry("usr", "dir", mode=0o755, mtime=T0 + 1),
        Entry("usr/bin", "dir", mode=0o2775, gid=50, mtime=T0 + 2),
        Entry("usr/bin/ping", data=b"\x7fELF", mode=0o4755, uid=0, gid=0, mtime=T0 + 3,
              # tarfile writes PAX values with surrogateescape: this round-trips the raw capability bytes
              pax={"SCHILY.xattr.security.capability": CAP_NET_RAW.decode("utf-8", "surrogateescape"),
                   "SCHILY.xattr.user.note": "hello"}),
        Entry("usr/bin/mine", data=b"x", mode=0o6711, uid=1000, gid=1001, mtime=T0 + 4),
        Entry("tmp", "dir", mode=0o1777, mtime=T0 + 5),
        Entry("usr/bin/sh", "symlink", linkname="/bin/busybox", uid=7, gid=8, mtime=T0 + 6),
        # a hardlink header carries the inode's own metadata, as GNU tar and Go's archive/tar write it
        Entry("usr/bin/ping2", "hardlink", linkname="usr/bin/ping", mode=0o4755, mtime=T0 + 3,
              pax={"SCHILY.xattr.security.capability": CAP_NET_RAW.decode("utf-8", "surrogateescape"),
                   "SCHILY.xattr.user.note": "hello"}),
        Entry("dev", "dir", mtime=T0 + 7),
        Entry("dev/null", "char", mode=0o666, devmajor=1, devminor=3, mtime=T0 + 8),
        Entry("dev/loop0", "block", mode=0o660, gid=6, devmajor=7, devminor=0, mtime=T0 + 9),
        Entry("dev/initctl", "fifo", mode=0o600, mtime=T0 + 10),
        Entry("usr/bin/late", data=b"added after the dir's mtime", mtime=T0 + 11),
    ]
    tar = make_tar(entries)
    assert b"SCHILY.xattr.security.capability=" + CAP_NET_RAW + b"\n" in tar
    res = apply(tar, tmp_path)
    assert res.entries == len(entries)
    assert res.size == 4 + 1 + len(b"added after the dir's mtime")
    ping = (tmp_path / "usr/bin/ping").lstat()
    assert stat.S_IMODE(ping.st_mode) == 0o4755  # chmod after chown: setuid survives
    assert os.getxattr(tmp_path / "usr/bin/ping", "security.capability") == CAP_NET_RAW
    assert os.getxattr(tmp_path / "usr/bin/ping", "user.note") == b"hello"
    assert ping.st_nlink == 2 and (tmp_path / "usr/bin/ping2").lstat().st_ino == ping.st_ino
    mine = (tmp_path / "usr/bin/mine").lstat()
    assert (stat.S_IMODE(mine.st_mode), mine.st_uid, mine.st_gid) == (0o6711, 1000, 1001)
    assert mine.st_mtime_ns == (T0 + 4) * 10**9
    ub = (tmp_path / "usr/bin").lstat()
    assert (stat.S_IMODE(ub.st_mode), ub.st_gid) == (0o2775, 50)
    assert ub.st_mtime_ns == (T0 + 2) * 10**9  # set at the end, after its children were created
    assert stat.S_IMODE((tmp_path / "tmp").lstat().st_mode) == 0o1777
    sh = (tmp_path / "usr/bin/sh").lstat()
    assert stat.S_ISLNK(sh.st_mode) and os.readlink(tmp_path / "usr/bin/sh") == "/bin/busybox"
    assert (sh.st_uid, sh.st_gid, sh.st_mtime_ns) == (7, 8, (T0 + 6) * 10**9)
    null = (tmp_path / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = (tmp_path / "dev/loop0").lstat()
    assert stat.S_ISBLK(loop.st_mode) and os.minor(loop.st_rdev) == 0 and loop.st_gid == 6
    assert stat.S_ISFIFO((tmp_path / "dev/initctl").lstat().st_mode)
    assert (tmp_path / "dev").lstat().st_mtime_ns == (T0 + 7) * 10**9


def test_long_names_gnu_and_pax(tmp_path: Path) -> None:
    deep = "/".join(["d" * 60] * 5)
    name = deep + "/" + "f" * 200
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        target = tmp_path / str(fmt)
        target.mkdir()
        tar = make_tar([Entry(name, data=b"long"), Entry(deep + "/l" * 1 + "x" * 150, "symlink", linkname=name),
                        Entry(deep + "/h" + "y" * 150, "hardlink", linkname=name)], fmt=fmt)
        apply_layer(io.BytesIO(tar), target)
        assert (target / name).read_bytes() == b"long"
        assert os.readlink(target / (deep + "/lx" + "x" * 149)) == name
        assert (target / (deep + "/h" + "y" * 150)).stat().st_ino == (target / name).stat().st_ino


def test_later_entries_replace_earlier(tmp_path: Path) -> None:
    res = apply([
        Entry("f", data=b"one"), Entry("f", data=b"two", mode=0o600),             # file over file
        Entry("d", "dir", mode=0o700), ("d/child", b"c"), Entry("d", "dir", mode=0o750),  # dir keeps children
        Entry("x", "dir"), ("x/y", b"gone"), Entry("x", data=b"now a file"),       # non-dir over dir
        ("z", b"was a file"), Entry("z", "dir", mode=0o711),                       # dir over file
        Entry("p", "fifo"), Entry("p", data=b"fifo replaced, never opened"),        # would block if opened
        Entry("n", "char", devmajor=1, devminor=3), Entry("n", data=b"not written to /dev/null"),
        Entry("s", "symlink", linkname="/etc"), Entry("s", "dir"),                 # dir over symlink
    ], tmp_path)
    assert res.entries == 16
    assert (tmp_path / "f").read_bytes() == b"two" and stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o600
    assert (tmp_path / "d/child").read_bytes() == b"c"
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert (tmp_path / "x").read_bytes() == b"now a file"
    assert (tmp_path / "z").is_dir() and stat.S_IMODE((tmp_path / "z").stat().st_mode) == 0o711
    assert (tmp_path / "p").read_bytes() == b"fifo replaced, never opened"
    assert (tmp_path / "n").read_bytes() == b"not written to /dev/null"
    assert (tmp_path / "s").is_dir() and not (tmp_path / "s").is_symlink()


def test_absolute_and_dot_names_join_under_root(tmp_path: Path) -> None:
    apply([Entry("./", "dir", mode=0o711, mtime=T0), ("/etc/abs", b"a"), ("./rel/./x", b"b")], tmp_path)
    assert (tmp_path / "etc/abs").read_bytes() == b"a"
    assert (tmp_path / "rel/x").read_bytes() == b"b"
    st = tmp_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o711 and st.st_mtime_ns == T0 * 10**9  # "./" sets the root's metadata
    assert stat.S_IMODE((tmp_path / "rel").stat().st_mode) == 0o755  # implicit parents: 0755 like containerd


def test_same_owner_false_keeps_our_owner(tmp_path: Path) -> None:
    apply([Entry("f", data=b"x", uid=1234, gid=4321, mode=0o4750)], tmp_path, same_owner=False)
    st = (tmp_path / "f").stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert stat.S_IMODE(st.st_mode) == 0o4750


def test_layer_mode_keeps_whiteouts_as_plain_files(tmp_path: Path) -> None:
    res = apply([
        "etc/", Entry("etc/.wh.passwd", uid=5, mode=0o600), Entry(".wh.opt"), "var/cache/",
        Entry("var/cache/.wh..wh..opq"), Entry(".wh..wh..opq"), Entry(".wh..wh.plnk", "dir", mode=0o700),
        ("var/cache/new", b"n"), (".wh..wh.plnk/123", b"aufs hardlink"), Entry(".wh..wh.plnk/.wh.x"),
        Entry("etc/.wh..wh.aufs", mode=0o600),
    ], tmp_path)
    assert res.whiteouts == WhiteoutIndex(whiteouts=["etc/passwd", "opt"], opaque_dirs=["", "var/cache"],
                                          hidden=[".wh..wh.plnk", "etc/.wh..wh.aufs"])
    wh = (tmp_path / "etc/.wh.passwd").lstat()
    assert stat.S_ISREG(wh.st_mode) and wh.st_size == 0
    assert (stat.S_IMODE(wh.st_mode), wh.st_uid, wh.st_gid) == (0o644, 0, 0)
    assert (tmp_path / "var/cache/.wh..wh..opq").is_file()
    # AUFS bookkeeping is stored as the tar has it (as cvmfs_server ingest does), below it nothing is interpreted
    assert stat.S_IMODE((tmp_path / ".wh..wh.plnk").lstat().st_mode) == 0o700
    assert (tmp_path / ".wh..wh.plnk/123").read_bytes() == b"aufs hardlink"
    assert (tmp_path / ".wh..wh.plnk/.wh.x").is_file()
    assert stat.S_IMODE((tmp_path / "etc/.wh..wh.aufs").lstat().st_mode) == 0o600
    assert scan_tree_whiteouts(tmp_path) == res.whiteouts
    d = res.whiteouts.to_dict()
    assert d == {"whiteouts": ["etc/passwd", "opt"], "opaque_dirs": ["", "var/cache"],
                 "hidden": [".wh..wh.plnk", "etc/.wh..wh.aufs"]}
    assert WhiteoutIndex.from_dict(d) == res.whiteouts


@pytest.mark.parametrize("bad", [{"whiteouts": ["../x"]}, {"whiteouts": "x"}, {"opaque_dirs": ["/abs"]},
                                 {"whiteouts": [""]}, {"whiteouts": [3]}, {"hidden": [""]}, {"hidden": ["a/../b"]},
                                 {"hidden": "x"}])
def test_whiteout_index_from_dict_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        WhiteoutIndex.from_dict(bad)


def _lower(root: Path) -> None:
    apply([
        "etc/", ("etc/passwd", b"root"), ("etc/keep", b"k"), "opt/", "opt/tool/", ("opt/tool/bin", b"b"),
        "var/", "var/cache/", ("var/cache/old", b"o"), "var/cache/sub/", ("var/cache/sub/deep", b"d"),
        "var/lib/", ("var/lib/old", b"o"), "var/lib/sub/", ("var/lib/sub/deep", b"d"), ("var/lib/sub/k", b"k"),
        ("re", b"lower file"), "redir/", ("redir/old", b"o"),
    ], root, mode="merged")


def test_merged_whiteouts_both_orders(tmp_path: Path) -> None:
    _lower(tmp_path)
    res = apply([
        Entry("etc/.wh.passwd"),                       # file
        Entry(".wh.opt"),                              # directory, recursively
        Entry("var/cache/.wh..wh..opq"),               # opaque first, then new entries
        ("var/cache/new", b"n"),
        "var/lib/sub/", ("var/lib/sub/k", b"new k"),   # new entries first, then opaque
        Entry("var/lib/.wh..wh..opq"),
        ("re", b"this layer's file"), Entry(".wh.re"),  # whiteout after an entry of the same layer: keeps it
        Entry(".wh.redir"), "redir/", ("redir/new", b"n"),  # whiteout before re-creating a dir
        Entry("nothere/.wh.x"),                        # whiteout in a dir that does not exist: nothing to do
    ], tmp_path, mode="merged")
    left = names(tmp_path)
    assert left == ["etc", "etc/keep", "re", "redir", "redir/new", "var", "var/cache", "var/cache/new", "var/lib",
                    "var/lib/sub", "var/lib/sub/k"]
    assert (tmp_path / "re").read_bytes() == b"this layer's file"
    assert (tmp_path / "var/lib/sub/k").read_bytes() == b"new k"
    assert res.whiteouts.opaque_dirs == ["var/cache", "var/lib"]
    assert "etc/passwd" in res.whiteouts.whiteouts


def test_merged_whiteout_of_dir_redeclared_by_layer(tmp_path: Path) -> None:
    _lower(tmp_path)
    apply(["redir/", ("redir/new", b"n"), Entry(".wh.redir")], tmp_path, mode="merged")
    assert sorted(p.name for p in (tmp_path / "redir").iterdir()) == ["new"]


def test_large_size_fields_parse() -> None:
    nine_gib = 9 << 30
    base256 = b"\x80" + nine_gib.to_bytes(11, "big")
    for tar in (header(b"big", b"0", size_field=base256), pax_block({b"size": str(nine_gib).encode()})
                + header(b"big", b"0", 0)):
        it = iter_layer(io.BytesIO(tar))
        e = next(it)
        assert (e.path, e.size) == ("big", nine_gib)


def test_negative_base256_mtime() -> None:
    hdr = bytearray(header(b"old", b"0"))
    hdr[136:148] = (-1).to_bytes(12, "big", signed=True)
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    e = next(iter_layer(io.BytesIO(bytes(hdr) + END)))
    assert e.mtime_ns == -(10**9)


def test_pax_fractional_mtime_and_ids(tmp_path: Path) -> None:
    tar = tar_of(pax_block({b"mtime": b"1600000000.5", b"uid": b"3000000", b"gid": b"3000001"}),
                 raw_file(b"frac", b"x"))
    apply_layer(io.BytesIO(tar), tmp_path)
    st = (tmp_path / "frac").stat()
    assert st.st_mtime_ns == 1_600_000_000_500_000_000
    assert (st.st_uid, st.st_gid) == (3000000, 3000001)


def test_stream_without_end_blocks_and_trailing_data_diff_id(tmp_path: Path) -> None:
    import hashlib

    tar = make_tar([("a", b"1")])
    (tmp_path / "no-end").mkdir()
    res = apply_layer(io.BytesIO(tar[:1024]), tmp_path / "no-end")
    assert res.entries == 1 and res.diff_id == "sha256:" + hashlib.sha256(tar[:1024]).hexdigest()
    padded = tar + bytes(8192)  # Go and Docker pad to 10 KiB records; the diffID covers the padding
    (tmp_path / "pad").mkdir()
    res = apply_layer(io.BytesIO(padded), tmp_path / "pad")
    assert res.diff_id == "sha256:" + hashlib.sha256(padded).hexdigest()
    with open_layer(io.BytesIO(padded), OCI_LAYER_TAR) as s:
        (tmp_path / "pad2").mkdir()
        assert apply_layer(s, tmp_path / "pad2").diff_id == s.diff_id == res.diff_id


def test_limits_total_size(tmp_path: Path) -> None:
    from cvmfs_snap.errors import UnsafeLayerError

    with pytest.raises(UnsafeLayerError, match="'b'"):
        apply([("a", b"x" * 600), ("b", b"y" * 600)], tmp_path, limits=Limits(max_total_size=1000))


@pytest.mark.parametrize("fmt", [["--format=gnu"], ["--format=posix", "--sparse-version=1.0"],
                                 ["--format=posix", "--sparse-version=0.1"],
                                 ["--format=posix", "--sparse-version=0.0"]])
def test_sparse_files_from_gnu_tar(fmt: list[str], tmp_path: Path) -> None:
    tar = io.BytesIO(sparse_tar(tmp_path, fmt))
    src = tmp_path / "sparse-src"
    out = tmp_path / "out"
    out.mkdir()
    res = apply_layer(tar, out)
    assert res.entries == 2
    for name in ("sparse", "hole-at-end"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
        assert (out / name).stat().st_blocks * 512 < 1 << 20  # holes stay holes


def test_fifo_in_target_is_never_opened_in_merged_mode(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "pipe")
    apply([("pipe", b"replaced"), Entry("d/pipe", "hardlink", linkname="pipe")], tmp_path, mode="merged")
    assert (tmp_path / "pipe").read_bytes() == b"replaced"
    assert (tmp_path / "d/pipe").stat().st_ino == (tmp_path / "pipe").stat().st_ino


def test_directory_replaced_and_recreated_in_one_layer(tmp_path: Path) -> None:
    # parents are cached as open fds while unpacking: replacing a directory must not leave a stale one behind
    apply(["d/", "d/sub/", ("d/sub/x", b"old"), Entry("d", data=b"file now"), "d/", "d/sub/", ("d/sub/y", b"new"),
           Entry(".wh.d")], tmp_path)
    assert sorted(p.name for p in (tmp_path / "d/sub").iterdir()) == ["y"]
    (tmp_path / "m").mkdir()
    apply([("keep", b"k")], tmp_path / "m", mode="merged")
    apply(["a/", "a/b/", ("a/b/x", b"1"), Entry(".wh.a"), "a/", ("a/b2", b"2")], tmp_path / "m", mode="merged")
    assert names(tmp_path / "m") == [
        "a", "a/b", "a/b/x", "a/b2", "keep"]


def test_scan_tree_whiteouts_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".wh.should-not-appear").touch()
    tree = tmp_path / "tree"
    (tree / "a/b").mkdir(parents=True)
    (tree / "a/b/.wh.x").touch()
    (tree / ".wh..wh..opq").touch()
    (tree / "a/.wh..wh.plnk").mkdir()  # AUFS bookkeeping, not a deletion: hidden, not looked into
    (tree / "a/.wh..wh.plnk/.wh.y").touch()
    (tree / "link").symlink_to(outside)
    assert scan_tree_whiteouts(tree) == WhiteoutIndex(whiteouts=["a/b/x"], opaque_dirs=[""],
                                                      hidden=["a/.wh..wh.plnk"])


def test_iter_layer_streams_member_data_in_chunks() -> None:
    data = os.urandom(3 * 100_000 + 7)
    members = list(iter_layer(io.BytesIO(make_tar([("x", data), ("y", b"tail")]))))
    assert [m.path for m in members] == ["x", "y"]  # unread data is skipped
    it = iter_layer(io.BytesIO(make_tar([("x", data), ("y", b"tail")])))
    x = next(it)
    got = b""
    while chunk := x.read(100_000):
        assert len(chunk) <= 100_000
        got += chunk
    assert got == data and x.size == len(data)
    assert next(it).read() == b"tail"


def test_hardlink_header_metadata_applies_to_the_inode_like_containerd(tmp_path: Path) -> None:
    """containerd (archive/tar.go createTarFile) applies a hardlink header's owner, xattrs, mode and times to the
    shared inode after link(2); a container must see the same on both names. A hardlink to a symlink links the
    symlink and never chmods through it."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"o")
    outside.chmod(0o600)
    root = tmp_path / "root"
    root.mkdir()
    apply([
        Entry("f", data=b"x", mode=0o644, uid=1, gid=2, mtime=T0),
        Entry("g", "hardlink", linkname="f", mode=0o4750, uid=3, gid=4, mtime=T0 + 9,
              pax={"SCHILY.xattr.user.via": "hardlink"}),
        Entry("l", "symlink", linkname=str(outside), mtime=T0),
        Entry("l2", "hardlink", linkname="l", mode=0o777, mtime=T0 + 1),
    ], root)
    for name in ("f", "g"):
        st = (root / name).lstat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o4750, 3, 4, (T0 + 9) * 10**9)
        assert os.getxattr(root / name, "user.via") == b"hardlink"
    assert (root / "l2").is_symlink() and (root / "l2").lstat().st_ino == (root / "l").lstat().st_ino
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
