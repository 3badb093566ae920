"""The cvmfs backends against the recording stand-in AND, where this machine has one, a real CernVM-FS stratum-0.

The same assertions run on both: what a layer keeps (``.wh.*`` files, owners), what the repository records for
what CVMFS loses (xattrs, hard links), ownership of ``layerfs`` and of the directories a layer only implies,
publishes per image, GC removal with ``ingest -d``, the clear error on trees an older ingest left with owner
4294967295, and DUCC's multi-arch variant symlink as a node's CVMFS client resolves it. Real-server runs skip,
saying why, where ``/usr/bin/cvmfs_server`` and the repositories test.local / tx.local are not there.
"""

from __future__ import annotations

import base64
import io
import json
import os
import uuid
from pathlib import Path

import pytest

from cvmfs_snap.errors import CommandError
from cvmfs_snap.layout import RepositoryLayout
from cvmfs_snap.oci import RegistryClient
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry
from publisher.backends.base import LayerInfo
from publisher.backends.ingest_tar import files_tar
from publisher.pipeline import Publisher
from tests.support.cvmfs_targets import Target, make_target
from tests.support.publisher_env import check_invariants

CAP = bytes([1, 0, 0, 2, 0, 0x20, 0, 0] + [0] * 12)  # cap_net_raw+ep, as setcap writes it

TARGETS = [
    pytest.param(("fake", "cvmfs-ingest"), id="fake-ingest"),
    pytest.param(("fake", "cvmfs-transaction"), id="fake-transaction"),
    pytest.param(("real", "cvmfs-ingest"), id="real-ingest"),
    pytest.param(("real", "cvmfs-transaction"), id="real-transaction"),
]


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    kind, backend = request.param
    return make_target(kind, backend, tmp_path, monkeypatch)


def _layers(marker: str) -> tuple[im.BuiltLayer, im.BuiltLayer]:
    base = im.layer([
        im.Entry("usr/lib/deep/data", data=marker.encode()),  # usr, usr/lib, usr/lib/deep only implied
        "etc/",
        ("etc/motd", b"hello\n"),
        "opt/", "opt/app/", ("opt/app/old.txt", b"old\n"),
        im.Entry("bin", type="dir"),
        im.Entry("bin/tool", data=f"tool {marker}\n".encode(), mode=0o755, uid=1000, gid=1000),
        im.Entry("bin/tool-link", type="hardlink", linkname="bin/tool"),
        im.Entry("bin/ping", data=b"ping", mode=0o755,
                 pax={"SCHILY.xattr.security.capability": CAP.decode("latin-1"), "SCHILY.xattr.user.note": "n"}),
    ])
    top = im.layer([
        "etc/", im.Entry("etc/.wh.motd"),
        "opt/", "opt/app/", im.Entry("opt/app/.wh..wh..opq"), ("opt/app/new.txt", marker.encode()),
    ], codec="zstd")
    return base, top


def _publisher(target: Target, client: RegistryClient, **kw: object) -> Publisher:
    backend = target.backend(**kw)
    backend.recover()
    return Publisher(backend, client, concurrency=1)


def test_layers_keep_whiteouts_and_owners_and_record_what_cvmfs_loses(
    target: Target, registry: Registry, client: RegistryClient
) -> None:
    marker = uuid.uuid4().hex
    base, top = _layers(marker)
    img = im.image([base, top])
    name = f"cvmfs-backends/{target.backend_name}-{marker[:8]}"
    im.push_image(registry.url, name, "v1", img)
    with _publisher(target, client) as pub:
        res = pub.publish_image(registry.ref(name, "v1"))
        publishes = pub.backend.server.publishes  # type: ignore[attr-defined]
    assert res.ok, res.error
    # 2 layer ingests + their metadata in one ingest + flat and image transactions (+ new buckets: 2 each at most)
    assert publishes <= 2 + 1 + 2 + 2 * 2, publishes

    layout = RepositoryLayout(target.root)
    lfs_top, lfs_base = layout.layerfs(top.digest), layout.layerfs(base.digest)
    # deletions are kept as the layout promises, whichever backend (a transaction would have deleted them)
    assert (lfs_top / "etc/.wh.motd").is_file() and (lfs_top / "opt/app/.wh..wh..opq").is_file()
    assert (lfs_base / "bin/tool").stat().st_uid == 1000
    # layerfs and the directories the layer only implies are root-owned, not 4294967295
    for d in (lfs_base, lfs_base / "usr", lfs_base / "usr/lib", lfs_base / "usr/lib/deep", lfs_top):
        st = d.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o755), d
    # what ingest loses is recorded for the node
    rec = layout.read_layer_record(base.digest)
    assert rec is not None and rec.diff_id == base.diff_id
    assert rec.hardlinks == [["bin/tool-link", "bin/tool"]]
    assert rec.xattrs == {"bin/ping": {"security.capability": base64.b64encode(CAP).decode(),
                                       "user.note": base64.b64encode(b"n").decode()}}
    assert os.listxattr(lfs_base / "bin/ping") == []  # ingest dropped them (as the real server does)
    assert (lfs_base / "bin/tool-link").stat().st_ino != (lfs_base / "bin/tool").stat().st_ino
    top_rec = layout.read_layer_record(top.digest)
    assert top_rec is not None and top_rec.whiteouts == ["etc/motd"] and top_rec.opaque_dirs == ["opt/app"]
    assert json.loads(layout.origin_json(top.digest).read_text()) == {"origin": [img.config_digest]}

    flat = layout.flat_dir(img.config_digest)
    assert not (flat / "etc/motd").exists() and sorted(os.listdir(flat / "opt/app")) == ["new.txt"]
    assert (flat / "usr/lib/deep/data").read_text() == marker
    assert check_invariants(target.root) == []

    # as a node sees it through its CVMFS client
    seen = RepositoryLayout(target.client_path())
    node_lfs = seen.layerfs(base.digest)
    assert node_lfs.stat().st_uid == 0 and (node_lfs / "usr").stat().st_uid == 0
    assert (seen.layerfs(top.digest) / "etc/.wh.motd").is_file()
    assert seen.read_layer_record(base.digest) == rec


