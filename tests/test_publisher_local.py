"""The publisher pipeline with the local backend, against a real registry on loopback."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from cvmfs_snap.errors import UnsafeLayerError
from cvmfs_snap.layout import REMOVE_SCHEDULE, LayerRecord, RepositoryLayout
from cvmfs_snap.oci import RegistryClient
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry
from publisher.backends.base import LayerInfo, TarStream
from publisher.backends.local import STAGING_DIR, LocalBackend
from publisher.factory import make_publisher
from publisher.pipeline import Publisher
from publisher.schedule import read_remove_schedule
from tests.support.blobcount import settled_blob_gets
from tests.support.publisher_env import base_layer, check_invariants, top_layer
from tests.support.trees import NON_DIRS, listing


class CountingBackend(LocalBackend):
    """The real local backend, counting how often each layer is published."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: Counter[str] = Counter()
        self._clock = threading.Lock()

    def publish_layer(self, info: LayerInfo, tar_stream: TarStream) -> LayerRecord:
        with self._clock:
            self.calls[info.digest] += 1
        return super().publish_layer(info, tar_stream)


def publisher(root: Path, client: RegistryClient, **kw: object) -> tuple[Publisher, CountingBackend]:
    be = CountingBackend(root)
    return Publisher(be, client, **kw), be  # type: ignore[arg-type]


