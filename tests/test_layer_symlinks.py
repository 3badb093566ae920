"""Merged mode follows parent symlinks inside the root, as containerd does when it applies a layer on a merged view.

A usrmerge base layer has ``lib -> usr/lib``; a later layer built with plain ``tar`` adds
``lib/x86_64-linux-gnu/libfoo.so``. containerd (continuity's ``fs.RootPath``) and umoci (securejoin) resolve the
parent path inside the root, so the file lands in ``usr/lib/x86_64-linux-gnu/``: absolute targets restart at the
root, ``..`` stops there, the last component of an entry is never followed, hardlink targets resolve the same way.
``layer`` mode keeps refusing a layer that writes through its own symlink. Escapes are in test_layer_hostile.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cvmfs_snap.errors import UnsafeLayerError
from cvmfs_snap.layer import apply_layer, open_layer
from cvmfs_snap.layer.inroot import MAX_SYMLINKS, InRoot
from cvmfs_snap.layer.rules import own_symlink_error
from cvmfs_snap_devenv.images import BuiltLayer, Entry, image, layer, make_tar, sha256
from tests.support.trees import NON_DIRS, diff, listing


def usrmerge_layers() -> list[BuiltLayer]:
    base = layer([
        "usr/", "usr/lib/", "usr/lib/x86_64-linux-gnu/", ("usr/lib/x86_64-linux-gnu/libc.so.6", b"libc"),
        ("usr/lib/old.so", b"old"), ("usr/lib/gone.so", b"gone"), "bin/", "opt/", "opt/deep/",
        Entry("lib", "symlink", linkname="usr/lib"),
        Entry("lib64", "symlink", linkname="/usr/lib"),                     # absolute: inside the root
        Entry("opt/deep/up", "symlink", linkname="../../../../usr"),        # '..' above the root: clamped
        Entry("opt/chain", "symlink", linkname="deep/up/lib/../lib"),       # symlink through a symlink
    ])
    tar_built = layer([
        Entry("lib/x86_64-linux-gnu", "dir", mode=0o750),                  # existing dir below the symlink
        ("lib/x86_64-linux-gnu/libfoo.so", b"foo"),
        Entry("lib/x86_64-linux-gnu/libfoo.so.1", "hardlink", linkname="lib/x86_64-linux-gnu/libfoo.so"),
        ("lib64/ld-linux.so", b"ld"),
        ("opt/deep/up/lib/viaup.so", b"up"),
        ("opt/chain/viachain.so", b"chain"),
        Entry("bin/ld", "hardlink", linkname="lib64/ld-linux.so"),          # hardlink target through a symlink
        Entry("lib/.wh.gone.so"),                                           # whiteout through a symlink
    ])
    top = layer([
        Entry("lib64/x86_64-linux-gnu/.wh..wh..opq"),                      # opaque dir through a symlink
        ("lib64/x86_64-linux-gnu/libnew.so", b"new"),
    ])
    return [base, tar_built, top]


def apply_all(layers: list[BuiltLayer], target: Path, mode: str = "merged") -> None:
    for lay in layers:
        with open_layer(io.BytesIO(lay.blob), lay.media_type, name=lay.digest) as s:
            apply_layer(s, target, mode=mode)  # type: ignore[arg-type]


def test_usrmerge_tar_built_layer_lands_below_the_symlink(tmp_path: Path) -> None:
    layers = usrmerge_layers()
    apply_all(layers[:2], tmp_path)
    assert os.readlink(tmp_path / "lib") == "usr/lib" and os.readlink(tmp_path / "lib64") == "/usr/lib"
    libdir = tmp_path / "usr/lib"
    assert sorted(os.listdir(libdir / "x86_64-linux-gnu")) == ["libc.so.6", "libfoo.so", "libfoo.so.1"]
    assert oct((libdir / "x86_64-linux-gnu").stat().st_mode & 0o7777) == oct(0o750)  # the dir entry applied
    assert (libdir / "x86_64-linux-gnu/libfoo.so.1").stat().st_ino == (libdir / "x86_64-linux-gnu/libfoo.so"
                                                                       ).stat().st_ino
    assert (libdir / "ld-linux.so").read_bytes() == b"ld"  # absolute symlink followed inside the root ...
    assert not Path("/usr/lib/ld-linux.so").exists()      # ... never on the host
    assert (libdir / "viaup.so").read_bytes() == b"up"     # '..' stopped at the root
    assert (libdir / "viachain.so").read_bytes() == b"chain"
    assert (tmp_path / "bin/ld").stat().st_ino == (libdir / "ld-linux.so").stat().st_ino
    assert not (libdir / "gone.so").exists() and (libdir / "old.so").exists()
    assert sorted(os.listdir(tmp_path)) == ["bin", "lib", "lib64", "opt", "usr"]  # no stray real lib/ dir
    apply_all(layers[2:], tmp_path)
    # opaque through the symlink: the lower layers' files go, this layer's stay
    assert sorted(os.listdir(libdir / "x86_64-linux-gnu")) == ["libnew.so"]


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed")
def test_usrmerge_matches_umoci_unpack(tmp_path: Path) -> None:
    layers = usrmerge_layers()
    img = image(layers)
    oci = tmp_path / "oci"
    blobs = oci / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in [*(lay.blob for lay in layers), img.config, img.manifest]:
        (blobs / sha256(blob)[7:]).write_bytes(blob)
    (oci / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (oci / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": img.manifest_media_type, "digest": img.manifest_digest, "size": len(img.manifest),
         "annotations": {"org.opencontainers.image.ref.name": "t"}}]}))
    proc = subprocess.run(["umoci", "unpack", "--image", f"{oci}:t", str(tmp_path / "bundle")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ours = tmp_path / "ours"
    ours.mkdir()
    apply_all(layers, ours)
    mine, theirs = listing(ours, mtimes=NON_DIRS), listing(tmp_path / "bundle" / "rootfs", mtimes=NON_DIRS)
    assert diff(mine, theirs) == []
    assert "usr/lib/x86_64-linux-gnu/libnew.so" in mine and "usr/lib/viachain.so" in mine  # compared what matters


def _target_with_usrmerge(tmp_path: Path) -> Path:
    apply_all(usrmerge_layers()[:1], tmp_path)
    return tmp_path


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    target = _target_with_usrmerge(tmp_path)
    tar = make_tar([Entry("loop1", "symlink", linkname="loop2"), Entry("loop2", "symlink", linkname="/loop1"),
                    ("loop1/x", b"x")])
    with pytest.raises(UnsafeLayerError, match=r"'loop1/x'.*symlink loop, ELOOP"):
        apply_layer(io.BytesIO(tar), target, mode="merged")
    with pytest.raises(UnsafeLayerError, match="ELOOP"):  # a hardlink target resolves the same way
        apply_layer(io.BytesIO(make_tar([Entry("h", "hardlink", linkname="loop1/x")])), target, mode="merged")


@pytest.mark.parametrize("n, ok", [(MAX_SYMLINKS, True), (MAX_SYMLINKS + 1, False)])
def test_symlinks_followed_per_path_are_bounded(n: int, ok: bool, tmp_path: Path) -> None:
    """A chain of n symlinks s0 -> s1 -> ... -> d: at most MAX_SYMLINKS (40, as Linux) are followed."""
    entries: list[Entry | tuple[str, bytes] | str] = ["d/"]
    entries += [Entry(f"s{i}", "symlink", linkname=f"s{i + 1}" if i + 1 < n else "d") for i in range(n)]
    entries.append(("s0/x", b"x"))
    if ok:
        apply_layer(io.BytesIO(make_tar(entries)), tmp_path, mode="merged")
        assert (tmp_path / "d/x").read_bytes() == b"x"
    else:
        with pytest.raises(UnsafeLayerError, match=f"more than {MAX_SYMLINKS} symlinks"):
            apply_layer(io.BytesIO(make_tar(entries)), tmp_path, mode="merged")
        assert not (tmp_path / "d/x").exists()


def test_last_component_is_never_followed(tmp_path: Path) -> None:
    """An entry at a symlink's own path replaces the symlink; a whiteout of it deletes the symlink, not its target."""
    target = _target_with_usrmerge(tmp_path)
    apply_layer(io.BytesIO(make_tar([("lib", b"a file now"), "lib64/", Entry(".wh.opt")])), target,
                mode="merged")
    assert (target / "lib").read_bytes() == b"a file now" and not (target / "lib64").is_symlink()
    assert os.listdir(target / "lib64") == []
    assert sorted(os.listdir(target / "usr/lib")) == ["gone.so", "old.so", "x86_64-linux-gnu"]  # untouched
    (target / "opt").mkdir()
    (target / "opt/link").symlink_to("../usr/lib")
    apply_layer(io.BytesIO(make_tar([Entry("opt/.wh.link")])), target, mode="merged")
    assert not os.path.lexists(target / "opt/link") and (target / "usr/lib/old.so").exists()


