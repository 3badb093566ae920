"""End to end, the one property that matters to a user: a container started from an image whose layers are served
from CVMFS sees exactly the root filesystem it would see after a normal pull.

An image with every tricky tar feature (whiteouts of files and dirs, opaque dirs, paths deleted and re-created with
another type or content, hardlinks, symlinks, set-id/sticky modes, non-root owners, ``user.*`` and
``security.capability`` xattrs, fifos, char devices, empty dirs, a zstd layer) is published with the publisher's local
backend, pulled with ``cvmfs-snap pull`` through our snapshotter (all layers served from the repository), and pulled
natively into a second containerd with its own overlayfs snapshotter. Both image snapshots are mounted the way
containerd mounts them for a container and compared entry by entry; then the image runs under runc on our
snapshotter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cvmfs_snap.containerd import labels as L
from cvmfs_snap.layout import RepositoryLayout
from cvmfs_snap_devenv.containerd import Containerd, start_containerd
from cvmfs_snap_devenv.images import BuiltLayer, Entry, Pusher, image, layer
from cvmfs_snap_devenv.registry import Registry, log_mark
from tests.support.e2e import (
    PLUGIN,
    Node,
    blob_gets_after,
    cvmfs_snap_pull,
    mounted_view,
    node,
    publish,
)
from tests.support.runnable import busybox_layer, require_busybox
from tests.support.trees import diff, view_listing

pytestmark = [pytest.mark.timeout(300)]

#: security.capability of `setcap cap_net_bind_service=ep`: VFS_CAP_REVISION_2 | effective, permitted bit 10
CAP_NET_BIND_SERVICE = bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000")


def _binary_pax(value: bytes) -> str:
    """A PAX header value holding arbitrary bytes (tarfile writes it with hdrcharset=BINARY)."""
    return value.decode("utf-8", "surrogateescape")


def tricky_image() -> list[BuiltLayer]:
    base = layer([
        "a/", ("a/f1", b"a/f1 v1\n"), ("a/f2", b"a/f2, deleted by layer 2\n"), "a/sub/", ("a/sub/x", b"x\n"),
        "d2/", ("d2/old", b"old content of d2\n"), "d2/deep/", ("d2/deep/er", b"deeper\n"),
        ("f2d", b"a file that becomes a directory\n"),
        "d2f/", ("d2f/inside", b"a dir that becomes a file\n"),
        ("x2d", b"file replaced by a dir without a whiteout\n"),
        "d2x/", ("d2x/in", b"dir replaced by a file without a whiteout\n"),
        ("re", b"first version of re\n"),
        "opq/", ("opq/old1", b"hidden by opaque\n"), "opq/sub/", ("opq/sub/old2", b"hidden too\n"),
        # hardlink headers carry the target's metadata, as Go's archive/tar and GNU tar write them
        "hl/", Entry("hl/orig", data=b"hardlinked\n", mode=0o640, uid=1000, gid=1000),
        Entry("hl/link", type="hardlink", linkname="hl/orig", mode=0o640, uid=1000, gid=1000),
        Entry("hl/link2", type="hardlink", linkname="hl/orig", mode=0o640, uid=1000, gid=1000),
        Entry("sym", type="symlink", linkname="a/f1"),
        Entry("symdir", type="symlink", linkname="a"),
        Entry("symabs", type="symlink", linkname="/etc/hostname"),
        Entry("dangling", type="symlink", linkname="/no/such/file"),
        Entry("suid", data=b"#!/bin/sh\n", mode=0o4755),
        Entry("sgid", data=b"#!/bin/sh\n", mode=0o2711, gid=50),
        Entry("sgiddir", type="dir", mode=0o2775, gid=100),
        Entry("sticky", type="dir", mode=0o1777),
        Entry("home", type="dir"),
        Entry("home/user", type="dir", mode=0o700, uid=1000, gid=1000),
        Entry("home/user/.profile", data=b"export X=1\n", mode=0o600, uid=1000, gid=1000),
        Entry("nobody", data=b"nobody's\n", uid=65534, gid=65534),
        Entry("xattr-file", data=b"xattrs\n", pax={"SCHILY.xattr.user.mime_type": "text/plain",
                                                   "SCHILY.xattr.user.empty": ""}),
        Entry("xattr-dir", type="dir", pax={"SCHILY.xattr.user.dir": "yes"}),
        Entry("ping", data=b"#!/bin/sh\necho ping\n", mode=0o755,
              pax={"SCHILY.xattr.security.capability": _binary_pax(CAP_NET_BIND_SERVICE)}),
        Entry("fifo", type="fifo", mode=0o600),
        Entry("dev", type="dir"),
        Entry("dev/null2", type="char", mode=0o666, devmajor=1, devminor=3),
        Entry("empty", type="dir"),
        Entry("empty2", type="dir", mode=0o750, uid=33, gid=33),
        ("keep", b"untouched\n"),
    ])
    middle = layer([
        Entry(".wh.d2"),  # delete a whole directory
        "a/", Entry("a/.wh.f2"), "a/sub/", ("a/sub/y", b"y\n"),  # delete a file, add one beside
        Entry(".wh.f2d"), "f2d/", ("f2d/inner", b"now f2d is a dir\n"),  # file -> dir (same layer)
        Entry(".wh.d2f"), ("d2f", b"now d2f is a file\n"),  # dir -> file (same layer)
        Entry(".wh.re"),  # deleted here, re-created by the top layer
        "opq/", Entry("opq/.wh..wh..opq"), ("opq/new", b"only this in opq\n"),
        Entry(".wh.fifo"),  # delete a fifo
        Entry("hl/.wh.link2"),  # delete one name of a hardlinked inode
    ], codec="gzip")
    top = layer([
        ("re", b"second version of re, other content\n"),  # deleted then re-created
        "d2/", ("d2/again", b"d2 re-created, old content must stay gone\n"),
        "a/", ("a/f1", b"a/f1 v2 replaced\n"),
        "x2d/", ("x2d/child", b"x2d is a dir now\n"),
        ("d2x", b"d2x is a file now\n"),
        "new/", ("new/h1", b"new hardlink pair\n"), Entry("new/h2", type="hardlink", linkname="new/h1"),
        Entry("new/fifo", type="fifo", mode=0o644, uid=1000),
        "empty/", Entry("empty/.wh..wh..opq"),  # opaque on an already empty dir
        Entry("xattr-file", data=b"xattrs v2\n", pax={"SCHILY.xattr.user.mime_type": "text/x-changed"}),
    ], codec="zstd")
    return [busybox_layer(), base, middle, top]


@dataclass
class BothPulls:
    node: Node
    native: Containerd
    ref: str
    ours: dict[str, dict[str, Any]]  # listing of the image on our snapshotter (layers served from CVMFS)
    theirs: dict[str, dict[str, Any]]  # listing of the image on containerd's overlayfs snapshotter


@contextmanager
def published_and_native(registry: Registry, tmp: Path, name: str, layers: list[BuiltLayer],
                         ducc: bool = False) -> Iterator[BothPulls]:
    """Push and publish an image, pull it through our snapshotter (every layer must be served remotely, no blob
    downloaded) and natively into a second containerd; list both root filesystems. ``ducc``: remove our
    layer.json files after publishing, leaving the layers as DUCC does (the snapshotter scans them for whiteouts)."""
    img = image(layers, cmd=("/bin/sh",))
    p = Pusher(registry.url)
    try:
        p.image(name, "v1", img)
    finally:
        p.close()
    ref = registry.ref(name, "v1")
    repo = tmp / "cvmfs"
    publish(repo, ref, insecure_host=registry.host)
    if ducc:
        layout = RepositoryLayout(repo)
        for lay in layers:
            layout.layer_json(lay.digest).unlink()
            assert layout.is_layer_complete(lay.digest)
    top_chain = L.chain_ids([lay.diff_id for lay in layers])[-1]
    with node(tmp / "n", repo) as n, start_containerd(tmp / "nat") as native:
        mark = log_mark(registry.log)
        _, out = cvmfs_snap_pull(n.containerd, ref)
        assert [lay["outcome"] for lay in out["layers"]] == ["remote"] * len(layers), out
        assert out["chainID"] == top_chain
        for lay in layers:
            assert blob_gets_after(registry.log, lay.digest, mark) == 0, f"published {lay.digest} was downloaded"
        native.ctr("images", "pull", "--plain-http", ref)
        with mounted_view(n.containerd, PLUGIN, top_chain, "e2e-view") as ours_root:
            ours = view_listing(ours_root)
        with mounted_view(native, "overlayfs", top_chain, "e2e-view") as native_root:
            theirs = view_listing(native_root)
        yield BothPulls(n, native, ref, ours, theirs)
        assert "Traceback" not in n.log()


@pytest.mark.parametrize("layout", ["layer.json", "ducc"])
def test_rootfs_identical_to_native_pull(fresh_registry: Registry, short_tmp: Path, layout: str) -> None:
    """``layer.json``: as our publisher leaves layers; ``ducc``: without layer.json, as DUCC leaves them."""
    require_busybox()
    with published_and_native(fresh_registry, short_tmp, "e2e/rootfs", tricky_image(), ducc=layout == "ducc") as both:
        ours, theirs, n = both.ours, both.theirs, both.node
        # the comparison is only as good as the image: make sure the tricky entries are really there
        assert theirs["re"]["sha256"] != "" and theirs["f2d"]["type"] == "dir" and theirs["d2f"]["type"] == "file"
        assert sorted(k for k in theirs if k.startswith("opq")) == ["opq", "opq/new"]
        assert "a/f2" not in theirs and "d2/old" not in theirs and "fifo" not in theirs
        assert theirs["dev/null2"]["rdev"] == [1, 3] and theirs["new/fifo"]["type"] == "fifo"
        assert theirs["suid"]["mode"] == "0o4755" and theirs["sticky"]["mode"] == "0o1777"
        assert theirs["ping"]["xattrs"] == {"security.capability": CAP_NET_BIND_SERVICE.hex()}
        assert theirs["xattr-dir"]["xattrs"] == {"user.dir": b"yes".hex()}
        assert theirs["new/h1"]["hardlinks"] == ["new/h1", "new/h2"]

        differences = diff(ours, theirs, "ours", "native")
        assert differences == [], "\n".join(differences[:40])
        hidden = [k for k in ours if k.rsplit("/", 1)[-1].startswith(".wh.") or k.endswith(".cvmfscatalog")]
        assert hidden == []
        # the DUCC variant really went through the scan of the layer trees
        assert ("published by DUCC?" in n.log()) == (layout == "ducc")

        # the image runs with runc on our snapshotter, and a deleted path is gone inside the container
        r = n.containerd.ctr("run", "--rm", "--snapshotter", PLUGIN, both.ref, "e2e-rootfs-run", "/bin/sh", "-c",
                             "test ! -e /d2/old && test ! -e /a/f2 && test ! -e /opq/old1 && cat /re /d2f "
                             "&& ls /opq && ls -a /d2", check=False)
        assert r.returncode == 0, r.stderr + n.log()[-3000:]
        assert r.stdout.split("\n") == ["second version of re, other content", "now d2f is a file", "new",
                                        ".", "..", "again", ""]


def test_hardlink_header_metadata_like_containerd(fresh_registry: Registry, short_tmp: Path) -> None:
    """A hardlink header with other owner/mode than its target: containerd applies it to the inode (both names)."""
    require_busybox()
    lay = layer(["hl/", Entry("hl/orig", data=b"x\n", mode=0o640, uid=1000, gid=1000),
                 Entry("hl/link", type="hardlink", linkname="hl/orig", mode=0o644)])
    with published_and_native(fresh_registry, short_tmp, "e2e/hardlink", [busybox_layer(), lay]) as both:
        assert both.theirs["hl/orig"]["mode"] == "0o644"  # what containerd does: the last header wins
        differences = diff(both.ours, both.theirs, "ours", "native")
        assert differences == [], "\n".join(differences)