def test_multilayer_image_layout(registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    base, top = base_layer("a"), top_layer("zstd")
    img = im.image([base, top])
    mdigest = im.push_image(registry.url, "pub/multi", "v1", img)
    root = tmp_path / "repo"
    pub, _ = publisher(root, client)
    with pub:
        res = pub.publish_image(registry.ref("pub/multi", "v1"))
    assert res.ok, res.error
    assert res.manifest_digest == mdigest
    assert res.layers_published == 2
    layout = RepositoryLayout(root)

    # layer trees: whiteouts stay plain files, catalogs where the contract says
    lfs = layout.layerfs(top.digest)
    assert (lfs / "etc/.wh.motd").is_file() and (lfs / "etc/.wh.motd").stat().st_size == 0
    assert (lfs / "opt/app/.wh..wh..opq").is_file()
    assert (lfs / ".cvmfscatalog").is_file()
    assert (root / ".layers/.cvmfscatalog").is_file()
    assert (layout.layer_bucket(top.digest) / ".cvmfscatalog").is_file()
    assert (layout.layerfs(base.digest) / "bin/tool").stat().st_uid == 1000
    assert os.readlink(layout.layerfs(base.digest) / "bin/sh-link") == "tool"

    rec = layout.read_layer_record(top.digest)
    assert rec is not None
    assert rec.diff_id == top.diff_id and rec.media_type == im.OCI_LAYER_ZSTD
    assert rec.whiteouts == ["etc/motd"] and rec.opaque_dirs == ["opt/app"]
    assert rec.compressed_size == len(top.blob) and rec.uncompressed_size == len(top.tar)
    podman = json.loads(layout.layers_json(top.digest).read_text())
    assert podman[0]["id"] == top.diff_id.split(":")[1]
    assert podman[0]["compressed-diff-digest"] == top.digest
    assert podman[0]["diff-digest"] == top.diff_id and podman[0]["diff-size"] == len(top.tar)
    assert json.loads(layout.origin_json(base.digest).read_text()) == {"origin": [img.config_digest]}

    # image metadata
    meta = layout.image_metadata_dir(registry.host, "pub/multi", "v1")
    assert (meta / "manifest.json").read_bytes() == img.manifest
    assert (meta / "config.json").read_bytes() == img.config
    image_rec = json.loads((meta / "image.json").read_text())
    assert image_rec["manifest_digest"] == mdigest and image_rec["layers"] == [base.digest, top.digest]

    # flat tree: whiteouts applied, opaque dir emptied, own catalog; relative public link
    flat = layout.flat_dir(img.config_digest)
    assert (flat / ".cvmfscatalog").is_file()
    assert (flat / "etc/os-release").read_bytes() == b"NAME=test\n"
    assert not (flat / "etc/motd").exists() and not (flat / "etc/.wh.motd").exists()
    assert sorted(os.listdir(flat / "opt/app")) == ["new.txt"]
    link = layout.public_link(registry.host, "pub/multi", "v1")
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    assert link.resolve() == flat.resolve()
    assert check_invariants(root) == []
    assert os.listdir(root / STAGING_DIR) == []


def test_shared_layer_processed_once_and_origin_merged(
    registry: Registry, client: RegistryClient, tmp_path: Path
) -> None:
    shared = base_layer("shared")
    imgs = [im.image([shared, im.layer([(f"img{i}", str(i).encode())], codec="gzip")]) for i in range(3)]
    refs = []
    for i, img in enumerate(imgs):
        im.push_image(registry.url, f"pub/shared{i}", "v1", img)
        refs.append(registry.ref(f"pub/shared{i}", "v1"))
    root = tmp_path / "repo"
    pub, be = publisher(root, client, concurrency=2)
    with pub:
        results = pub.publish_images(refs)
    assert all(r.ok for r in results), [r.error for r in results]
    assert be.calls[shared.digest] == 1
    assert sum(be.calls.values()) == 4
    origin = json.loads(RepositoryLayout(root).origin_json(shared.digest).read_text())["origin"]
    assert sorted(origin) == sorted(i.config_digest for i in imgs)
    assert check_invariants(root) == []


def test_multiarch_all_platforms_and_restriction(registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    amd = im.image([base_layer("amd64")], architecture="amd64")
    arm = im.image([base_layer("arm64")], architecture="arm64", variant="v8")
    ppc = im.image([base_layer("ppc64le")], architecture="ppc64le")
    idx_digest = im.Pusher(registry.url).multiarch(
        "pub/multiarch", "v1",
        [(arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
         (amd, {"os": "linux", "architecture": "amd64"}),
         (ppc, {"os": "linux", "architecture": "ppc64le"})],
    )
    root = tmp_path / "repo"
    pub, _ = publisher(root, client)
    with pub:
        res = pub.publish_image(registry.ref("pub/multiarch", "v1"))
    assert res.ok, res.error
    assert res.manifest_digest == idx_digest
    assert sorted(res.platforms) == ["amd64", "arm64:v8", "ppc64le"]  # DUCC's <arch>:<variant>
    layout = RepositoryLayout(root)
    meta = layout.image_metadata_dir(registry.host, "pub/multiarch", "v1")
    assert json.loads((meta / "index.json").read_text())["manifests"]
    for key, img in (("amd64", amd), ("arm64:v8", arm), ("ppc64le", ppc)):
        assert (meta / key / "manifest.json").read_bytes() == img.manifest
        link = layout.multiarch_link(key, registry.host, "pub/multiarch", "v1")
        assert link.resolve() == layout.flat_dir(img.config_digest).resolve()
        assert (link / "etc/motd").read_text() == f"hello {key.split(':')[0]}\n"
        assert str(link.relative_to(root)).startswith(f".multiarch/{key}/{registry.host}/")
    # the plain name points at amd64 even though arm64 comes first in the index
    public = layout.public_link(registry.host, "pub/multiarch", "v1")
    assert public.resolve() == layout.flat_dir(amd.config_digest).resolve()
    assert json.loads((meta / "image.json").read_text())["index_digest"] == idx_digest

    # a restriction to arm64: only that platform, and the plain name points at it
    root2 = tmp_path / "repo2"
    pub2, be2 = publisher(root2, client, platforms=["linux/arm64"])
    with pub2:
        res2 = pub2.publish_image(registry.ref("pub/multiarch", "v1"))
    assert res2.ok, res2.error
    assert res2.platforms == ["arm64:v8"]
    assert set(be2.calls) == {arm.layers[0].digest}
    layout2 = RepositoryLayout(root2)
    assert layout2.public_link(registry.host, "pub/multiarch", "v1").resolve() == (
        layout2.flat_dir(arm.config_digest).resolve()
    )


def test_multiarch_names_of_earlier_versions_are_renamed(
    registry: Registry, client: RegistryClient, tmp_path: Path
) -> None:
    """Repositories published before the DUCC spelling (``arm64-v8``) are renamed on the next run."""
    amd = im.image([base_layer("ren-amd")], architecture="amd64")
    arm = im.image([base_layer("ren-arm")], architecture="arm64", variant="v8")
    im.Pusher(registry.url).multiarch("pub/rename", "v1", [(amd, {"os": "linux", "architecture": "amd64"}),
                                       (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    root = tmp_path / "repo"
    layout = RepositoryLayout(root)
    ref = registry.ref("pub/rename", "v1")
    meta = layout.image_metadata_dir(registry.host, "pub/rename", "v1")
    new_link = layout.multiarch_link("arm64:v8", registry.host, "pub/rename", "v1")
    old_link = layout.multiarch_link("arm64-v8", registry.host, "pub/rename", "v1")
    pub, _ = publisher(root, client)
    with pub:
        assert pub.publish_image(ref).ok
        os.rename(meta / "arm64:v8", meta / "arm64-v8")  # what an earlier version wrote
        old_link.parent.mkdir(parents=True)
        os.rename(new_link, old_link)
        assert old_link.is_dir()
        res = pub.publish_image(ref)
        assert res.ok and not res.unchanged and res.layers_published == 0, res
        assert pub.publish_image(ref).unchanged
    assert sorted(p.name for p in meta.iterdir() if p.is_dir()) == ["amd64", "arm64:v8"]
    assert new_link.resolve() == layout.flat_dir(arm.config_digest).resolve()
    assert not old_link.is_symlink()
    assert check_invariants(root) == []


def test_idempotent_and_moved_tag(registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    base = base_layer("move")
    v1 = im.image([base, top_layer("gzip", b"one\n")])
    d1 = im.push_image(registry.url, "pub/moving", "stable", v1)
    root = tmp_path / "repo"
    ref = registry.ref("pub/moving", "stable")
    pub, be = publisher(root, client)
    with pub:
        first = pub.publish_image(ref)
        again = pub.publish_image(ref)
        assert first.ok and not first.unchanged
        assert again.ok and again.unchanged and again.layers_published == 0
        assert sum(be.calls.values()) == 2

        v2 = im.image([base, top_layer("gzip", b"two\n")])
        d2 = im.push_image(registry.url, "pub/moving", "stable", v2)
        moved = pub.publish_image(ref)
    assert moved.ok, moved.error
    assert moved.moved_from == d1 and moved.manifest_digest == d2
    assert moved.layers_published == 1 and moved.layers_skipped == 1
    assert be.calls[base.digest] == 1
    layout = RepositoryLayout(root)
    link = layout.public_link(registry.host, "pub/moving", "stable")
    assert (link / "opt/app/new.txt").read_text() == "two\n"
    schedule = read_remove_schedule(root)
    assert len(schedule) == 1
    cfg = schedule[0].raw["config"]
    assert isinstance(cfg, dict) and cfg["digest"] == v1.config_digest
    assert schedule[0].manifest_digest == d1
    assert (root / REMOVE_SCHEDULE).is_file()
    # the old flat tree is still there (GC removes it after the grace period), the new one is linked
    assert layout.flat_dir(v1.config_digest).is_dir()
    assert check_invariants(root) == []


def test_crash_leftovers_are_redone(registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    """A run that left image.json but lost its public link (or a flat tree) is completed, not skipped."""
    img = im.image([base_layer("redo")])
    im.push_image(registry.url, "pub/redo", "v1", img)
    root = tmp_path / "repo"
    ref = registry.ref("pub/redo", "v1")
    pub, _ = publisher(root, client)
    with pub:
        assert pub.publish_image(ref).ok
        layout = RepositoryLayout(root)
        layout.public_link(registry.host, "pub/redo", "v1").unlink()
        res = pub.publish_image(ref)
    assert res.ok and not res.unchanged
    assert layout.public_link(registry.host, "pub/redo", "v1").is_dir()


@pytest.mark.parametrize(
    "entries",
    [
        [im.Entry("link", type="symlink", linkname="/etc"), ("link/evil-passwd", b"x")],
        [im.Entry("hl", type="hardlink", linkname="../../outside")],
    ],
    ids=["write-through-symlink", "hardlink-escape"],
)
def test_hostile_layer_fails_image_without_trace(
    registry: Registry, client: RegistryClient, tmp_path: Path, entries: list[im.Entry]
) -> None:
    good = base_layer("hostile")
    bad = im.layer(entries)
    img = im.image([good, bad])
    repo = "pub/hostile-" + ("a" if entries[0].type == "symlink" else "b")
    im.push_image(registry.url, repo, "v1", img)
    root = tmp_path / "repo"
    pub, _ = publisher(root, client)
    with pub:
        res = pub.publish_image(registry.ref(repo, "v1"))
    assert not res.ok
    assert bad.digest in res.error
    layout = RepositoryLayout(root)
    assert not layout.layer_dir(bad.digest).exists()
    assert layout.is_layer_complete(good.digest)  # the good layer is fine to keep
    assert not layout.image_metadata_dir(registry.host, repo, "v1").exists()
    assert not layout.public_link(registry.host, repo, "v1").exists()
    assert not Path("/etc/evil-passwd").exists()
    assert os.listdir(root / STAGING_DIR) == []
    assert check_invariants(root) == []


def test_wrong_diff_id_is_refused(registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    lay = base_layer("diffid")
    other = im.layer([("x", b"y")])
    img = im.image([lay])
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"] = [other.diff_id]
    config = json.dumps(cfg).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": im.OCI_MANIFEST,
        "config": {"mediaType": im.OCI_CONFIG, "digest": im.sha256(config), "size": len(config)},
        "layers": [lay.descriptor()],
    }).encode()
    forged = im.BuiltImage([lay], config, manifest, im.OCI_MANIFEST)
    im.push_image(registry.url, "pub/diffid", "v1", forged)
    root = tmp_path / "repo"
    pub, _ = publisher(root, client)
    with pub:
        res = pub.publish_image(registry.ref("pub/diffid", "v1"))
    assert not res.ok
    assert "diffID" in res.error and lay.digest in res.error
    assert not RepositoryLayout(root).layer_dir(lay.digest).exists()


def test_unknown_image_and_bad_reference(registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    pub, _ = publisher(root, client)
    with pub:
        missing, bad = pub.publish_images([registry.ref("pub/does-not-exist", "v1"), "Not A/Valid::ref"])
    assert not missing.ok and "pub/does-not-exist" in missing.error
    assert not bad.ok and "invalid" in bad.error.lower()
    assert check_invariants(root) == []


def test_auth_failure_and_credentials(tmp_path: Path) -> None:
    import base64

    from cvmfs_snap.oci import CredentialStore
    from cvmfs_snap_devenv.registry import htpasswd_auth, start_registry

    password = "s3cret-Pw-for-publisher"
    auth = htpasswd_auth(tmp_path, "alice", password)
    with start_registry(tmp_path / "reg", auth) as reg:
        pusher = im.Pusher(reg.url, auth=("alice", password))
        pusher.image("private/img", "v1", im.image([base_layer("private")]))
        pusher.close()
        root = tmp_path / "repo"
        with RegistryClient(timeout=20, retries=0) as anon, Publisher(LocalBackend(root), anon) as pub:
            res = pub.publish_image(reg.ref("private/img", "v1"))
        assert not res.ok
        assert "private/img" in res.error and ("credential" in res.error.lower() or "auth" in res.error.lower())
        assert password not in res.error
        assert not (root / ".metadata").exists()

        cfg = tmp_path / "docker-config.json"
        token = base64.b64encode(f"alice:{password}".encode()).decode()
        cfg.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
        creds = CredentialStore.from_docker_config(str(cfg))
        with RegistryClient(credentials=creds, timeout=20, retries=0) as c, Publisher(LocalBackend(root), c) as pub:
            ok = pub.publish_image(reg.ref("private/img", "v1"))
        assert ok.ok, ok.error


def test_multiarch_tag_loses_a_platform(registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    amd = im.image([base_layer("ma-amd64")], architecture="amd64")
    arm = im.image([base_layer("ma-arm64")], architecture="arm64")
    pusher = im.Pusher(registry.url)
    pusher.multiarch("pub/shrink", "v1", [(amd, {"os": "linux", "architecture": "amd64"}),
                                          (arm, {"os": "linux", "architecture": "arm64"})])
    root = tmp_path / "repo"
    ref = registry.ref("pub/shrink", "v1")
    pub, _ = publisher(root, client)
    with pub:
        assert pub.publish_image(ref).ok
        layout = RepositoryLayout(root)
        assert layout.multiarch_link("arm64", registry.host, "pub/shrink", "v1").is_dir()
        pusher.multiarch("pub/shrink", "v1", [(amd, {"os": "linux", "architecture": "amd64"})])
        res = pub.publish_image(ref)
    assert res.ok and res.moved_from and res.platforms == ["amd64"]
    meta = layout.image_metadata_dir(registry.host, "pub/shrink", "v1")
    assert sorted(p.name for p in meta.iterdir() if p.is_dir()) == ["amd64"]
    assert not layout.multiarch_link("arm64", registry.host, "pub/shrink", "v1").is_symlink()
    scheduled = [e.config_digest for e in read_remove_schedule(root)]
    assert scheduled == [arm.config_digest]  # amd64 is still in use, only arm64 goes to GC
    assert check_invariants(root) == []


# -- flat trees from the published layer trees (one download per blob) ------------------------------------------
def rich_layers() -> list[im.BuiltLayer]:
    """Layers exercising what a flat must get right: owners, modes, times, hard links, symlinks, xattrs, devices,
    whiteouts, opaque directories, a directory replaced by a file and a file by a directory."""
    E = im.Entry
    bottom = im.layer([
        E("etc", type="dir", mode=0o755), ("etc/passwd", b"root:x:0:0\n"), ("etc/motd", b"bottom\n"),
        E("srv", type="dir", mode=0o750, uid=33, gid=33, mtime=1_600_000_000),
        E("srv/data.bin", data=bytes(range(256)) * 64, mode=0o640, uid=33, gid=33, mtime=1_600_000_001),
        E("srv/link-to-data", type="hardlink", linkname="srv/data.bin"),
        E("usr", type="dir"), E("usr/bin", type="dir"),
        E("usr/bin/tool", data=b"#!/bin/sh\n", mode=0o4755, pax={"SCHILY.xattr.user.origin": "bottom"}),
        E("usr/bin/alias", type="symlink", linkname="tool"),
        E("dev", type="dir"), E("dev/null", type="char", devmajor=1, devminor=3, mode=0o666),
        E("var", type="dir"), E("var/cache", type="dir"), ("var/cache/a", b"a"), ("var/cache/b", b"b"),
        E("opt", type="dir"), E("opt/was-dir", type="dir"), ("opt/was-dir/inner", b"x"), ("opt/was-file", b"f"),
        E("empty", type="dir", mode=0o700),
    ], codec="gzip")
    middle = im.layer([
        E("etc", type="dir"), E("etc/.wh.motd"), ("etc/hostname", b"middle\n"),
        E("var", type="dir"), E("var/cache", type="dir"), E("var/cache/.wh..wh..opq"), ("var/cache/c", b"c"),
        E("opt", type="dir"), E("opt/was-dir", data=b"now a file\n"),
        E("opt/was-file", type="dir", mode=0o711), ("opt/was-file/child", b"child"),
    ], codec="zstd")
    top = im.layer([
        E("usr", type="dir"), E("usr/bin", type="dir"), E("usr/bin/.wh.alias"),
        E("srv", type="dir", mode=0o750, uid=33, gid=33, mtime=1_600_000_000),
        E("srv/data.bin", data=b"replaced", mode=0o600, uid=33, gid=33),
    ], codec="plain")
    return [bottom, middle, top]


def test_flat_from_layer_trees_equals_flat_from_registry(
    registry: Registry, client: RegistryClient, tmp_path: Path
) -> None:
    img = im.image(rich_layers())
    im.push_image(registry.url, "pub/rich", "v1", img)
    flats = []
    for from_tree in (True, False):
        root = tmp_path / ("tree" if from_tree else "registry")
        pub, _ = publisher(root, client)
        pub.flat_from_tree = from_tree
        with pub:
            res = pub.publish_image(registry.ref("pub/rich", "v1"))
        assert res.ok, res.error
        flats.append(RepositoryLayout(root).flat_dir(img.config_digest))
    tree_flat, registry_flat = (listing(f, content="bytes", mtimes=NON_DIRS) for f in flats)
    # .cvmfscatalog is made when the flat is built: same (empty) content, its own mtime
    assert tree_flat.pop(".cvmfscatalog")["data"] == registry_flat.pop(".cvmfscatalog")["data"] == b""
    assert tree_flat == registry_flat
    # and the flat is what overlay semantics say, not just the same mistake twice
    assert "etc/motd" not in tree_flat and tree_flat["etc/hostname"]["data"] == b"middle\n"
    assert sorted(os.listdir(flats[0] / "var/cache")) == ["c"]
    assert (flats[0] / "opt/was-dir").read_bytes() == b"now a file\n"
    assert sorted(os.listdir(flats[0] / "opt/was-file")) == ["child"]
    assert "usr/bin/alias" not in tree_flat and (flats[0] / "srv/data.bin").read_bytes() == b"replaced"
    assert (flats[0] / "srv/link-to-data").read_bytes() == bytes(range(256)) * 64  # the old inode stays linked
    assert (flats[0] / "usr/bin/tool").stat().st_mode & 0o7777 == 0o755  # flats carry no set-id (issue 7.2)
    assert RepositoryLayout(tmp_path / "tree").layerfs(img.layers[0].digest).joinpath(
        "usr/bin/tool").stat().st_mode & 0o7777 == 0o4755  # the layer tree keeps it, as containerd
    assert not any(".wh." in p or ".cvmfscatalog" in p for p in tree_flat)
    assert tree_flat["usr/bin/tool"]["xattrs"] == {"user.origin": b"bottom".hex()}


def test_publish_fetches_each_blob_once(fresh_registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    layers = rich_layers()
    img = im.image(layers)
    im.push_image(fresh_registry.url, "once/rich", "v1", img)
    root = tmp_path / "repo"
    pub, _ = publisher(root, client)
    with pub:
        res = pub.publish_image(fresh_registry.ref("once/rich", "v1"))
        assert res.ok, res.error
        gets = settled_blob_gets(fresh_registry.log, len(layers) + 1)
        assert gets == Counter({**{lay.digest: 1 for lay in layers}, img.config_digest: 1})

        # a second image on top of the same layers: only its new layer and config are fetched
        extra = im.layer([("extra.txt", b"extra\n")], codec="gzip")
        img2 = im.image([*layers, extra])
        im.push_image(fresh_registry.url, "once/more", "v1", img2)
        res2 = pub.publish_image(fresh_registry.ref("once/more", "v1"))
        assert res2.ok and res2.layers_skipped == len(layers) and res2.layers_published == 1, res2
        gets = settled_blob_gets(fresh_registry.log, len(layers) + 3)
    assert gets == Counter({**{lay.digest: 1 for lay in layers}, img.config_digest: 1,
                            extra.digest: 1, img2.config_digest: 1})
    flat2 = RepositoryLayout(root).flat_dir(img2.config_digest)
    assert (flat2 / "extra.txt").read_bytes() == b"extra\n" and not (flat2 / "etc/motd").exists()
    assert check_invariants(root) == []



class VanishingTreeBackend(LocalBackend):
    """The real local backend, but the published trees it offers for flats are gone when they are read."""

    def layer_tree(self, digest: str) -> Path | None:
        tree = super().layer_tree(digest)
        return None if tree is None else tree.with_name("vanished")


def test_flat_falls_back_to_registry_when_a_tree_cannot_be_read(
    fresh_registry: Registry, client: RegistryClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, top = base_layer("vanish"), top_layer("gzip")
    img = im.image([base, top])
    im.push_image(fresh_registry.url, "once/vanish", "v1", img)
    root = tmp_path / "repo"
    with Publisher(VanishingTreeBackend(root), client) as pub:
        res = pub.publish_image(fresh_registry.ref("once/vanish", "v1"))
    assert res.ok, res.error
    assert "fetching its layers from the registry instead" in caplog.text and "vanished" in caplog.text
    flat = RepositoryLayout(root).flat_dir(img.config_digest)
    assert (flat / "opt/app/new.txt").read_bytes() == b"new\n" and not (flat / "etc/motd").exists()
    gets = settled_blob_gets(fresh_registry.log, 5)
    assert gets[base.digest] == gets[top.digest] == 2  # once for the layers, once for the rebuilt flat
    assert check_invariants(root) == [] and os.listdir(root / STAGING_DIR) == []


class HeldTopBackend(LocalBackend):
    """The real local backend; the top layer is held until the flat has read the bottom layer's tree (or 15 s),
    then published or, with ``fail_top``, failed."""

    def __init__(self, root: Path, base: str, top: str, fail_top: bool = False) -> None:
        super().__init__(root)
        self.base, self.top, self.fail_top = base, top, fail_top
        self.base_read = threading.Event()
        self.flat_began_first: bool | None = None

    def layer_tree(self, digest: str) -> Path | None:
        if digest == self.base:
            self.base_read.set()
        return super().layer_tree(digest)

    def publish_layer(self, info: LayerInfo, tar_stream: TarStream) -> LayerRecord:
        if info.digest == self.top:
            self.flat_began_first = self.base_read.wait(15)
            if self.fail_top:
                raise UnsafeLayerError(f"layer {info.digest}: refused by the test")
        return super().publish_layer(info, tar_stream)


@pytest.mark.parametrize("fail_top", [False, True])
def test_flat_is_built_while_later_layers_are_published(
    registry: Registry, client: RegistryClient, tmp_path: Path, fail_top: bool
) -> None:
    base, top = base_layer(f"pipelined{fail_top}"), top_layer("gzip")
    img = im.image([base, top])
    im.push_image(registry.url, "pub/pipelined", f"v{int(fail_top)}", img)
    root = tmp_path / "repo"
    be = HeldTopBackend(root, base.digest, top.digest, fail_top)
    with Publisher(be, client, concurrency=2) as pub:
        res = pub.publish_image(registry.ref("pub/pipelined", f"v{int(fail_top)}"))
    # the flat applied the bottom layer while the top one was still being published
    assert be.flat_began_first is True
    layout = RepositoryLayout(root)
    flat = layout.flat_dir(img.config_digest)
    if fail_top:  # the failed layer aborts the flat: nothing of it is visible, no staging left
        assert not res.ok and "refused by the test" in res.error
        assert not flat.exists() and not layout.public_link(registry.host, "pub/pipelined", "v1").exists()
    else:
        assert res.ok, res.error
        assert (flat / "opt/app/new.txt").read_bytes() == b"new\n" and not (flat / "etc/motd").exists()
    assert check_invariants(root) == [] and os.listdir(root / STAGING_DIR) == []


# -- the GC lock ---------------------------------------------------------------------------------------------------
class HoldingProgress:
    """A progress sink that holds the first layer until released, to look at a publish from outside."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def layer_started(self, digest: str, size: int) -> None:
        self.started.set()
        assert self.release.wait(60)

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        pass

    def layer_finished(self, digest: str, ok: bool) -> None:
        pass

    def image_finished(self, result: object) -> None:
        pass


def test_publish_holds_the_gc_lock_shared(registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from cvmfs_snap.errors import UnavailableError
    from publisher.config import PublisherConfig
    from publisher.locks import gc_lock

    im.push_image(registry.url, "pub/gclock", "v1", im.image([base_layer("gclock")]))
    im.push_image(registry.url, "pub/gclock", "v2", im.image([base_layer("gclock2")]))
    root = tmp_path / "repo"
    config = PublisherConfig(root=str(root), insecure_registries=[registry.host])
    progress = HoldingProgress()
    with make_publisher(config, progress=progress) as pub, ThreadPoolExecutor(1) as ex:
        state = config.effective_state_dir()
        assert pub.state_dir == state  # `convert` and `convert-single-image` go through from_config
        fut = ex.submit(pub.publish_image, registry.ref("pub/gclock", "v1"))
        try:
            assert progress.started.wait(60)
            with pytest.raises(UnavailableError, match="publishing is running"), \
                    gc_lock(state, exclusive=True, timeout=0.3):
                pass
            with gc_lock(state, exclusive=False, timeout=1):  # the daemon's own shared lock coexists
                pass
        finally:
            progress.release.set()
        assert fut.result(60).ok
    # released once the image is done; and while GC holds it, a publish waits for it, then fails saying why
    with gc_lock(state, exclusive=True, timeout=5), make_publisher(config) as pub2:
        pub2.gc_lock_timeout = 0.5
        res = pub2.publish_image(registry.ref("pub/gclock", "v2"))
    assert not res.ok and "garbage collection is running" in res.error
    assert not RepositoryLayout(root).image_metadata_dir(registry.host, "pub/gclock", "v2").exists()