def test_dangling_symlink_creates_directories_inside_the_root(tmp_path: Path) -> None:
    tar = make_tar([Entry("dangle", "symlink", linkname="/nonexistent/deeper"), ("dangle/c", b"c")])
    apply_layer(io.BytesIO(tar), tmp_path, mode="merged")
    assert (tmp_path / "nonexistent/deeper/c").read_bytes() == b"c"
    assert not Path("/nonexistent").exists()


def test_symlink_to_a_file_as_parent_is_refused(tmp_path: Path) -> None:
    target = _target_with_usrmerge(tmp_path)
    tar = make_tar([Entry("tofile", "symlink", linkname="usr/lib/old.so"), ("tofile/y", b"y")])
    with pytest.raises(UnsafeLayerError, match=r"'tofile/y'.*'usr/lib/old.so' \(after following symlinks\) is a "
                                               r"regular file, not a directory"):
        apply_layer(io.BytesIO(tar), target, mode="merged")


def test_layer_mode_stores_usrmerge_layers_but_refuses_writing_through_own_symlink(tmp_path: Path) -> None:
    """Each layer on its own: the tar-built layer has no symlink of its own, so its lib/ is a plain directory (as in
    containerd's overlayfs snapshotter, which applies it to an empty upper dir). A layer that writes below its own
    symlink is refused, saying why."""
    base, tar_built, _ = usrmerge_layers()
    for i, lay in enumerate((base, tar_built)):
        (tmp_path / str(i)).mkdir()
        apply_all([lay], tmp_path / str(i), mode="layer")
    assert (tmp_path / "1/lib").is_dir() and not (tmp_path / "1/lib").is_symlink()
    assert (tmp_path / "1/lib/x86_64-linux-gnu/libfoo.so").read_bytes() == b"foo"
    own = make_tar([Entry("lib", "symlink", linkname="usr/lib"), ("lib/libx.so", b"x")])
    (tmp_path / "own").mkdir()
    with pytest.raises(UnsafeLayerError, match=r"'lib/libx.so'.*parent 'lib' is a symlink \(to 'usr/lib'\).*"
                                               r"In layer mode") as info:
        apply_layer(io.BytesIO(own), tmp_path / "own", mode="layer")
    assert "Rebuild the image" in str(info.value)


