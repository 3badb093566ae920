"""Hostile and cheap inputs against the publisher (issue 7: items 2, 3, 11, 16, 17), on a real loopback registry.

Device nodes and set-id files must not become usable by other local users, configured ``Limits`` reach every
unpack, deep trees never hit a recursion limit, an adopted layer never records what the next image claims, sparse
files stay sparse, bombs and huge manifests are refused early, and disk-full says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_snap.fsutil import make_deep_tree, remove_tree
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layout import LayerRecord, RepositoryLayout
from cvmfs_snap.oci import RegistryClient
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry
from publisher.backends.base import LayerInfo, TarStream
from publisher.backends.local import STAGING_DIR, LocalBackend
from publisher.config import PublisherConfig
from publisher.factory import make_publisher
from publisher.pipeline import Publisher
from tests.support.bombs import SPARSE_SIZE, sparse_layer, zstd_bomb
from tests.support.publisher_env import base_layer

E = im.Entry
REPO_ROOT = Path(__file__).resolve().parents[1]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def _publish(root: Path, client: RegistryClient, ref: str, limits: Limits | None = None, **kw: object) -> object:
    with Publisher(LocalBackend(root, limits=limits), client, **kw) as pub:  # type: ignore[arg-type]
        return pub.publish_image(ref)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "publisher.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def _with_diff_ids(img: im.BuiltImage, diff_ids: list[str]) -> im.BuiltImage:
    """The same image with its config claiming ``diff_ids`` (a lying or hostile image)."""
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"] = diff_ids
    config = json.dumps(cfg, sort_keys=True).encode()
    manifest = json.loads(img.manifest)
    manifest["config"] = {**manifest["config"], "digest": im.sha256(config), "size": len(config)}
    return im.BuiltImage(img.layers, config, json.dumps(manifest, sort_keys=True).encode(), img.manifest_media_type)


def _as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          check=False, cwd="/")


def _exec_as_nobody(binary: Path) -> subprocess.CompletedProcess[str]:
    """``binary -u`` exec'd by a shell running as nobody (setpriv itself may exec what root could reach)."""
    return subprocess.run([*NOBODY, "/bin/sh", "-c", '"$0" -u', str(binary)], capture_output=True, text=True,
                          timeout=60, check=False, cwd="/")


_PROBE = """
import errno, sys
for p in sys.argv[1:]:
    try:
        open(p, "r+b").close()
        print(p, "OPENED")
    except OSError as e:
        print(p, errno.errorcode[e.errno])
"""


# -- item 2: device nodes and set-id files -------------------------------------------------------------------------
def test_devices_and_setuid_root_are_not_usable_by_other_users(registry: Registry, client: RegistryClient,
                                                               short_tmp: Path) -> None:
    os.chmod(short_tmp, 0o755)  # every user may traverse it (tmp_path is 0700, which would hide everything)
    open_dir = short_tmp
    id_binary = Path(shutil.which("id") or "/usr/bin/id").read_bytes()
    lay = im.layer([
        E("dev", type="dir"), E("dev/disk", type="block", devmajor=7, devminor=0, mode=0o666),
        E("dev/mem", type="char", devmajor=1, devminor=1, mode=0o666),
        E("bin", type="dir"), E("bin/id", data=id_binary, mode=0o4755, uid=0, gid=0),
        E("bin/sgid", data=b"#!/bin/sh\n", mode=0o2755, uid=0, gid=0),
        E("etc", type="dir"), ("etc/hello", b"hello\n"),
    ])
    img = im.image([lay])
    im.push_image(registry.url, "limits/devices", "v1", img)
    root = open_dir / "repo"
    res = _publish(root, client, registry.ref("limits/devices", "v1"))
    assert res.ok, res.error  # type: ignore[attr-defined]
    layout = RepositoryLayout(root)
    lfs, flat = layout.layerfs(lay.digest), layout.flat_dir(img.config_digest)

    # the layer tree keeps what a container must see (as containerd's unpack), where only root can reach it
    st = os.lstat(lfs / "dev/disk")
    assert stat.S_ISBLK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666 and st.st_rdev == os.makedev(7, 0)
    assert stat.S_IMODE(os.lstat(lfs / "bin/id").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(layout.layers_root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / STAGING_DIR).st_mode) == 0o700
    # the flat tree (what users run, world-readable) carries no device and no set-id bit
    assert not (flat / "dev/disk").exists() and not (flat / "dev/mem").exists() and (flat / "dev").is_dir()
    assert stat.S_IMODE(os.lstat(flat / "bin/id").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(flat / "bin/sgid").st_mode) == 0o755

    # as an unprivileged user: the published tree is readable (so the probe can see it) ...
    ok = _as_nobody("import sys; print(open(sys.argv[1]).read(), end='')", str(flat / "etc/hello"))
    assert ok.returncode == 0 and ok.stdout == "hello\n", ok.stderr
    # ... but no device opens and no binary runs as root, through either tree
    probe = _as_nobody(_PROBE, *(str(t / d) for t in (lfs, flat) for d in ("dev/disk", "dev/mem")))
    assert probe.returncode == 0, probe.stderr
    assert "OPENED" not in probe.stdout
    assert probe.stdout.split() == [str(lfs / "dev/disk"), "EACCES", str(lfs / "dev/mem"), "EACCES",
                                    str(flat / "dev/disk"), "ENOENT", str(flat / "dev/mem"), "ENOENT"]
    via_flat = _exec_as_nobody(flat / "bin/id")
    assert via_flat.returncode == 0 and via_flat.stdout.strip() == "65534", via_flat
    via_layer = _exec_as_nobody(lfs / "bin/id")
    assert via_layer.returncode != 0 and "Permission denied" in via_layer.stderr, via_layer

    # a repository left open by an older version is tightened when the publisher starts
    os.chmod(layout.layers_root, 0o755)
    os.chmod(root / STAGING_DIR, 0o755)
    LocalBackend(root).recover()
    assert stat.S_IMODE(os.stat(layout.layers_root).st_mode) == 0o700
    LocalBackend(root).staging.new()
    assert stat.S_IMODE(os.stat(root / STAGING_DIR).st_mode) == 0o700