def test_gc_removal_of_a_layer_uses_ingest_delete(target: Target, client: RegistryClient) -> None:
    """Layer directories ingest made cannot be changed by a transaction: removing one goes through ingest -d,
    and the repository takes transactions afterwards."""
    marker = uuid.uuid4().hex
    lay = im.layer([("a/b/c", marker.encode())])
    backend = target.backend()
    info = LayerInfo(lay.digest, lay.media_type, len(lay.blob), expected_diff_id=lay.diff_id)
    backend.publish_layer(info, io.BytesIO(lay.tar))
    layout = backend.layout
    rel = str(layout.layer_dir(lay.digest).relative_to(target.root))
    with backend.transaction() as txn:  # also publishes the pending layer.json first
        assert layout.layer_json(lay.digest).is_file()
        txn.remove(rel)
        txn.write_file(f"cvmfs-backends-gc/{marker}", b"x")
    assert not layout.layer_dir(lay.digest).exists()
    assert (target.root / "cvmfs-backends-gc" / marker).read_bytes() == b"x"
    with backend.transaction() as txn:
        txn.remove("cvmfs-backends-gc/" + marker)
    assert not (target.root / "cvmfs-backends-gc" / marker).exists()


def test_tree_with_unknown_owner_gives_a_clear_error(target: Target) -> None:
    """A tree an older ingest recorded with owner 4294967295 (no ./ entry) cannot be changed in a transaction:
    the failure says so and how to remove it; the transaction is aborted and the tree removable by ingest -d."""
    backend = target.backend()
    rel = f"cvmfs-backends-legacy-{uuid.uuid4().hex[:12]}"
    backend.server.ingest(f"{rel}/layerfs", [files_tar([("a/f", b"x")])])  # as cvmfs-snap did before
    assert (target.root / rel / "layerfs").stat().st_uid == 65534
    with pytest.raises(CommandError) as err, backend.transaction() as txn:
        txn.write_file(f"{rel}/layerfs/a/new", b"y")
    assert "4294967295" in str(err.value)
    if target.real:  # the real union refuses at the write (PermissionError); the stand-in at its publish
        assert "Permission denied" in str(err.value)
        assert f"cvmfs_server ingest -d <path> {target.repo}" in str(err.value)
    assert not (target.root / rel / "layerfs/a/new").exists()
    backend._delete_paths([rel])
    assert not (target.root / rel).exists()
    with backend.transaction() as txn:  # no transaction was left open
        txn.write_file(f"{rel}-ok", b"ok")
    with backend.transaction() as txn:
        txn.remove(f"{rel}-ok")


def test_multiarch_public_name_resolves_on_a_node(target: Target, registry: Registry, client: RegistryClient
                                                  ) -> None:
    marker = uuid.uuid4().hex
    amd = im.image([im.layer([("arch", b"amd64 " + marker.encode())])], architecture="amd64")
    arm = im.image([im.layer([("arch", b"arm64 " + marker.encode())])], architecture="arm64", variant="v8")
    name = f"cvmfs-backends/multi-{marker[:8]}"
    im.Pusher(registry.url).multiarch(name, "v1", [
        (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        (amd, {"os": "linux", "architecture": "amd64"}),
    ])
    with _publisher(target, client) as pub:
        res = pub.publish_image(registry.ref(name, "v1"))
    assert res.ok, res.error
    layout = RepositoryLayout(target.root)
    public = layout.public_link(registry.host, name, "v1")
    assert "$(CVMFS_ARCH:-amd64)" in os.readlink(public)
    assert check_invariants(target.root) == []
    # a node: CVMFS_ARCH is `uname -m` (x86_64 here), resolved through the .multiarch/x86_64 alias
    node = RepositoryLayout(target.client_path()).public_link(registry.host, name, "v1")
    if target.real:
        assert (node / "arch").read_bytes() == b"amd64 " + marker.encode()
    else:
        resolved = public.parent / os.readlink(public).replace("$(CVMFS_ARCH:-amd64)", os.uname().machine)
        assert (resolved / "arch").read_bytes() == b"amd64 " + marker.encode()
