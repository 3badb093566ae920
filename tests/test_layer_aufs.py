"""AUFS bookkeeping (``.wh..wh.plnk/``, ``.wh..wh.aufs``...) in old Docker images never reaches a container.

In ``layer`` mode such entries are stored as they are (as ``cvmfs_server ingest`` stores them) and listed in the
whiteout index's ``hidden``; the publisher records them in ``layer.json`` and the node's CVMFS source masks them
with char 0/0 whiteouts. In ``merged`` mode they are skipped. Compared with containerd's extraction
(tests/support/layertrees.py; containerd 1.6's overlay conversion): containerd hides ``.wh..wh.X`` itself (it
becomes a whiteout of ``.wh.X``) but still writes what lies *below* a ``.wh..wh.plnk/`` directory, into an implied
directory of that name. We hide that too, as Docker does; that is the one difference, spelled out below.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from cvmfs_snap.errors import UnsafeLayerError
from cvmfs_snap.layer import apply_layer, iter_layer, scan_tree_whiteouts
from cvmfs_snap.layout import RepositoryLayout
from cvmfs_snap.snapshotter.sources.cvmfs import CvmfsSource
from cvmfs_snap_devenv.images import BuiltLayer, Entry, layer
from publisher.backends.base import LayerInfo
from publisher.backends.ingest_tar import spool_and_validate
from publisher.backends.local import LocalBackend
from tests.support.layertrees import MTIMES, extract_like_containerd, mounted_overlay
from tests.support.trees import listing, names

T = 1_400_000_000
AUFS_META = [".wh..wh.aufs", ".wh..wh.orph", ".wh..wh.plnk", "etc/.wh..wh.aufs"]


def aufs_layers() -> list[BuiltLayer]:
    base = layer([Entry("etc", "dir", mtime=T), Entry("etc/keep", data=b"k", mtime=T),
                  Entry("etc/gone", data=b"g", mtime=T), Entry("usr", "dir", mtime=T)])
    aufs = layer([
        Entry(".wh..wh.aufs", mode=0o600, mtime=T),                          # AUFS metadata file
        Entry(".wh..wh.orph", "dir", mode=0o700, mtime=T),                   # ... an empty metadata dir
        Entry(".wh..wh.plnk", "dir", mode=0o700, mtime=T),                   # ... and one with content
        Entry(".wh..wh.plnk/123", data=b"linked by aufs", mtime=T),
        Entry("etc", "dir", mtime=T + 1), Entry("etc/.wh..wh.aufs", mtime=T),
        Entry("etc/.wh.gone", mtime=T),                                      # a real whiteout still works
        Entry("usr", "dir", mtime=T + 3), Entry("usr/new", data=b"new", mtime=T + 2),
        Entry("usr/h", "hardlink", linkname=".wh..wh.plnk/123", mtime=T),    # hardlink into the pseudo-link dir
    ])
    return [base, aufs]


def test_layer_mode_keeps_and_indexes_aufs_metadata(tmp_path: Path) -> None:
    aufs = aufs_layers()[1]
    res = apply_layer(io.BytesIO(aufs.tar), tmp_path, mode="layer")
    assert res.whiteouts.hidden == AUFS_META and res.whiteouts.whiteouts == ["etc/gone"]
    assert (tmp_path / ".wh..wh.plnk/123").read_bytes() == b"linked by aufs"
    assert (tmp_path / "usr/h").stat().st_ino == (tmp_path / ".wh..wh.plnk/123").stat().st_ino
    assert scan_tree_whiteouts(tmp_path) == res.whiteouts  # DUCC-style layers: the same index from the tree
    # the ingest path (no unpacking, cvmfs_server stores the tar) records the same index
    rec = spool_and_validate(LayerInfo(aufs.digest, aufs.media_type, len(aufs.blob), aufs.diff_id),
                             io.BytesIO(aufs.tar), tmp_path / "spool.tar").record
    assert (rec.whiteouts, rec.opaque_dirs, rec.hidden) == (["etc/gone"], [], AUFS_META)
    assert next(e.path for e in iter_layer(io.BytesIO(aufs.tar))) == ".wh..wh.aufs"  # checked, passed on


def test_merged_mode_skips_aufs_metadata(tmp_path: Path) -> None:
    base, aufs = aufs_layers()
    no_hardlink = layer([Entry(".wh..wh.plnk", "dir"), (".wh..wh.plnk/123", b"x"), Entry(".wh..wh.aufs"),
                         Entry("etc/.wh..wh.aufs"), Entry("etc/.wh.gone"), ("usr/new", b"new")])
    for lay in (base, no_hardlink):
        apply_layer(io.BytesIO(lay.tar), tmp_path, mode="merged")
    left = names(tmp_path)
    assert left == ["etc", "etc/keep", "usr", "usr/new"]
    # a hardlink into the skipped pseudo-link dir cannot be made: refused with a message that says why
    with pytest.raises(UnsafeLayerError, match=r"'usr/h'.*hardlink into AUFS metadata"):
        apply_layer(io.BytesIO(aufs.tar), tmp_path, mode="merged")


def test_published_layer_hides_aufs_metadata_through_the_source(tmp_path: Path) -> None:
    layers = aufs_layers()
    root = tmp_path / "repo"
    backend = LocalBackend(root)
    for lay in layers:
        rec = backend.publish_layer(LayerInfo(lay.digest, lay.media_type, len(lay.blob), lay.diff_id),
                                    io.BytesIO(lay.tar))
    assert rec.hidden == AUFS_META
    layout = RepositoryLayout(root)
    stored = layout.read_layer_record(layers[1].digest)
    assert stored is not None and stored.hidden == AUFS_META
    assert (layout.layerfs(layers[1].digest) / ".wh..wh.plnk/123").is_file()  # kept in the tree, as ingest does
    src = CvmfsSource(root, tmp_path / "state")
    ours = [d for lay in reversed(layers) for d in src.lowerdirs(lay.digest)]
    ref: list[Path] = []
    for i, lay in enumerate(layers):
        extract_like_containerd(lay.tar, tmp_path / f"ref{i}")
        ref.insert(0, tmp_path / f"ref{i}")
    with mounted_overlay(ours, tmp_path / "m_ours") as m1, mounted_overlay(ref, tmp_path / "m_ref") as m2:
        view = listing(m1, mtimes=MTIMES)
        assert not [p for p in view if any(c.startswith(".wh.") for c in p.split("/"))], sorted(view)
        assert (m1 / "usr/h").read_bytes() == b"linked by aufs"  # the hardlink itself stays visible
        assert "etc/gone" not in view and "etc/keep" in view
        # containerd shows what lies below .wh..wh.plnk/ (in an implied directory); we hide it, as Docker does
        assert sorted(set(names(m2)) - set(view)) == [".wh..wh.plnk", ".wh..wh.plnk/123"]
        assert listing(m2, mtimes=MTIMES, skip=[".wh..wh.plnk"]) == view
    # a DUCC-made layer (no layer.json) is scanned and hidden the same way
    layout.layer_json(layers[1].digest).unlink()
    src2 = CvmfsSource(root, tmp_path / "state2")
    ours2 = [d for lay in reversed(layers) for d in src2.lowerdirs(lay.digest)]
    with mounted_overlay(ours2, tmp_path / "m_ducc") as m3:
        assert listing(m3, mtimes=MTIMES) == view
    assert src2.held() == sorted(lay.digest for lay in layers)


@pytest.mark.slow
def test_difference_from_real_containerd_is_only_below_plnk(tmp_path: Path, short_tmp: Path, registry: object) -> None:
    """Real containerd 1.6 (overlayfs snapshotter, after a real pull) shows the same tree except what lies below
    ``.wh..wh.plnk/``, which we hide (see the module docstring)."""
    import re
    import shlex
    import subprocess

    from cvmfs_snap_devenv.containerd import start_containerd
    from cvmfs_snap_devenv.images import image, push_image
    from cvmfs_snap_devenv.registry import Registry

    assert isinstance(registry, Registry)
    layers = aufs_layers()
    push_image(registry.url, "layer-aufs/img", "v1", image(layers))
    ref = registry.ref("layer-aufs/img", "v1")
    root = tmp_path / "repo"
    backend = LocalBackend(root)
    for lay in layers:
        backend.publish_layer(LayerInfo(lay.digest, lay.media_type, len(lay.blob), lay.diff_id), io.BytesIO(lay.tar))
    src = CvmfsSource(root, tmp_path / "state")
    top_chain = layers[0].diff_id
    for lay in layers[1:]:
        top_chain = "sha256:" + hashlib.sha256(f"{top_chain} {lay.diff_id}".encode()).hexdigest()
    with start_containerd(short_tmp / "ctd") as ctd:
        ctd.ctr("images", "pull", "--plain-http", ref)
        r = ctd.ctr("snapshots", "view", "--target", str(tmp_path / "m_ctd"), "aufs-view", top_chain, check=False)
        assert r.returncode == 0, r.stderr
        argv = shlex.split(r.stdout.strip())
        assert argv[:3] == ["mount", "-t", "overlay"] and re.search(r"lowerdir=[^,]*:", r.stdout), r.stdout
        (tmp_path / "m_ctd").mkdir()
        subprocess.run(argv, check=True)
        try:
            ours = [d for lay in reversed(layers) for d in src.lowerdirs(lay.digest)]
            with mounted_overlay(ours, tmp_path / "m_ours") as mine:
                view = listing(mine, mtimes=MTIMES)
            only_ctd = sorted(set(names(tmp_path / "m_ctd")) - set(view))
            view_ctd = listing(tmp_path / "m_ctd", mtimes=MTIMES, skip=[".wh..wh.plnk"])
        finally:
            subprocess.run(["umount", str(tmp_path / "m_ctd")], check=True)
    assert only_ctd == [".wh..wh.plnk", ".wh..wh.plnk/123"]
    assert view_ctd == view
