"""The cvmfs-ingest and cvmfs-transaction backends, driving the recording cvmfs_server stand-in."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_snap.layout import RepositoryLayout
from cvmfs_snap.oci import RegistryClient
from publisher.config import PublisherConfig
from publisher.pipeline import Publisher
from tests.support import images as im
from tests.support.blobcount import settled_blob_gets
from tests.support.publisher_env import FakeCvmfs, base_layer, check_invariants, make_fake_cvmfs, top_layer
from tests.support.registry import Registry


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCvmfs:
    f = make_fake_cvmfs(tmp_path)
    f.apply_env(monkeypatch)
    return f


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    with RegistryClient(timeout=20, retries=1) as c:
        yield c


def make_publisher(fake: FakeCvmfs, client: RegistryClient, backend: str, **extra: object) -> Publisher:
    cfg = PublisherConfig(backend=backend, root=str(fake.root), repo=fake.repo, cvmfs_server=fake.exe,
                          state_dir=str(fake.state.parent / "publisher-state"), concurrency=1, **extra)  # type: ignore[arg-type]
    backend_obj = cfg.make_backend()
    backend_obj.recover()
    return Publisher(backend_obj, client, concurrency=cfg.concurrency, skip_flat=cfg.skip_flat)


def _rel_layerfs(layer: im.BuiltLayer) -> str:
    h = layer.digest.split(":")[1]
    return f".layers/{h[:2]}/{h}/layerfs"


def test_ingest_backend_command_lines(registry: Registry, client: RegistryClient, fake: FakeCvmfs) -> None:
    base, top = base_layer("ingest"), top_layer("gzip")
    img = im.image([base, top])
    im.push_image(registry.url, "cvmfs/ingest", "v1", img)
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        res = pub.publish_image(registry.ref("cvmfs/ingest", "v1"))
    assert res.ok, res.error
    repo = fake.repo
    log = fake.log()
    cmds = [e["argv"] for e in log]
    layer_cmds = []
    for lay in (base, top):
        layer_cmds += [
            ["transaction", repo], ["publish", repo],
            ["ingest", "--catalog", "-k", "-t", "-", "-b", _rel_layerfs(lay), repo],
            ["transaction", repo], ["publish", repo],
        ]
    # concurrency 1: the layers in manifest order, then the flat tree, then the image metadata
    assert cmds == layer_cmds + [["transaction", repo], ["publish", repo]] * 2
    ingests = [e for e in log if e["argv"][0] == "ingest"]
    assert [e["stdin_bytes"] for e in ingests] == [len(base.tar), len(top.tar)]  # the whole tar on stdin
    assert all(e["status"] == 0 for e in log)
    assert fake.violations() == ""  # nothing was written outside a transaction

    layout = RepositoryLayout(fake.root)
    lfs = layout.layerfs(top.digest)
    assert (lfs / "etc/.wh.motd").is_file() and (lfs / "opt/app/.wh..wh..opq").is_file()
    assert (lfs / ".cvmfscatalog").is_file()
    assert (layout.layerfs(base.digest) / "bin/tool").stat().st_uid == 1000  # -k kept ownership
    # parents were made in a transaction first: owned by root, not by the 'unknown' user
    assert layout.layer_dir(top.digest).stat().st_uid == 0
    assert layout.layer_bucket(top.digest).stat().st_uid == 0
    rec = layout.read_layer_record(top.digest)
    assert rec is not None and rec.whiteouts == ["etc/motd"] and rec.opaque_dirs == ["opt/app"]
    assert rec.diff_id == top.diff_id
    flat = layout.public_link(registry.host, "cvmfs/ingest", "v1")
    assert sorted(os.listdir(flat / "opt/app")) == ["new.txt"]
    assert check_invariants(fake.root) == []


def test_ingest_failure_deletes_and_fails(
    registry: Registry, client: RegistryClient, fake: FakeCvmfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = base_layer("ingest-fail")
    im.push_image(registry.url, "cvmfs/ingest-fail", "v1", im.image([lay]))
    fake.apply_env(monkeypatch, fail="ingest")
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        res = pub.publish_image(registry.ref("cvmfs/ingest-fail", "v1"))
    assert not res.ok
    assert "ingest" in res.error and "exit status 1" in res.error and lay.digest in res.error
    cmds = fake.commands()
    i = cmds.index(["ingest", "--catalog", "-k", "-t", "-", "-b", _rel_layerfs(lay), fake.repo])
    assert cmds[i + 1] == ["ingest", "-d", _rel_layerfs(lay), fake.repo]
    assert len(cmds) == i + 2  # no metadata, no image
    layout = RepositoryLayout(fake.root)
    assert not layout.layerfs(lay.digest).exists()
    assert not layout.metadata_root.exists()
    assert check_invariants(fake.root) == []


def test_publish_failure_aborts(
    registry: Registry, client: RegistryClient, fake: FakeCvmfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = base_layer("publish-fail")
    im.push_image(registry.url, "cvmfs/publish-fail", "v1", im.image([lay]))
    # the 3rd publish is the one of the layer's metadata (after the parents' and the ingest's own)
    fake.apply_env(monkeypatch, fail="publish@2")
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        res = pub.publish_image(registry.ref("cvmfs/publish-fail", "v1"))
    assert not res.ok and "publish" in res.error
    cmds = fake.commands()
    i = cmds.index(["publish", fake.repo], cmds.index(["ingest", "--catalog", "-k", "-t", "-", "-b",
                                                       _rel_layerfs(lay), fake.repo]))
    assert cmds[i + 1] == ["abort", "-f", fake.repo]
    assert cmds[i + 2] == ["ingest", "-d", _rel_layerfs(lay), fake.repo]
    layout = RepositoryLayout(fake.root)
    assert not layout.layer_json(lay.digest).exists() and not layout.layerfs(lay.digest).exists()
    assert check_invariants(fake.root) == []
    # the next run, without failures, publishes it
    fake.apply_env(monkeypatch)
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        assert pub.publish_image(registry.ref("cvmfs/publish-fail", "v1")).ok
    assert layout.is_layer_complete(lay.digest)


def test_hostile_layer_never_reaches_cvmfs_server(registry: Registry, client: RegistryClient,
                                                  fake: FakeCvmfs) -> None:
    bad = im.layer([im.Entry("a/../../escape", data=b"x")])
    im.push_image(registry.url, "cvmfs/hostile", "v1", im.image([bad]))
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        res = pub.publish_image(registry.ref("cvmfs/hostile", "v1"))
    assert not res.ok and bad.digest in res.error
    assert not any(c[0] == "ingest" for c in fake.commands())
    assert not (fake.root.parent / "escape").exists()


def test_transaction_backend(registry: Registry, client: RegistryClient, fake: FakeCvmfs) -> None:
    base, top = base_layer("txn"), top_layer("zstd")
    img = im.image([base, top])
    im.push_image(registry.url, "cvmfs/txn", "v1", img)
    with make_publisher(fake, client, "cvmfs-transaction", lease_path="sub/dir") as pub:
        res = pub.publish_image(registry.ref("cvmfs/txn", "v1"))
    assert res.ok, res.error
    cmds = fake.commands()
    assert cmds[0] == ["transaction", f"{fake.repo}/sub/dir"]
    assert all(c[0] in ("transaction", "publish") for c in cmds)
    # every transaction is closed by a publish, no ingest
    assert cmds[0::2] == [["transaction", f"{fake.repo}/sub/dir"]] * (len(cmds) // 2)
    assert cmds[1::2] == [["publish", fake.repo]] * (len(cmds) // 2)
    assert fake.violations() == ""
    layout = RepositoryLayout(fake.root)
    assert (layout.layerfs(top.digest) / "etc/.wh.motd").is_file()
    assert (layout.layerfs(base.digest) / "bin/tool").stat().st_uid == 1000
    assert json.loads(layout.origin_json(base.digest).read_text()) == {"origin": [img.config_digest]}
    assert (layout.public_link(registry.host, "cvmfs/txn", "v1") / "etc/os-release").is_file()
    assert check_invariants(fake.root) == []


def test_transaction_backend_groups_layers(registry: Registry, client: RegistryClient, fake: FakeCvmfs) -> None:
    """With concurrency, layers staged while a transaction is open go into the next one together."""
    layers = [im.layer([(f"f{i}", os.urandom(200_000))]) for i in range(6)]
    im.push_image(registry.url, "cvmfs/group", "v1", im.image(layers))
    cfg = PublisherConfig(backend="cvmfs-transaction", root=str(fake.root), repo=fake.repo, cvmfs_server=fake.exe,
                          state_dir=str(fake.state.parent / "publisher-state"), concurrency=4, skip_flat=True)
    with Publisher(cfg.make_backend(), client, concurrency=4, skip_flat=True) as pub:
        res = pub.publish_image(registry.ref("cvmfs/group", "v1"))
    assert res.ok, res.error
    layer_txns = fake.commands().count(["transaction", fake.repo]) - 1  # minus the image metadata
    assert 1 <= layer_txns <= 6
    assert all(RepositoryLayout(fake.root).is_layer_complete(lay.digest) for lay in layers)


def test_transaction_publish_failure_aborts(
    registry: Registry, client: RegistryClient, fake: FakeCvmfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = base_layer("txn-fail")
    im.push_image(registry.url, "cvmfs/txn-fail", "v1", im.image([lay]))
    fake.apply_env(monkeypatch, fail="publish@1")
    with make_publisher(fake, client, "cvmfs-transaction") as pub:
        res = pub.publish_image(registry.ref("cvmfs/txn-fail", "v1"))
    assert not res.ok
    assert fake.commands() == [["transaction", fake.repo], ["publish", fake.repo], ["abort", "-f", fake.repo]]
    assert not RepositoryLayout(fake.root).layer_dir(lay.digest).exists()
    assert list(fake.root.iterdir()) == []


def test_recover_aborts_transaction_left_open(fake: FakeCvmfs, client: RegistryClient) -> None:
    """A run killed inside a transaction left it open: the next run aborts it before doing anything."""
    cfg = PublisherConfig(backend="cvmfs-ingest", root=str(fake.root), repo=fake.repo, cvmfs_server=fake.exe,
                          state_dir=str(fake.state.parent / "publisher-state"))
    backend = cfg.make_backend()
    backend.server.transaction()
    (Path(cfg.state_dir or "") / "transaction-open").write_text("12345\n")
    (fake.root / "half-written").write_text("x")
    backend.recover()
    assert fake.commands()[-1] == ["abort", "-f", fake.repo]
    assert not (fake.root / "half-written").exists()


@pytest.mark.parametrize("backend", ["cvmfs-ingest", "cvmfs-transaction"])
def test_cvmfs_backends_fetch_each_blob_once(
    backend: str, fresh_registry: Registry, client: RegistryClient, fake: FakeCvmfs
) -> None:
    """The flat is built from the published layer trees (read back from the repository), not downloaded again;
    ``user.*`` xattrs, which a CVMFS mount lists for its own magic attributes, are not copied into it."""
    base = im.layer([im.Entry("etc", type="dir"), ("etc/motd", b"base\n"),
                     im.Entry("tool", data=b"x", pax={"SCHILY.xattr.user.origin": "base"})], codec="gzip")
    top = top_layer("zstd")
    img = im.image([base, top])
    im.push_image(fresh_registry.url, "cvmfs/once", "v1", img)
    with make_publisher(fake, client, backend) as pub:
        res = pub.publish_image(fresh_registry.ref("cvmfs/once", "v1"))
    assert res.ok, res.error
    gets = settled_blob_gets(fresh_registry.log, 3)
    assert gets == {base.digest: 1, top.digest: 1, img.config_digest: 1}
    flat = RepositoryLayout(fake.root).flat_dir(img.config_digest)
    assert (flat / "opt/app/new.txt").read_bytes() == b"new\n" and not (flat / "etc/motd").exists()
    assert "user.origin" not in os.listxattr(flat / "tool")
    assert check_invariants(fake.root) == [] and fake.violations() == ""