@pytest.mark.slow
def test_usrmerge_matches_real_containerd_native_snapshotter(tmp_path: Path, short_tmp: Path,
                                                             registry: object) -> None:
    """containerd's native snapshotter applies each layer on a copy of the merged tree below it (archive.Apply on
    a merged view): the same situation as our merged mode, so the same tree."""
    from cvmfs_snap_devenv.containerd import start_containerd
    from cvmfs_snap_devenv.images import push_image
    from cvmfs_snap_devenv.registry import Registry

    assert isinstance(registry, Registry)
    layers = usrmerge_layers()
    push_image(registry.url, "layer-symlinks/usrmerge", "v1", image(layers))
    ref = registry.ref("layer-symlinks/usrmerge", "v1")
    chain = layers[0].diff_id
    for lay in layers[1:]:
        chain = sha256(f"{chain} {lay.diff_id}".encode())
    ours = tmp_path / "ours"
    ours.mkdir()
    apply_all(layers, ours)
    with start_containerd(short_tmp / "ctd") as ctd:
        ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "native", ref)
        r = ctd.ctr("snapshots", "--snapshotter", "native", "view", "--target", str(tmp_path / "m"),
                    "usrmerge-view", chain, check=False)
        assert r.returncode == 0, r.stderr
        # a native snapshot's mount is a bind mount of a plain directory: read that directory directly
        src = re.search(r"mount -t bind (\S+) ", r.stdout)
        assert src, r.stdout
        theirs = listing(Path(src.group(1)), mtimes=NON_DIRS)
    assert diff(listing(ours, mtimes=NON_DIRS), theirs) == []
    # compared what matters: lib stayed a symlink (nothing listed below it), the files are below usr/lib
    assert "usr/lib/x86_64-linux-gnu/libnew.so" in theirs and not [p for p in theirs if p.startswith("lib/")]


def test_in_root_resolver_on_its_own(tmp_path: Path) -> None:
    """The resolver is a reusable piece: symlinks resolve inside the root, '..' and absolute targets stay there,
    and the walk (never following) refuses a symlink with the error its user chose."""
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    os.symlink("usr/lib", tmp_path / "lib")
    os.symlink("/../../usr", tmp_path / "up")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    dirs = InRoot(fd, own_symlink_error, follow_symlinks=True)
    try:
        assert dirs.resolve(["lib", "x"], True, "w") == ["usr", "lib", "x"]
        assert dirs.resolve(["up", "lib"], False, "w") == ["usr", "lib"]
        assert dirs.resolve(["..", "..", "lib"], False, "w") == ["usr", "lib"]
        assert dirs.resolve(["lib", "missing"], False, "w") is None
        got = dirs.parent(["lib", "new"], True, "w")
        assert got is not None and got[1] == ["usr", "lib", "new"]
        assert (tmp_path / "usr" / "lib" / "new").is_dir()
        with pytest.raises(UnsafeLayerError, match="'lib' is a symlink \\(to 'usr/lib'\\) of this layer"):
            dirs.walk(["lib", "y"], True, "w")
    finally:
        dirs.close()
        os.close(fd)
    assert not (tmp_path / "lib" / "y").exists() and not (tmp_path / "usr" / "lib" / "y").exists()
