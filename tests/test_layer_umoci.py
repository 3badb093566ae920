"""Our ``merged`` mode, applied layer by layer, gives the same root filesystem as ``umoci unpack``.

The image is made of our own tars (so that it holds every corner we care about: deletions, opaque directories in
both orders, setuid, devices, FIFOs, hardlinks, xattrs, long names), written as an OCI image layout that umoci
reads. umoci is an independent implementation of the OCI layer rules (whiteouts included), run here as root.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cvmfs_snap.layer import apply_layer, open_layer
from cvmfs_snap_devenv.images import BuiltLayer, Entry, image, layer
from tests.support.trees import NON_DIRS, diff, listing

CAP = bytes.fromhex("0100000200200000000000000000000000000000").decode("utf-8", "surrogateescape")
T = 1_650_000_000
LONG = "/".join(["long" * 20] * 3)

pytestmark = pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed")


def _layers() -> list[BuiltLayer]:
    d = {"type": "dir", "mtime": T}
    base = layer([
        Entry("bin", **d), Entry("etc", **d), Entry("usr", **d), Entry("usr/bin", **d), Entry("var", **d),  # type: ignore[arg-type]
        Entry("var/cache", **d), Entry("var/cache/sub", **d), Entry("var/lib", **d),  # type: ignore[arg-type]
        Entry("var/lib/sub", **d), Entry("gone", **d), Entry("gone/deeper", **d),  # type: ignore[arg-type]
        Entry("dev", **d), Entry("tmp", "dir", mode=0o1777, mtime=T),  # type: ignore[arg-type]
        Entry("bin/busybox", data=b"\x7fELF busybox", mode=0o755, mtime=T + 1),
        Entry("bin/sh", "symlink", linkname="busybox", mtime=T + 2),
        Entry("bin/ls", "hardlink", linkname="bin/busybox", mode=0o755, mtime=T + 1),  # as tar writers do
        Entry("usr/bin/ping", data=b"ping", mode=0o4755, mtime=T + 3,
              pax={"SCHILY.xattr.security.capability": CAP}),
        Entry("usr/bin/wall", data=b"wall", mode=0o2755, gid=5, mtime=T + 4),
        Entry("usr/bin/tagged", data=b"t", mtime=T + 5, pax={"SCHILY.xattr.user.origin": "cvmfs-snap test"}),
        Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", mtime=T + 6),
        Entry("etc/owned", data=b"o", uid=1000, gid=1000, mode=0o640, mtime=T + 7),
        Entry("etc/abs-link", "symlink", linkname="/etc/passwd", mtime=T + 8),
        Entry("etc/deleted", data=b"d", mtime=T + 9),
        Entry("gone/deeper/file", data=b"g", mtime=T + 10),
        Entry("var/cache/old", data=b"old", mtime=T + 11),
        Entry("var/cache/sub/old", data=b"old", mtime=T + 12),
        Entry("var/lib/old", data=b"old", mtime=T + 13),
        Entry("var/lib/sub/old", data=b"old", mtime=T + 14),
        Entry("dev/null", "char", mode=0o666, devmajor=1, devminor=3, mtime=T + 15),
        Entry("dev/loop0", "block", mode=0o660, gid=6, devmajor=7, devminor=0, mtime=T + 16),
        Entry("dev/fifo", "fifo", mode=0o620, mtime=T + 17),
        Entry("replaced-by-dir", data=b"file", mtime=T + 18),
        Entry("dir-replaced", **d), Entry("dir-replaced/child", data=b"c", mtime=T),  # type: ignore[arg-type]
        Entry(LONG, data=b"a long path", mtime=T + 19),
    ], codec="gzip")
    upper = layer([
        Entry("etc/.wh.deleted", mtime=T), Entry(".wh.gone", mtime=T),
        Entry("var/cache/.wh..wh..opq", mtime=T),  # opaque first ...
        Entry("var/cache/new", data=b"new", mtime=T + 20),
        Entry("var/lib/sub", "dir", mode=0o700, mtime=T + 21),  # ... and opaque after this layer's entries
        Entry("var/lib/sub/new", data=b"new", mtime=T + 22),
        Entry("var/lib/.wh..wh..opq", mtime=T),
        Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/ash\n", mtime=T + 23),
        Entry("replaced-by-dir", "dir", mode=0o750, mtime=T),
        Entry("dir-replaced", data=b"now a file", mtime=T + 24),
        Entry("bin/cat", "hardlink", linkname="bin/busybox", mode=0o755, mtime=T + 1),
        Entry("usr/bin/ping", data=b"ping v2", mode=0o4711, mtime=T + 25,
              pax={"SCHILY.xattr.security.capability": CAP, "SCHILY.xattr.user.v": "2"}),
    ], codec="gzip")  # umoci 0.4.7 cannot read zstd layers
    top = layer([
        Entry("dev/.wh.fifo", mtime=T), Entry("bin/.wh.ls", mtime=T),
        Entry("etc/new-owned", data=b"n", uid=4242, gid=4243, mode=0o604, mtime=T + 26),
    ], codec="plain")
    return [base, upper, top]


def _write_layout(path: Path, layers: list[BuiltLayer]) -> None:
    img = image(layers)
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in [*(lay.blob for lay in layers), img.config, img.manifest]:
        import hashlib

        (blobs / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (path / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": img.manifest_media_type, "digest": img.manifest_digest,
                       "size": len(img.manifest), "annotations": {"org.opencontainers.image.ref.name": "test"}}],
    }))


def test_merged_mode_matches_umoci_unpack(tmp_path: Path) -> None:
    layers = _layers()
    _write_layout(tmp_path / "oci", layers)
    proc = subprocess.run(["umoci", "unpack", "--image", f"{tmp_path / 'oci'}:test", str(tmp_path / "bundle")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ours = tmp_path / "ours"
    ours.mkdir()
    for lay in layers:
        with open_layer(io.BytesIO(lay.blob), lay.media_type, name=lay.digest) as s:
            res = apply_layer(s, ours, mode="merged")
        assert res.diff_id == lay.diff_id
    theirs = listing(tmp_path / "bundle" / "rootfs", mtimes=NON_DIRS)
    mine = listing(ours, mtimes=NON_DIRS)
    assert diff(mine, theirs) == []
    # the comparison covers what it claims to
    assert "etc/deleted" not in mine and "gone" not in mine and "dev/fifo" not in mine
    assert sorted(k for k in mine if k.startswith("var/")) == [
        "var/cache", "var/cache/new", "var/lib", "var/lib/sub", "var/lib/sub/new"]
    assert mine["usr/bin/ping"]["mode"] == "0o4711" and "security.capability" in mine["usr/bin/ping"]["xattrs"]
    assert mine["dev/null"]["rdev"] == [1, 3]
    assert "bin/busybox" in mine["bin/cat"]["hardlinks"]
    assert mine[LONG]["size"] == len(b"a long path")
