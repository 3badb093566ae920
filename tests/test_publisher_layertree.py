"""A published layer tree read back as entries (publisher.layertree) says what GNU tar's archive of the tree says.

GNU tar is the reference here: the flat tree used to be built from ``tar --create`` of each layer tree, read back
through the tar reader. The walk must yield the same members (paths, kinds, modes, owners, nanosecond mtimes, link
targets, device numbers, xattrs, hard links, the data of sparse files) and apply the same limits."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

from cvmfs_snap.errors import UnsafeLayerError
from cvmfs_snap.layer import Limits, TarEntry, TarReader
from cvmfs_snap.layer.apply import apply_entries
from publisher.layertree import open_layer_tree


def _rich_tree(root: Path) -> None:
    """Every kind of entry a layer tree holds: files (empty, small, sparse), directories, symlinks, hard links,
    whiteouts, a FIFO, a device, xattrs, set-id bits, odd owners and mtimes, a non-UTF-8 name."""
    (root / "etc/sub").mkdir(parents=True)
    (root / "etc/hostname").write_bytes(b"layer\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "etc/sub/deep.txt").write_bytes(os.urandom(70_000))
    os.chown(root / "etc/sub/deep.txt", 1234, 5678)
    os.utime(root / "etc/sub/deep.txt", ns=(1, 1_700_000_000_123_456_789))
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "bin/tool", 0o4755)
    os.link(root / "bin/tool", root / "bin/tool-again")
    os.link(root / "etc/hostname", root / "etc/sub/hostname-link")
    os.symlink("../etc/hostname", root / "bin/rel-link")
    os.symlink("/nowhere/at/all", root / "bin/dangling")
    os.setxattr(root / "bin/tool", "user.origin", b"bottom")
    os.setxattr(root / "etc/sub", "user.dir", b"d")
    (root / ".wh.gone").write_bytes(b"")
    (root / "etc/.wh..wh..opq").write_bytes(b"")
    os.mkfifo(root / "etc/fifo")
    os.mknod(root / "etc/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with open(root / "sparse.img", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"x" * 5000)
    (root / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name\n")
    (root / ".cvmfscatalog").write_bytes(b"")  # the CVMFS marker: not image content
    os.utime(root / "etc", ns=(1, 1_600_000_000_000_000_001))


def _describe(entries: Iterable[TarEntry]) -> dict[str, tuple[object, ...]]:
    """Each entry with its data (read while it is the current one)."""
    out: dict[str, tuple[object, ...]] = {}
    for e in entries:
        data = b""
        if e.kind == "file":
            chunks = []
            while chunk := e.read(1 << 16):
                chunks.append(chunk)
            data = b"".join(chunks)
        out[e.path] = (e.kind, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.linkname, e.devmajor, e.devminor,
                       dict(e.xattrs), e.sparse, data)
    return out


def _gnu_tar_entries(root: Path, *, user_xattrs: bool = True) -> dict[str, tuple[object, ...]]:
    """The members of GNU tar's archive of ``root`` (what the flat was built from before)."""
    names = sorted(n for n in os.listdir(root) if n != ".cvmfscatalog")
    cmd = ["tar", "--create", "--file=-", f"--directory={root}", "--format=pax", "--numeric-owner", "--sort=name",
           "--sparse", "--sparse-version=1.0", "--hole-detection=seek",
           "--xattrs", "--xattrs-include=*", "--xattrs-exclude=security.selinux"]
    if not user_xattrs:
        cmd.append("--xattrs-exclude=user.*")
    proc = subprocess.Popen([*cmd, "--", *names], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    entries = _describe(TarReader(proc.stdout, Limits(), "gnu tar"))
    assert proc.wait() == 0
    return entries


def test_tree_entries_are_what_gnu_tar_archives(tmp_path: Path) -> None:
    root = tmp_path / "layerfs"
    root.mkdir()
    _rich_tree(root)
    with open_layer_tree(root, name="layer x") as tree:
        ours = _describe(tree)
    reference = _gnu_tar_entries(root)
    assert ours.keys() == reference.keys()
    for path in ours:
        mine, theirs = ours[path], reference[path]
        if theirs[0] == "file" and theirs[10] is not None:  # sparse: the same data, maybe other segment bounds
            assert mine[:10] == theirs[:10], path
            assert mine[10] is not None and sum(n for _o, n in mine[10]) < 1 << 20, path
            continue
        assert mine == theirs, path
    assert ours["bin/tool-again"][0] == "hardlink" and ours["bin/tool-again"][6] == "bin/tool"
    assert ours["bin/tool"][9] == {"user.origin": b"bottom"} and ours["bin/tool"][1] == 0o4755
    assert ".cvmfscatalog" not in ours
    assert ours["etc/sub/deep.txt"][5] == 1_700_000_000_123_456_789


def test_cvmfs_client_xattrs_and_sockets_are_left_out(tmp_path: Path) -> None:
    root = tmp_path / "layerfs"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    os.setxattr(root / "f", "user.hash", b"cvmfs-magic")
    os.setxattr(root / "f", "trusted.keep", b"kept")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    with open_layer_tree(root, user_xattrs=False) as tree:
        ours = _describe(tree)
    assert list(ours) == ["f"] and ours["f"][9] == {"trusted.keep": b"kept"}
    assert ours == _gnu_tar_entries(root, user_xattrs=False)


def test_flat_applied_from_tree_entries_equals_applied_from_gnu_tar(tmp_path: Path) -> None:
    """The same merged-mode applier, fed either way, makes the same flat (whiteouts applied)."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    _rich_tree(lower)
    (upper / "etc").mkdir()
    (upper / "etc/hostname").write_bytes(b"upper\n")
    (upper / "etc/.wh.empty").write_bytes(b"")
    (upper / "bin").mkdir()
    (upper / "bin/.wh..wh..opq").write_bytes(b"")
    (upper / "bin/new").write_bytes(b"new\n")
    flats = []
    for how in ("tree", "tar"):
        flat = tmp_path / f"flat-{how}"
        flat.mkdir()
        for layer in (lower, upper):
            if how == "tree":
                with open_layer_tree(layer) as tree:
                    apply_entries(tree, flat, "merged")
            else:
                names = sorted(n for n in os.listdir(layer) if n != ".cvmfscatalog")
                proc = subprocess.Popen(["tar", "--create", "--file=-", f"--directory={layer}", "--format=pax",
                                         "--numeric-owner", "--sparse", "--xattrs", "--xattrs-include=*", "--",
                                         *names], stdout=subprocess.PIPE)
                assert proc.stdout is not None
                apply_entries(TarReader(proc.stdout), flat, "merged")
                assert proc.wait() == 0
        flats.append(flat)
    got = [_snapshot(f) for f in flats]
    assert got[0] == got[1]
    assert "etc/empty" not in got[0] and sorted(os.listdir(flats[0] / "bin")) == ["new"]
    assert (flats[0] / "etc/hostname").read_bytes() == b"upper\n"
    assert os.stat(flats[0] / "sparse.img").st_blocks * 512 < 1 << 20  # holes stayed holes


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    with open_layer_tree(root) as tree:
        for path, desc in _describe(tree).items():
            out[path] = (*desc[:10], desc[11]) if desc[0] != "dir" else desc[:5] + desc[6:10]  # dir mtimes vary
    return out


def test_tree_entries_obey_the_limits(tmp_path: Path) -> None:
    root = tmp_path / "layerfs"
    (root / "a/b/c").mkdir(parents=True)
    (root / "a/b/c/f").write_bytes(b"x")
    with open_layer_tree(root, limits=Limits(max_depth=3), name="layer deep") as tree, \
            pytest.raises(UnsafeLayerError, match=r"layer deep: .*Limits\.max_depth \(3\)"):
        list(tree)
    with open_layer_tree(root, limits=Limits(max_entries=3), name="layer many") as tree, \
            pytest.raises(UnsafeLayerError, match=r"more than 3 entries \(Limits\.max_entries\)"):
        list(tree)
    os.setxattr(root / "a/b/c/f", "trusted.overlay.opaque", b"y")
    with open_layer_tree(root, name="layer odd") as tree, pytest.raises(UnsafeLayerError, match="overlayfs"):
        list(tree)


def test_tree_path_length_is_counted_in_utf8_bytes(tmp_path: Path) -> None:
    root = tmp_path / "layerfs"
    (root / ("é" * 60)).mkdir(parents=True)  # 60 characters, 120 bytes
    with open_layer_tree(root, limits=Limits(max_path_len=100), name="layer wide") as tree, \
            pytest.raises(UnsafeLayerError, match=r"layer wide: .*Limits\.max_path_len \(100\)"):
        list(tree)
    with open_layer_tree(root, limits=Limits(max_path_len=120)) as tree:
        assert [e.path for e in tree] == ["é" * 60]
