"""Layer trees for the node-side tests: CVMFS-form layers, containerd-form reference layers, overlay mounts, tree dumps.

* :func:`write_cvmfs_layer` stores a layer tar the way ``cvmfs_server ingest`` does (``.wh.*`` kept as plain empty
  files, a ``.cvmfscatalog`` at the top of the layerfs) into a repository root, plus our ``layer.json``;
* :func:`extract_like_containerd` extracts a layer tar the way containerd's overlayfs snapshotter applies it
  (``archive.Apply`` with ``OverlayConvertWhiteout``): ``.wh.NAME`` becomes a char 0/0 device at ``NAME``,
  ``.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on the directory, an existing non-directory is replaced;
* :func:`mounted_overlay` mounts a read-only overlay of many lowerdirs through short relative links (as containerd's
  ``mount.All`` shortens 128-layer mounts) and unmounts it;
* :data:`MTIMES`: whose mtimes a comparison of trees made here can include (``tests.support.trees.listing``).
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cvmfs_snap.layer.whiteout import OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX
from cvmfs_snap.layout import CATALOG_MARKER, LayerRecord, RepositoryLayout
from cvmfs_snap_devenv.images import BuiltLayer
from tests.support.trees import TYPES

MTIMES = TYPES - {"symlink"}  # tarfile (extract_like_containerd) leaves a symlink's mtime at "now"
XATTR_PAX = "SCHILY.xattr."


def _members(tar: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for m in tf.getmembers():
            data = b""
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                data = f.read()
            out.append((m, data))
    return out


def _norm(name: str) -> str:
    name = name.strip("/")
    while name.startswith("./"):
        name = name[2:]
    return "" if name == "." else name


def _apply_xattrs(path: Path, m: tarfile.TarInfo) -> None:
    for k, v in m.pax_headers.items():
        if k.startswith(XATTR_PAX):
            os.setxattr(path, k[len(XATTR_PAX):], v.encode("utf-8", "surrogateescape"), follow_symlinks=False)


def _extract(members: list[tuple[tarfile.TarInfo, bytes]], dest: Path) -> None:
    """Extract regular members with owners, modes, times and xattrs (directory times set last, as tar does)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data) if m.isreg() else None)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:") as tf:
        tf.extractall(dest, numeric_owner=True, filter="fully_trusted")
    # xattrs (tarfile ignores them), then restore directory mtimes that setting xattrs does not touch
    for m, _ in members:
        if any(k.startswith(XATTR_PAX) for k in m.pax_headers):
            p = dest / _norm(m.name)
            _apply_xattrs(p, m)


def whiteout_index(tar: bytes) -> tuple[list[str], list[str]]:
    """(whiteouts, opaque_dirs) of a layer tar, as the publisher records them in layer.json."""
    wh, opq = [], []
    for m, _ in _members(tar):
        name = _norm(m.name)
        base = name.rpartition("/")[2]
        parent = name.rpartition("/")[0]
        if base == OPAQUE_MARKER:
            opq.append(parent)
        elif base.startswith(WHITEOUT_PREFIX):
            wh.append(f"{parent}/{base[len(WHITEOUT_PREFIX):]}" if parent else base[len(WHITEOUT_PREFIX):])
    return wh, opq


def write_cvmfs_layer(root: Path, layer: BuiltLayer, *, record: bool = True, marker: bool = True) -> Path:
    """Store ``layer`` under ``root`` in CVMFS form; without ``record`` it looks like a DUCC layer (no layer.json)."""
    lay = RepositoryLayout(root)
    layerfs = lay.layerfs(layer.digest)
    layerfs.mkdir(parents=True)
    members = _members(layer.tar)
    _extract(members, layerfs)
    if marker:
        (layerfs / CATALOG_MARKER).touch()
    if record:
        wh, opq = whiteout_index(layer.tar)
        lay.layer_metadata_dir(layer.digest).mkdir(parents=True, exist_ok=True)
        rec = LayerRecord(digest=layer.digest, diff_id=layer.diff_id, media_type=layer.media_type,
                          compressed_size=len(layer.blob), uncompressed_size=len(layer.tar), entries=len(members),
                          whiteouts=wh, opaque_dirs=opq)
        lay.layer_json(layer.digest).write_text(rec.to_json())
    return layerfs


def extract_like_containerd(tar: bytes, dest: Path) -> None:
    """Apply a layer tar into an empty ``dest`` like containerd's overlayfs snapshotter does."""
    dest.mkdir(parents=True, exist_ok=True)
    regular: list[tuple[tarfile.TarInfo, bytes]] = []
    for m, data in _members(tar):
        name = _norm(m.name)
        base = name.rpartition("/")[2]
        parent = dest / name.rpartition("/")[0]
        if base == OPAQUE_MARKER:
            parent.mkdir(parents=True, exist_ok=True)
            os.setxattr(parent, OPAQUE_XATTR, b"y")
        elif base.startswith(WHITEOUT_PREFIX):
            parent.mkdir(parents=True, exist_ok=True)
            target = parent / base[len(WHITEOUT_PREFIX):]
            os.mknod(target, stat.S_IFCHR, os.makedev(0, 0))  # EEXIST fails the unpack, as in containerd
            os.chown(target, m.uid, m.gid)
        else:
            p = dest / name
            if p.is_symlink() or (p.exists() and not (p.is_dir() and m.isdir())):
                p.unlink()  # "remove and replace" (our whiteouts only; no test replaces a directory by a file)
            regular.append((m, data))
    _extract(regular, dest)


@contextmanager
def mounted_overlay(lowerdirs: Sequence[Path], target: Path) -> Iterator[Path]:
    """Mount ``lowerdirs`` (top-most first) read-only at ``target`` through short relative symlinks."""
    links = Path(tempfile.mkdtemp(prefix="ovl-", dir="/tmp"))
    try:
        for i, d in enumerate(lowerdirs):
            os.symlink(d, links / str(i))
        target.mkdir(parents=True, exist_ok=True)
        opts = "lowerdir=" + ":".join(str(i) for i in range(len(lowerdirs)))
        if len(lowerdirs) == 1:  # overlay needs two layers without an upperdir
            os.mkdir(links / "empty")
            opts += ":empty"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)], cwd=links, check=True,
                       capture_output=True, text=True)
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        for e in os.scandir(links):
            if e.is_symlink():
                os.unlink(e.path)
            else:
                os.rmdir(e.path)
        os.rmdir(links)
