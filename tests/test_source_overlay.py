"""The CVMFS source's overlay stacks show a container exactly what containerd's overlayfs snapshotter shows.

Layers are stored in CVMFS form (plain ``.wh.*`` files, ``.cvmfscatalog`` markers), stacked with the source's
``lowerdirs()`` in a real overlay mount, and compared with the same layers extracted the way containerd does it (and,
in one test, with real containerd's overlayfs snapshotter after a real pull).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from cvmfs_snap.containerd.labels import chain_ids
from cvmfs_snap.labelnames import CRI_LAYER_DIGEST, SNAPSHOT_REF
from cvmfs_snap.snapshotter.sources.cvmfs import CvmfsSource
from cvmfs_snap_devenv.images import BuiltLayer, Entry, estargz_layer, image, layer, push_image
from tests.support.layersource import lookup
from tests.support.layertrees import MTIMES, extract_like_containerd, mounted_overlay, write_cvmfs_layer
from tests.support.trees import listing

T1, T2, T3 = 1_600_000_000, 1_650_000_000, 1_690_000_000


def scenario_layers() -> list[BuiltLayer]:
    """Three layers exercising deletions: files, dirs, opaque dirs, re-creation, dir metadata, xattrs."""
    l1 = layer([
        Entry("etc", "dir", mtime=T1),
        Entry("etc/keep", data=b"keep", mtime=T1),
        Entry("etc/gone", data=b"old gone", mtime=T1),
        Entry("etc/sub", "dir", mtime=T1),
        Entry("etc/sub/a", data=b"a"), Entry("etc/sub/b", data=b"b"),
        Entry("dir_del", "dir"), Entry("dir_del/x", data=b"x"), Entry("dir_del/nested", "dir"),
        Entry("dir_del/nested/z", data=b"z"),
        Entry("opq", "dir"), Entry("opq/old1", data=b"1"), Entry("opq/keepdir", "dir"),
        Entry("opq/keepdir/k", data=b"k"),
        Entry("recreate", "dir"), Entry("recreate/old", data=b"old"),
        Entry("file_then_dir", data=b"I was a file"),
        Entry("samedir", "dir"), Entry("samedir/x1", data=b"x1"),
        Entry("mixed", "dir", mtime=T1), Entry("mixed/m1", data=b"m1"), Entry("mixed/m2", data=b"m2"),
        Entry("usr", "dir", mode=0o750, uid=1000, gid=1000, mtime=T1, pax={"SCHILY.xattr.user.l1": "one"}),
        Entry("usr/gone2", data=b"g2"), Entry("usr/stay", data=b"stay"),
        Entry("sgid", "dir", mode=0o2775, uid=0, gid=50, mtime=T1), Entry("sgid/f", data=b"f"),
        Entry("link", "symlink", linkname="etc/keep"),
        Entry("linkdir", "symlink", linkname="etc"),
    ])
    l2 = layer([
        Entry("etc", "dir", mtime=T2, mode=0o711),
        Entry("etc/.wh.gone"),
        Entry("etc/sub", "dir", mtime=T2),
        Entry("etc/sub/.wh.a"),
        Entry(".wh.dir_del"),
        Entry("opq", "dir", mtime=T2), Entry("opq/.wh..wh..opq"), Entry("opq/new", data=b"new"),
        Entry(".wh.recreate"),
        Entry(".wh.file_then_dir"), Entry("file_then_dir", "dir", mtime=T2),
        Entry("file_then_dir/inside", data=b"inside"),
        Entry(".wh.samedir"), Entry("samedir", "dir", mtime=T2), Entry("samedir/x2", data=b"x2"),
        Entry("mixed", "dir", mtime=T2), Entry("mixed/.wh.m1"), Entry("mixed/m3", data=b"m3"),
        Entry("usr", "dir", mode=0o700, uid=2000, gid=2001, mtime=T2, pax={"SCHILY.xattr.user.l2": "two"}),
        Entry("usr/.wh.gone2"), Entry("usr/new", data=b"usr new", mode=0o4755),
        Entry("top_file", data=b"top"),
        Entry(".wh.linkdir"),
    ])
    l3 = layer([
        Entry("recreate", "dir", mtime=T3), Entry("recreate/new", data=b"new recreate"),
        Entry("dir_del", "dir", mtime=T3, mode=0o700), Entry("dir_del/fresh", data=b"fresh"),
        Entry("etc", "dir", mtime=T3, mode=0o711), Entry("etc/gone", data=b"new gone"),
        Entry(".wh.top_file"),
        Entry("linkdir", "dir", mtime=T3), Entry("linkdir/real", data=b"real"),
    ])
    return [l1, l2, l3]


def build_repo(root: Path, layers: Sequence[BuiltLayer], *, record: bool = True) -> None:
    for lay in layers:
        write_cvmfs_layer(root, lay, record=record)


def our_stack(src: CvmfsSource, layers: Sequence[BuiltLayer]) -> list[Path]:
    """Lowerdirs of an image, top-most first, as the snapshot core stacks them."""
    out: list[Path] = []
    for lay in reversed(layers):
        out += src.lowerdirs(lay.digest)
    return out


def reference_stack(base: Path, layers: Sequence[BuiltLayer]) -> list[Path]:
    dirs = []
    for i, lay in enumerate(layers):
        d = base / f"ref{i}"
        extract_like_containerd(lay.tar, d)
        dirs.append(d)
    return list(reversed(dirs))


def check_scenario_view(view: dict[str, tuple[object, ...]], m: Path) -> None:
    """What the scenario must show, spelled out (so a failure says what is wrong, not only 'trees differ')."""
    names = set(view)
    assert not [n for n in names if os.path.basename(n).startswith(".wh.") or ".cvmfscatalog" in n]
    assert (m / "etc/keep").read_bytes() == b"keep"
    assert (m / "etc/gone").read_bytes() == b"new gone"          # deleted by L2, re-created by L3
    assert "etc/sub/a" not in names and "etc/sub/b" in names      # whiteout in a nested dir
    assert sorted(os.listdir(m / "dir_del")) == ["fresh"]         # dir deleted, re-created with other content
    assert sorted(os.listdir(m / "opq")) == ["new"]               # opaque dir
    assert sorted(os.listdir(m / "recreate")) == ["new"]          # deleted dir re-created in a later layer
    assert (m / "file_then_dir/inside").read_bytes() == b"inside"  # file replaced by a dir in one layer
    assert sorted(os.listdir(m / "samedir")) == ["x1", "x2"]      # .wh.D + D/ in one layer: containerd merges
    assert sorted(os.listdir(m / "mixed")) == ["m2", "m3"]        # whiteout + new file in the same dir
    assert sorted(os.listdir(m / "usr")) == ["new", "stay"]
    st = os.lstat(m / "usr")                                      # dir metadata of the top-most layer (L2)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, int(st.st_mtime)) == (0o700, 2000, 2001, T2)
    assert os.getxattr(m / "usr", "user.l2") == b"two"
    assert os.lstat(m / "sgid").st_mode & 0o7777 == 0o2775
    assert "top_file" not in names
    assert os.readlink(m / "link") == "etc/keep"
    assert not os.path.islink(m / "linkdir") and sorted(os.listdir(m / "linkdir")) == ["real"]
    assert int(os.lstat(m / "etc").st_mtime) == T3


@pytest.mark.parametrize("record", [True, False], ids=["layer.json", "ducc-scanned"])
def test_stack_matches_containerd_extraction(tmp_path: Path, record: bool) -> None:
    layers = scenario_layers()
    root = tmp_path / "repo"
    build_repo(root, layers, record=record)
    src = CvmfsSource(root, tmp_path / "state")
    ours = our_stack(src, layers)
    # every layer carries a catalog marker (a mask); only layer 2 has an opaque dir (a lower dir)
    assert len(ours) == 7
    assert all(p.is_absolute() and os.path.realpath(p) == str(p) for p in ours)
    ref = reference_stack(tmp_path, layers)
    with mounted_overlay(ours, tmp_path / "m_ours") as m1, mounted_overlay(ref, tmp_path / "m_ref") as m2:
        view_ours, view_ref = listing(m1, mtimes=MTIMES), listing(m2, mtimes=MTIMES)
        check_scenario_view(view_ours, m1)
        check_scenario_view(view_ref, m2)
        assert view_ours == view_ref
    # the DUCC layers' scanned indexes are cached by digest
    for lay in layers:
        idx = src.dirs.layer_dir(lay.digest.split(":")[1]) / "index.json"
        assert ("scan" if not record else "layer.json") in idx.read_text()


def test_root_opaque_and_top_level_whiteouts(tmp_path: Path) -> None:
    """A layer whose root is opaque and that deletes top-level entries; overlay ignores opaque on a lowerdir's
    root (and so does containerd's result): what matters is that we show the same."""
    l1 = layer(["a/", ("a/f", b"f"), ("b", b"b"), ("c", b"c"), "d/", ("d/e", b"e")])
    l2 = layer([".wh..wh..opq", ".wh.b", ".wh.d", ("new", b"n")])
    layers = [l1, l2]
    root = tmp_path / "repo"
    build_repo(root, layers)
    src = CvmfsSource(root, tmp_path / "state")
    lower = src.lowerdirs(l2.digest)[-1]
    assert os.getxattr(lower, "trusted.overlay.opaque") == b"y"
    ref = reference_stack(tmp_path, layers)
    with mounted_overlay(our_stack(src, layers), tmp_path / "m1") as m1, \
            mounted_overlay(ref, tmp_path / "m2") as m2:
        view = listing(m1, mtimes=MTIMES)
        assert "b" not in view and "d" not in view and "new" in view
        assert view == listing(m2, mtimes=MTIMES)


def test_layer_without_deletions_is_one_lowerdir(tmp_path: Path) -> None:
    plain = layer([("x", b"x"), "d/", ("d/y", b"y")])
    marked = layer([("z", b"z")])
    root = tmp_path / "repo"
    write_cvmfs_layer(root, plain, marker=False)
    write_cvmfs_layer(root, marked)
    src = CvmfsSource(root, tmp_path / "state")
    lay_plain = src.lowerdirs(plain.digest)
    assert lay_plain == [root.resolve() / ".layers" / plain.digest[7:9] / plain.digest[7:] / "layerfs"]
    mask, layerfs = src.lowerdirs(marked.digest)
    assert os.listdir(mask) == [".cvmfscatalog"] and os.path.isfile(layerfs / ".cvmfscatalog")
    with mounted_overlay([mask, layerfs, *lay_plain], tmp_path / "m") as m:
        assert sorted(os.listdir(m)) == ["d", "x", "z"]


def test_128_layer_image_mounts(tmp_path: Path) -> None:
    """128 layers, each deleting its predecessor's file and making a dir opaque: the worst case of 3 lowerdirs per
    layer, 383 in one overlay mount."""
    n = 128
    layers = []
    for i in range(n):
        entries: list[Entry | tuple[str, bytes] | str] = [(f"f{i}", b"%d" % i), (f"g{i}", b"g"), "o/",
                                                          (f"o/h{i}", b"h")]
        if i:
            entries += [Entry(f".wh.g{i - 1}"), Entry("o/.wh..wh..opq")]
        layers.append(layer(entries, codec="plain"))
    root = tmp_path / "repo"
    build_repo(root, layers)
    src = CvmfsSource(root, tmp_path / "state")
    stack = our_stack(src, layers)
    assert len(stack) == 3 * n - 1  # the first layer deletes nothing
    with mounted_overlay(stack, tmp_path / "m") as m:
        names = set(os.listdir(m))
        assert names == {f"f{i}" for i in range(n)} | {f"g{n - 1}", "o"}
        assert os.listdir(m / "o") == [f"h{n - 1}"]
        assert (m / "f77").read_bytes() == b"77"


# -- against real containerd ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_stack_matches_real_containerd_overlayfs(tmp_path: Path, short_tmp: Path, registry: object) -> None:
    from cvmfs_snap_devenv.containerd import start_containerd
    from cvmfs_snap_devenv.registry import Registry

    assert isinstance(registry, Registry)
    layers = scenario_layers()
    img = image(layers)
    push_image(registry.url, "source-cvmfs/scenario", "v1", img)
    ref = registry.ref("source-cvmfs/scenario", "v1")

    root = tmp_path / "repo"
    build_repo(root, layers)
    src = CvmfsSource(root, tmp_path / "state")
    top_chain = chain_ids([lay.diff_id for lay in layers])[-1]
    remote = lookup(src, {SNAPSHOT_REF: top_chain, CRI_LAYER_DIGEST: layers[-1].digest})
    assert remote is not None and remote.digest == layers[-1].digest

    with start_containerd(short_tmp / "ctd") as ctd:
        ctd.ctr("images", "pull", "--plain-http", ref)
        # the view has no lease: containerd's GC may drop it once ctr exits, so take the mount command at once
        # (it names only the committed layers, which the image keeps)
        r = ctd.ctr("snapshots", "view", "--target", str(tmp_path / "m_ctd"), "scenario-view", top_chain,
                    check=False)
        assert r.returncode == 0, r.stderr
        cmd = r.stdout.strip()
        argv = shlex.split(cmd)
        assert argv[:3] == ["mount", "-t", "overlay"] and re.search(r"lowerdir=[^,]*:", cmd), cmd
        (tmp_path / "m_ctd").mkdir()
        subprocess.run(argv, check=True)
        try:
            with mounted_overlay(our_stack(src, layers), tmp_path / "m_ours") as mine:
                theirs = tmp_path / "m_ctd"
                view_ctd = listing(theirs, mtimes=MTIMES)
                check_scenario_view(view_ctd, theirs)
                assert listing(mine, mtimes=MTIMES) == view_ctd
        finally:
            subprocess.run(["umount", str(tmp_path / "m_ctd")], check=True)


@pytest.mark.parametrize("prioritized", [(), ("etc/app.conf",)])
def test_estargz_entries_are_hidden_like_on_the_lazy_path(tmp_path: Path, prioritized: Sequence[str]) -> None:
    """A layer published from an eStargz blob keeps stargz.index.json and the landmark in its layerfs; the mask
    hides them, so the container sees the tree the lazy path shows (the layer's own files only)."""
    lay = estargz_layer(["etc/", ("etc/app.conf", b"x=1"), ("bin-data", b"d" * 5000)], prioritized)
    root = tmp_path / "repo"
    write_cvmfs_layer(root, lay)
    src = CvmfsSource(root, tmp_path / "state")
    dirs = src.lowerdirs(lay.digest)
    layerfs = dirs[1]
    assert "stargz.index.json" in os.listdir(layerfs)
    landmark = ".prefetch.landmark" if prioritized else ".no.prefetch.landmark"
    assert landmark in os.listdir(layerfs)
    with mounted_overlay(dirs, tmp_path / "m") as m:
        assert sorted(os.listdir(m)) == ["bin-data", "etc"]
        assert (m / "etc" / "app.conf").read_bytes() == b"x=1"


def test_plain_layer_with_a_stargz_named_file_keeps_it(tmp_path: Path) -> None:
    lay = layer([("stargz.index.json", b"{}"), ("a", b"a")])
    root = tmp_path / "repo"
    write_cvmfs_layer(root, lay)
    src = CvmfsSource(root, tmp_path / "state")
    with mounted_overlay(src.lowerdirs(lay.digest), tmp_path / "m") as m:
        assert sorted(os.listdir(m)) == ["a", "stargz.index.json"]