def test_configured_limits_refuse_device_nodes(registry: Registry, tmp_path: Path) -> None:
    """A site refuses device nodes in its publisher configuration; the setting reaches the unpacker."""
    lay = im.layer([E("dev", type="dir"), E("dev/null", type="char", devmajor=1, devminor=3, mode=0o666)])
    im.push_image(registry.url, "limits/nodev", "v1", im.image([lay]))
    conf = tmp_path / "publisher.yaml"
    conf.write_text("limits:\n  allow_devices: false\n")
    cfg = PublisherConfig.load(conf)
    assert cfg.limits.allow_devices is False
    cfg.root, cfg.state_dir = str(tmp_path / "repo"), str(tmp_path / "state")
    with make_publisher(cfg) as pub:
        assert pub.backend.limits.allow_devices is False
        res = pub.publish_image(registry.ref("limits/nodev", "v1"))
    assert not res.ok and "allow_devices" in res.error
    assert not RepositoryLayout(tmp_path / "repo").layer_dir(lay.digest).exists()


@pytest.mark.parametrize("backend", ["cvmfs-ingest", "cvmfs-transaction"])
def test_cvmfs_backends_use_the_configured_limits(registry: Registry, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    from tests.support.publisher_env import make_fake_cvmfs

    fake = make_fake_cvmfs(tmp_path)
    fake.apply_env(monkeypatch)
    lay = im.layer([E("dev", type="dir"), E("dev/sda", type="block", devmajor=8, devminor=0, mode=0o666)])
    im.push_image(registry.url, f"limits/nodev-{backend}", "v1", im.image([lay]))
    state = tmp_path / "publisher-state"
    cfg = PublisherConfig(backend=backend, root=str(fake.root), repo=fake.repo, cvmfs_server=fake.exe,
                          state_dir=str(state), limits=Limits(allow_devices=False))
    with make_publisher(cfg) as pub:
        res = pub.publish_image(registry.ref(f"limits/nodev-{backend}", "v1"))
    assert not res.ok and "allow_devices" in res.error
    assert not any(c[0] == "ingest" for c in fake.commands())
    assert not RepositoryLayout(fake.root).layerfs(lay.digest).exists()
    assert stat.S_IMODE(os.stat(state / "staging").st_mode) == 0o700


@pytest.mark.parametrize(("text", "needle"), [
    ("limits: 3\n", "limits: expected a mapping, got 3"),
    ("limits:\n  max_depht: 3\n", "limits.max_depht: unknown setting; known here: allow_devices, max_depth"),
    ("limits:\n  max_depth: 0\n", "limits.max_depth: expected an integer >= 1, got 0"),
    ("limits:\n  max_depth: null\n", "limits.max_depth: expected an integer >= 1, got None"),
    ("limits:\n  max_total_size: 0\n", "limits.max_total_size: expected an integer >= 1 or null, got 0"),
    ("limits:\n  allow_devices: 'no'\n", "limits.allow_devices: expected true or false, got 'no'"),
])
def test_bad_limits_in_the_configuration(tmp_path: Path, text: str, needle: str) -> None:
    from cvmfs_snap.errors import InvalidInputError

    conf = tmp_path / "p.yaml"
    conf.write_text(text)
    with pytest.raises(InvalidInputError, match=re.escape(needle)):
        PublisherConfig.load(conf)


# -- item 3: adopted layers -----------------------------------------------------------------------------------------
def test_adopted_layer_records_only_what_was_verified(registry: Registry, client: RegistryClient,
                                                      tmp_path: Path) -> None:
    lay = base_layer("adopt")
    honest = im.image([lay])
    im.push_image(registry.url, "limits/honest", "v1", honest)
    root = tmp_path / "repo"
    assert _publish(root, client, registry.ref("limits/honest", "v1"), skip_flat=True).ok  # type: ignore[attr-defined]
    layout = RepositoryLayout(root)
    # make it look DUCC-made: layerfs and DUCC's layers.json, no layer.json of ours
    layout.layer_json(lay.digest).unlink()
    ducc = json.loads(layout.layers_json(lay.digest).read_text())
    assert ducc[0]["diff-digest"] == lay.diff_id

    liar = _with_diff_ids(honest, ["sha256:" + "0" * 64])
    im.push_image(registry.url, "limits/liar", "v1", liar)
    res = _publish(root, client, registry.ref("limits/liar", "v1"), skip_flat=True)
    assert res.ok, res.error  # type: ignore[attr-defined]
    rec = layout.read_layer_record(lay.digest)
    assert rec is not None and rec.diff_id == lay.diff_id  # DUCC's verified record, not the image's claim
    assert rec.compressed_size == len(lay.blob)

    # without any record of its own, nothing the image claims is written
    layout.layer_json(lay.digest).unlink()
    layout.layers_json(lay.digest).unlink()
    im.push_image(registry.url, "limits/liar", "v2", _with_diff_ids(honest, ["sha256:" + "1" * 64]))
    res = _publish(root, client, registry.ref("limits/liar", "v2"), skip_flat=True)
    assert res.ok, res.error  # type: ignore[attr-defined]
    rec = layout.read_layer_record(lay.digest)
    assert rec is not None and rec.diff_id == "" and rec.media_type == "" and rec.compressed_size == 0
    assert "1" * 64 not in layout.layers_json(lay.digest).read_text()

    # a diffID that is no digest at all fails the image before anything is written
    layout.layer_json(lay.digest).unlink()
    im.push_image(registry.url, "limits/liar", "v3", _with_diff_ids(honest, ["../../x"]))
    res = _publish(root, client, registry.ref("limits/liar", "v3"), skip_flat=True)
    assert not res.ok and "not a sha256 digest" in res.error  # type: ignore[attr-defined]
    assert not layout.layer_json(lay.digest).exists()
    assert not layout.image_metadata_dir(registry.host, "limits/liar", "v3").exists()
    assert "../../x" not in "".join(p.read_text() for p in root.rglob("*.json"))


# -- item 11: deep trees ----------------------------------------------------------------------------------------------
DEPTH = 5000


def _deep_layer(depth: int) -> im.BuiltLayer:
    """One file ``depth`` directories down (the unpacker makes the parents)."""
    return im.layer([("/".join(["d"] * depth) + "/leaf", b"deep\n")])


def test_recovery_removes_a_5000_level_staging_dir_of_a_killed_run(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    backend = LocalBackend(root)
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = root / STAGING_DIR / f"{dead.pid}-abandoned"
    make_deep_tree(left, DEPTH)
    backend.recover()
    assert not left.exists()


def test_hostile_5000_deep_layer_fails_cleanly_and_convert_still_works(registry: Registry, client: RegistryClient,
                                                                      tmp_path: Path) -> None:
    deep = _deep_layer(DEPTH)
    liar = _with_diff_ids(im.image([deep]), ["sha256:" + "2" * 64])
    im.push_image(registry.url, "limits/deep", "v1", liar)
    root = tmp_path / "repo"
    # default limits: refused (by path length here, by depth below), and the partial tree is gone
    res = _publish(root, client, registry.ref("limits/deep", "v1"))
    assert not res.ok and "Limits.max_path_len" in res.error  # type: ignore[attr-defined]
    assert os.listdir(root / STAGING_DIR) == []
    im.push_image(registry.url, "limits/deep", "v600", im.image([_deep_layer(600)]))
    res = _publish(root, client, registry.ref("limits/deep", "v600"))
    assert not res.ok and "601 levels deep" in res.error and "Limits.max_depth" in res.error  # type: ignore[attr-defined]
    assert os.listdir(root / STAGING_DIR) == []
    # limits raised so the whole tree unpacks: then the wrong diffID fails it, still nothing left behind
    wide = Limits(max_depth=DEPTH + 10, max_path_len=4 * DEPTH)
    res = _publish(root, client, registry.ref("limits/deep", "v1"), limits=wide)
    assert not res.ok and "announces diffID" in res.error  # type: ignore[attr-defined]
    assert os.listdir(root / STAGING_DIR) == []
    assert not RepositoryLayout(root).layer_dir(deep.digest).exists()

    # and the next convert (recovery at start included) publishes a healthy image
    im.push_image(registry.url, "limits/after-deep", "v1", im.image([base_layer("after-deep")]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"version: 1\ninput: ['http://{registry.host}/limits/after-deep:v1']\n")
    r = _cli("convert", str(recipe), "--root", str(root))
    assert r.returncode == 0, r.stderr


def test_gc_collects_a_5000_level_layer_and_flat(registry: Registry, client: RegistryClient,
                                                 tmp_path: Path) -> None:
    from publisher.gc import collect_garbage

    deep = _deep_layer(DEPTH)
    img = im.image([deep])
    im.push_image(registry.url, "limits/deep-gc", "v1", img)
    root, state = tmp_path / "repo", tmp_path / "state"
    wide = Limits(max_depth=DEPTH + 10, max_path_len=4 * DEPTH)
    with Publisher(LocalBackend(root, state, limits=wide), client, state_dir=state, skip_flat=True) as pub:
        res = pub.publish_image(registry.ref("limits/deep-gc", "v1"))
        assert res.ok, res.error
        layout = pub.layout
        # a flat as deep (merged-mode unpacking of such a tree is slow, so it is made directly)
        flat = layout.flat_dir(img.config_digest)
        make_deep_tree(flat, DEPTH)
        remove_tree(layout.image_metadata_dir(registry.host, "limits/deep-gc", "v1"))
        plan = collect_garbage(pub.backend, state, 0, dry_run=False, now=9e9)
    sizes = {i.kind: i.size for i in plan.items}
    assert set(sizes) == {"layer", "flat"} and sizes["flat"] == 1  # the leaf, 5,000 levels down, was counted
    assert sizes["layer"] > 5
    assert not layout.layer_dir(deep.digest).exists() and not flat.exists()


# -- item 16: cheap inputs --------------------------------------------------------------------------------------------
HUGE = SPARSE_SIZE


def test_sparse_file_stays_sparse_end_to_end(registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    from publisher.layertree import open_layer_tree

    lay = sparse_layer(tmp_path)
    assert len(lay.blob) < 4096
    img = im.image([lay])
    im.push_image(registry.url, "limits/sparse", "v1", img)
    root = tmp_path / "repo"
    res = _publish(root, client, registry.ref("limits/sparse", "v1"))
    assert res.ok, res.error  # type: ignore[attr-defined]
    layout = RepositoryLayout(root)
    for tree in (layout.layerfs(lay.digest), layout.flat_dir(img.config_digest)):
        st = os.stat(tree / "data/huge.img")
        assert st.st_size == HUGE and st.st_blocks * 512 < 1 << 20, tree
        with open(tree / "data/huge.img", "rb") as f:
            f.seek(HUGE // 2 - 1)
            assert f.read(103) == b"\0" + b"x" * 101 + b"\0"
    # the copy between trees skips the holes: the layer tree's entry is a sparse one whose data is the 101 bytes
    # (in a 4 KiB block or two), not 100 GiB of zeros
    with open_layer_tree(layout.layerfs(lay.digest)) as entries:
        (huge,) = [e for e in entries if e.path == "data/huge.img"]
        assert huge.size == HUGE and huge.sparse is not None, "the layer tree is read without seeking holes"
        assert 101 <= sum(n for _off, n in huge.sparse) <= 8192


def test_zstd_bomb_is_refused_by_the_expansion_limits(registry: Registry, client: RegistryClient,
                                                      tmp_path: Path) -> None:
    bomb = zstd_bomb(20 << 30)
    assert len(bomb.blob) < 1 << 20  # about 655 KB
    img = im.image([bomb])
    im.push_image(registry.url, "limits/bomb", "v1", img)
    root = tmp_path / "repo"
    # the default ratio limit stops it after a little more than 1 GiB of output
    res = _publish(root, client, registry.ref("limits/bomb", "v1"))
    assert not res.ok and "Limits.max_expansion_ratio" in res.error  # type: ignore[attr-defined]
    # a site that turns the ratio off still has its expanded-size limit
    lim = Limits(max_expansion_ratio=None, max_expanded_size=256 << 20)
    res = _publish(root, client, registry.ref("limits/bomb", "v1"), limits=lim)
    assert not res.ok and "Limits.max_expanded_size" in res.error  # type: ignore[attr-defined]
    assert not RepositoryLayout(root).layer_dir(bomb.digest).exists()
    assert os.listdir(root / STAGING_DIR) == []


def test_too_many_layers_or_platforms_are_refused(registry: Registry, client: RegistryClient,
                                                  tmp_path: Path) -> None:
    lay = base_layer("many")
    one = im.image([lay])
    many = json.loads(one.manifest)
    many["layers"] = many["layers"] * 10_000
    p = im.Pusher(registry.url)
    try:
        p.image("limits/many", "one", one)
        body = json.dumps(many).encode()
        p.manifest("limits/many", "layers", body, one.manifest_media_type)
        entry = {"mediaType": one.manifest_media_type, "digest": one.manifest_digest, "size": len(one.manifest)}
        idx = {"schemaVersion": 2, "mediaType": im.OCI_INDEX,
               "manifests": [{**entry, "platform": {"os": "linux", "architecture": f"arch{i}"}} for i in range(3000)]}
        p.manifest("limits/many", "platforms", json.dumps(idx).encode(), im.OCI_INDEX)
    finally:
        p.close()
    root = tmp_path / "repo"
    res = _publish(root, client, registry.ref("limits/many", "layers"))
    assert not res.ok and "10000 layers" in res.error and "max_layers_per_image" in res.error  # type: ignore[attr-defined]
    res = _publish(root, client, registry.ref("limits/many", "platforms"))
    assert not res.ok and "3000 manifests" in res.error  # type: ignore[attr-defined]
    assert "max_platforms_per_index" in res.error  # type: ignore[attr-defined]
    assert not (root / ".layers").exists() or not any((root / ".layers").iterdir())


# -- item 17: disk full -----------------------------------------------------------------------------------------------
class _FillAfterLayers(LocalBackend):
    """The real local backend, on a tiny tmpfs that is filled up right after the layers are published."""

    def publish_layer(self, info: LayerInfo, tar_stream: TarStream) -> LayerRecord:
        rec = super().publish_layer(info, tar_stream)
        with open(self.root / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        return rec


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_while_writing_metadata_says_so(registry: Registry, client: RegistryClient, small_fs: Path) -> None:
    im.push_image(registry.url, "limits/full", "v1", im.image([base_layer("full")]))
    root = small_fs / "repo"
    with Publisher(_FillAfterLayers(root, small_fs / "state"), client, skip_flat=True) as pub:
        res = pub.publish_image(registry.ref("limits/full", "v1"))
    assert not res.ok
    assert "disk full" in res.error and "unexpected error" not in res.error
    assert str(root) in res.error
    meta = RepositoryLayout(root).image_metadata_dir(registry.host, "limits/full", "v1")
    assert not (meta / "image.json").exists()


def test_layer_stream_limits_unit() -> None:
    """open_layer applies the expansion limits itself (the pipeline passes its Limits)."""
    from cvmfs_snap.errors import UnsafeLayerError
    from cvmfs_snap.layer import open_layer

    tar = im.make_tar([("a", bytes(1 << 20))])
    blob = im.compress(tar, "gzip")
    with pytest.raises(UnsafeLayerError, match="max_expanded_size"), \
            open_layer(io.BytesIO(blob), im.OCI_LAYER_GZIP, limits=Limits(max_expanded_size=1 << 19)) as s:
        s.drain()
    with open_layer(io.BytesIO(blob), im.OCI_LAYER_GZIP, limits=Limits()) as s:
        assert s.drain() == len(tar)


def test_a_layer_deleting_a_5000_level_directory_of_a_lower_one(tmp_path: Path) -> None:
    """Merged mode (flat trees): a whiteout or a replacing entry removes a 5,000-level tree without recursion."""
    from cvmfs_snap.layer import apply_layer

    wide = Limits(max_depth=DEPTH + 10, max_path_len=4 * DEPTH)
    target = tmp_path / "flat"
    target.mkdir()
    for name in ("a", "b"):
        apply_layer(io.BytesIO(im.make_tar([(f"{name}/" + "/".join(["d"] * DEPTH) + "/leaf", b"x")])), target,
                    mode="merged", limits=wide)
    apply_layer(io.BytesIO(im.make_tar([E(".wh.a"), ("b", b"now a file\n")])), target, mode="merged", limits=wide)
    assert sorted(os.listdir(target)) == ["b"] and (target / "b").read_bytes() == b"now a file\n"


def test_flat_trees_carry_no_privilege_of_any_kind(tmp_path: Path) -> None:
    """Flat trees: devices out (and hard links to them), setuid/setgid and file capabilities off on files (also
    when set through a hard link), everything else (FIFOs, dir setgid, other xattrs, mtimes) kept."""
    import struct

    from cvmfs_snap.layer.paths import CAPABILITY_XATTR
    from publisher.backends.flatdir import build_flat_dir

    cap = {f"SCHILY.xattr.{CAPABILITY_XATTR}": struct.pack("<IIIII", 0x02000001, 1 << 7, 0, 0, 0).decode("latin-1"),
           "SCHILY.xattr.user.keep": "yes"}  # cap_setuid+ep
    lower = im.make_tar([
        E("bin", type="dir"), E("shared", type="dir", mode=0o2775),
        E("bin/ping", data=b"\x7fELF", mode=0o755, pax=cap),
        E("bin/su", data=b"\x7fELF", mode=0o6755, mtime=1_600_000_000),
        E("bin/plain", data=b"\x7fELF", mode=0o755),
        E("sda", type="block", devmajor=8, devminor=0, mode=0o666),
        E("null", type="char", devmajor=1, devminor=3, mode=0o666),
        E("null-again", type="hardlink", linkname="null"),
        E("fifo", type="fifo", mode=0o644),
    ])
    upper = im.make_tar([E("bin/plain-suid", type="hardlink", linkname="bin/plain", mode=0o4755),
                         E("sda", data=b"now a file\n"), E("sda-link", type="hardlink", linkname="sda")])
    flat = tmp_path / "flat"
    done = build_flat_dir(flat, [lambda t=t: contextlib.nullcontext(io.BytesIO(t)) for t in (lower, upper)])
    assert (done.devices, done.files) == (2, 3)
    assert sorted(os.listdir(flat)) == [".cvmfscatalog", "bin", "fifo", "sda", "sda-link", "shared"]
    assert stat.S_ISFIFO(os.lstat(flat / "fifo").st_mode) and (flat / "sda-link").read_bytes() == b"now a file\n"
    caps = flat / "bin/ping"
    assert CAPABILITY_XATTR not in os.listxattr(caps) and os.getxattr(caps, "user.keep") == b"yes"
    assert stat.S_IMODE(caps.stat().st_mode) == 0o755
    suid = flat / "bin/su"
    assert stat.S_IMODE(suid.stat().st_mode) == 0o755 and suid.stat().st_mtime_ns == 1_600_000_000_000_000_000
    assert stat.S_IMODE((flat / "bin/plain").stat().st_mode) == 0o755  # the hard link's set-id mode went too
    assert stat.S_IMODE((flat / "shared").stat().st_mode) == 0o2775


def test_whiteout_scan_of_a_5000_level_tree(tmp_path: Path) -> None:
    """The scan that indexes DUCC-made layers (adoption here, masks on nodes) is fd-relative: no depth or PATH_MAX
    limit, AUFS metadata hidden and not looked into."""
    from cvmfs_snap.layer import scan_tree_whiteouts

    make_deep_tree(tmp_path / "lfs", DEPTH)
    fd = os.open(tmp_path / "lfs", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        for name in (".wh.gone", ".wh..wh..opq"):
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    (tmp_path / "lfs/.wh..wh.plnk/x").mkdir(parents=True)
    (tmp_path / "lfs/.wh..wh.plnk/x/.wh.not-a-whiteout").touch()
    idx = scan_tree_whiteouts(tmp_path / "lfs")
    deep = "/".join(["d"] * DEPTH)
    assert idx.whiteouts == [f"{deep}/gone"] and idx.opaque_dirs == [deep] and idx.hidden == [".wh..wh.plnk"]
    remove_tree(tmp_path / "lfs")
