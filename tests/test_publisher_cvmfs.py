"""The cvmfs-ingest and cvmfs-transaction backends, driving the recording cvmfs_server stand-in."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from cvmfs_snap.errors import CommandError
from cvmfs_snap.layout import RepositoryLayout
from cvmfs_snap.oci import RegistryClient
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry
from publisher.backends.base import LayerInfo
from publisher.config import PublisherConfig
from publisher.factory import make_backend
from publisher.pipeline import Publisher
from tests.support.blobcount import settled_blob_gets
from tests.support.fake_cvmfs_server import ENV_HANG_SECONDS
from tests.support.publisher_env import FakeCvmfs, base_layer, check_invariants, make_fake_cvmfs, top_layer


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCvmfs:
    f = make_fake_cvmfs(tmp_path)
    f.apply_env(monkeypatch)
    return f


def make_publisher(fake: FakeCvmfs, client: RegistryClient, backend: str, **extra: object) -> Publisher:
    cfg = PublisherConfig(backend=backend, root=str(fake.root), repo=fake.repo, cvmfs_server=fake.exe,
                          state_dir=str(fake.state.parent / "publisher-state"), concurrency=1, **extra)  # type: ignore[arg-type]
    backend_obj = make_backend(cfg)
    backend_obj.recover()
    return Publisher(backend_obj, client, concurrency=cfg.concurrency, skip_flat=cfg.skip_flat)


def _rel_layerfs(layer: im.BuiltLayer) -> str:
    h = layer.digest.split(":")[1]
    return f".layers/{h[:2]}/{h}/layerfs"


def _batch_argv(repo: str, *deleted: str) -> list[str]:
    """The one ingest that publishes a batch of layers with their metadata."""
    return ["ingest", *(a for d in deleted for a in ("-d", d)), "-k", "-t", "-", "-b", ".layers", repo]


def _publishes(cmds: list[list[str]]) -> int:
    return sum(1 for c in cmds if c[0] in ("publish", "ingest"))


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
    # the 256 buckets (.layers/<xx>) once per repository, in one transaction; then ONE ingest for both layers
    # with their metadata; never a transaction around a layer; then the flat's and the image's transactions
    assert cmds == [["transaction", repo], ["publish", repo], _batch_argv(repo), ["transaction", repo],
                    ["publish", repo], ["transaction", repo], ["publish", repo]]  # was 3 per layer + 2
    assert sorted(os.listdir(fake.root / ".layers")) == [".cvmfscatalog"] + [f"{i:02x}" for i in range(256)]
    batch = log[2]
    assert batch["stdin_bytes"] > len(base.tar) + len(top.tar)  # the layers' members, rebased, and metadata
    assert all(e["status"] == 0 for e in log)
    assert fake.violations() == ""  # nothing was written outside a transaction

    layout = RepositoryLayout(fake.root)
    lfs = layout.layerfs(top.digest)
    assert (lfs / "etc/.wh.motd").is_file() and (lfs / "opt/app/.wh..wh..opq").is_file()
    assert (lfs / ".cvmfscatalog").is_file()
    assert (layout.layerfs(base.digest) / "bin/tool").stat().st_uid == 1000  # -k kept ownership
    assert os.readlink(layout.layerfs(base.digest) / "bin/sh-link") == "tool"  # symlink targets untouched
    # explicit root-owned entries: nothing of the layer recorded with the unknown owner
    assert lfs.stat().st_uid == 0 and layout.layer_dir(top.digest).stat().st_uid == 0
    assert not {u for u in fake.unknown_owner() if u.startswith(".layers")}
    rec = layout.read_layer_record(top.digest)
    assert rec is not None and rec.whiteouts == ["etc/motd"] and rec.opaque_dirs == ["opt/app"]
    assert rec.diff_id == top.diff_id
    assert json.loads(layout.origin_json(top.digest).read_text()) == {"origin": [img.config_digest]}
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
    i = cmds.index(_batch_argv(fake.repo))
    # the stand-in's failing ingest leaves a partial tree: removed with ingest -d
    assert cmds[i + 1] == ["ingest", "-d", _rel_layerfs(lay).rsplit("/", 1)[0], fake.repo]
    assert len(cmds) == i + 2  # no metadata, no image
    layout = RepositoryLayout(fake.root)
    assert not layout.layer_dir(lay.digest).exists()
    assert not layout.metadata_root.exists()
    assert check_invariants(fake.root) == []


def test_failures_abort_and_the_next_run_completes(
    registry: Registry, client: RegistryClient, fake: FakeCvmfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing publish of the flat's transaction is aborted with ``abort -f``; the layers (published with their
    metadata in one ingest before) stay complete and are not ingested again by the next run."""
    lay = base_layer("publish-fail")
    im.push_image(registry.url, "cvmfs/publish-fail", "v1", im.image([lay]))
    fake.apply_env(monkeypatch, fail="publish@2")  # 1: the buckets, 2: the flat's transaction
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        res = pub.publish_image(registry.ref("cvmfs/publish-fail", "v1"))
    assert not res.ok and "publish" in res.error
    cmds = fake.commands()
    i = cmds.index(["publish", fake.repo], cmds.index(_batch_argv(fake.repo)))
    assert cmds[i + 1] == ["abort", "-f", fake.repo]
    layout = RepositoryLayout(fake.root)
    assert layout.layer_json(lay.digest).is_file() and not layout.metadata_root.exists()
    assert check_invariants(fake.root) == []

    fake.apply_env(monkeypatch)
    n = len(fake.commands())
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        assert pub.publish_image(registry.ref("cvmfs/publish-fail", "v1")).ok
    assert layout.is_layer_complete(lay.digest)
    assert not any(c[0] == "ingest" for c in fake.commands()[n:])  # never ingested twice
    assert check_invariants(fake.root) == [] and fake.violations() == ""


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
    """Layers go in by ingest also here: a transaction would delete every ``.wh.*`` file (the stand-in does, as
    the real server); flats and metadata go through the lease path's transactions."""
    base, top = base_layer("txn"), top_layer("zstd")
    img = im.image([base, top])
    im.push_image(registry.url, "cvmfs/txn", "v1", img)
    with make_publisher(fake, client, "cvmfs-transaction", lease_path="sub/dir") as pub:
        res = pub.publish_image(registry.ref("cvmfs/txn", "v1"))
    assert res.ok, res.error
    cmds = fake.commands()
    txns = [c for c in cmds if c[0] == "transaction"]
    assert txns and all(c == ["transaction", f"{fake.repo}/sub/dir"] for c in txns)
    assert _batch_argv(fake.repo) in cmds  # the layers, by ingest
    assert fake.violations() == ""
    layout = RepositoryLayout(fake.root)
    assert (layout.layerfs(top.digest) / "etc/.wh.motd").is_file()
    assert (layout.layerfs(top.digest) / "opt/app/.wh..wh..opq").is_file()
    assert (layout.layerfs(base.digest) / "bin/tool").stat().st_uid == 1000
    assert json.loads(layout.origin_json(base.digest).read_text()) == {"origin": [img.config_digest]}
    flat = layout.public_link(registry.host, "cvmfs/txn", "v1")
    assert (flat / "etc/os-release").is_file() and not (flat / "etc/motd").exists()
    assert sorted(os.listdir(flat / "opt/app")) == ["new.txt"]
    assert check_invariants(fake.root) == []


def test_stand_in_deletes_whiteout_files_in_transactions(fake: FakeCvmfs, client: RegistryClient) -> None:
    """The stand-in behaves as the real server: ``.wh.*`` written in a transaction are applied, not stored."""
    (fake.root / "d").mkdir()
    (fake.root / "d/x").write_text("x")
    (fake.root / "d/keep").write_text("k")
    cfg = PublisherConfig(backend="cvmfs-transaction", root=str(fake.root), repo=fake.repo, cvmfs_server=fake.exe,
                          state_dir=str(fake.state.parent / "publisher-state"))
    backend = make_backend(cfg)
    with backend.transaction() as txn:
        txn.write_file("d/.wh.x", b"")
        txn.write_file("e/.wh..wh..opq", b"")
    assert sorted(os.listdir(fake.root / "d")) == ["keep"] and os.listdir(fake.root / "e") == []


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
    backend = make_backend(cfg)
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


def test_multiarch_variant_symlink_layout(registry: Registry, client: RegistryClient, fake: FakeCvmfs) -> None:
    """DUCC's current layout: per-arch flats under .multiarch/<arch>/..., the public name a variant symlink on
    $(CVMFS_ARCH), and .multiarch/<uname -m> aliases so that a node's CVMFS_ARCH (x86_64, aarch64) resolves."""
    amd = im.image([base_layer("amd64-v")], architecture="amd64")
    arm = im.image([base_layer("arm64-v")], architecture="arm64", variant="v8")
    im.Pusher(registry.url).multiarch("cvmfs/multi", "v1", [
        (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        (amd, {"os": "linux", "architecture": "amd64"}),
    ])
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        res = pub.publish_image(registry.ref("cvmfs/multi", "v1"))
    assert res.ok, res.error
    layout = RepositoryLayout(fake.root)
    name = f"{registry.host}/cvmfs/multi:v1"
    public = layout.public_link(registry.host, "cvmfs/multi", "v1")
    assert os.readlink(public) == f"../../.multiarch/$(CVMFS_ARCH:-amd64)/{name}"
    ma = fake.root / ".multiarch"
    assert {n: os.readlink(ma / n) for n in os.listdir(ma) if (ma / n).is_symlink()} == {
        "x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64:v8", "arm64": "arm64:v8"}
    for node_arch, img in (("x86_64", amd), ("aarch64", arm), ("amd64", amd)):  # as a client resolves it
        resolved = public.parent / os.readlink(public).replace("$(CVMFS_ARCH:-amd64)", node_arch)
        assert resolved.resolve() == layout.flat_dir(img.config_digest).resolve()
    assert check_invariants(fake.root) == [] and fake.violations() == ""
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        again = pub.publish_image(registry.ref("cvmfs/multi", "v1"))
    assert again.ok and again.unchanged

    # a repository published with the older layout (a plain link to the default flat) is moved to the new one
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        with pub.backend.transaction() as txn:
            txn.symlink(str(public.relative_to(fake.root)), layout.flat_link_target(public, amd.config_digest))
        assert not pub.publish_image(registry.ref("cvmfs/multi", "v1")).unchanged
    assert os.readlink(public) == f"../../.multiarch/$(CVMFS_ARCH:-amd64)/{name}"


def _hung_pids(fake: FakeCvmfs, kind: str) -> list[int]:
    p = fake.state / f"hung-{kind}"
    return [int(x) for x in p.read_text().split()] if p.exists() else []


def _gone(pid: int) -> bool:
    """Not running (a zombie no init reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_hung_publish_is_killed_and_aborted(fake: FakeCvmfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `cvmfs_server publish` that hangs while the repository lock is held is killed after the timeout and
    its transaction aborted (abort -f); the next transaction works."""
    fake.apply_env(monkeypatch, fail="hang-publish@1")
    cfg = PublisherConfig(backend="cvmfs-transaction", root=str(fake.root), repo=fake.repo, cvmfs_server=fake.exe,
                          state_dir=str(fake.state.parent / "publisher-state"), cvmfs_server_timeout=2)
    backend = make_backend(cfg)
    with pytest.raises(CommandError) as err, backend.transaction() as txn:
        txn.write_file("half", b"x")
    msg = str(err.value)
    assert "did not finish within 2 s and was killed" in msg and f"abort -f {fake.repo}" in msg
    assert [p for p in _hung_pids(fake, "publish") if not _gone(p)] == []  # the whole process group is gone
    assert fake.commands()[-1] == ["abort", "-f", fake.repo] and not (fake.root / "half").exists()
    with backend.transaction() as txn:
        txn.write_file("whole", b"y")
    assert (fake.root / "whole").read_bytes() == b"y" and fake.violations() == ""


def test_hung_ingest_is_killed_and_aborted(fake: FakeCvmfs,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    lay = base_layer("hang")
    fake.apply_env(monkeypatch, fail="hang-ingest@1")
    cfg = PublisherConfig(backend="cvmfs-ingest", root=str(fake.root), repo=fake.repo, cvmfs_server=fake.exe,
                          state_dir=str(fake.state.parent / "publisher-state"), cvmfs_server_timeout=2,
                          cvmfs_server_min_rate_mib=1000)
    backend = make_backend(cfg)
    info = LayerInfo(lay.digest, lay.media_type, len(lay.blob), expected_diff_id=lay.diff_id)
    backend.publish_layer(info, io.BytesIO(lay.tar))
    with pytest.raises(CommandError) as err:
        backend.flush_layers([lay.digest])
    assert "did not finish within 2 s and was killed" in str(err.value)
    assert all(_gone(p) for p in _hung_pids(fake, "ingest"))
    assert lay.digest in str(err.value)
    cmds = fake.commands()
    assert cmds[-1] == ["abort", "-f", fake.repo]  # the killed ingest's own transaction (none open here)
    assert not RepositoryLayout(fake.root).layer_dir(lay.digest).exists()  # nothing of it (else: ingest -d)
    backend.publish_layer(info, io.BytesIO(lay.tar))  # the next try works
    backend.flush_layers([lay.digest])
    assert RepositoryLayout(fake.root).is_layer_complete(lay.digest)


CAP = bytes([1, 0, 0, 2, 0, 0x20, 0, 0] + [0] * 12)  # cap_net_raw+ep


@pytest.mark.parametrize("include_xattrs", [False, True])
def test_flat_xattrs_follow_the_repository_setting(
    include_xattrs: bool, fresh_registry: Registry, client: RegistryClient, fake: FakeCvmfs,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ingest drops the layer's xattrs (recorded in layer.json). Without CVMFS_INCLUDE_XATTRS=true publish drops
    the flat's too: a warning says so. With it, the flat gets them: that layer is fetched again for the flat
    (its published tree lost them)."""
    if include_xattrs:
        fake.server_conf.parent.mkdir(parents=True)
        fake.server_conf.write_text("CVMFS_REPOSITORY_NAME=unpacked.test.ch\nCVMFS_INCLUDE_XATTRS=true\n")
    lay = im.layer([im.Entry("bin/ping", data=b"ping", mode=0o755,
                             pax={"SCHILY.xattr.security.capability": CAP.decode("latin-1"),
                                  "SCHILY.xattr.user.note": "n"})])
    img = im.image([lay])
    im.push_image(fresh_registry.url, "cvmfs/xattrs", "v1", img)
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        pub.backend.server.server_conf = fake.server_conf  # type: ignore[attr-defined]
        res = pub.publish_image(fresh_registry.ref("cvmfs/xattrs", "v1"))
    assert res.ok, res.error
    layout = RepositoryLayout(fake.root)
    rec = layout.read_layer_record(lay.digest)
    assert rec is not None and list(rec.xattrs) == ["bin/ping"]
    flat_ping = layout.flat_dir(img.config_digest) / "bin/ping"
    gets = settled_blob_gets(fresh_registry.log, 2)
    warned = [r for r in caplog.records if "CVMFS_INCLUDE_XATTRS is not true" in r.getMessage()]
    if include_xattrs:  # user.* kept; file capabilities never in a flat (privilege)
        assert os.listxattr(flat_ping) == ["user.note"] and os.getxattr(flat_ping, "user.note") == b"n"
        assert gets[lay.digest] == 2 and not warned
    else:
        assert os.listxattr(flat_ping) == []
        assert gets[lay.digest] == 1 and len(warned) == 1 and "bin/ping" in warned[0].getMessage()


def test_flat_never_built_from_a_layer_that_lost_its_whiteouts(
    fresh_registry: Registry, client: RegistryClient, fake: FakeCvmfs
) -> None:
    """A layer an older cvmfs-transaction published lost its .wh.* files (the server deleted them): a flat built
    from that tree would bring deleted files back, so the flat takes the layer from the registry."""
    base, top = base_layer("lost"), top_layer("gzip", marker=b"lost\n")
    img = im.image([base, top])
    im.push_image(fresh_registry.url, "cvmfs/lost", "v1", img)
    with make_publisher(fake, client, "cvmfs-ingest", skip_flat=True) as pub:
        assert pub.publish_image(fresh_registry.ref("cvmfs/lost", "v1")).ok
    layout = RepositoryLayout(fake.root)
    rel = str(layout.layerfs(top.digest).relative_to(fake.root))
    backend = make_backend(PublisherConfig(backend="cvmfs-ingest", root=str(fake.root), repo=fake.repo,
                                           cvmfs_server=fake.exe, state_dir=str(fake.state.parent / "publisher-state")))
    backend._delete_paths([f"{rel}/etc/.wh.motd", f"{rel}/opt/app/.wh..wh..opq"])  # what the old backend left
    assert backend.layer_tree(top.digest) is None and backend.layer_tree(base.digest) is not None
    with make_publisher(fake, client, "cvmfs-ingest") as pub:
        assert pub.publish_image(fresh_registry.ref("cvmfs/lost", "v1")).ok
    flat = layout.flat_dir(img.config_digest)
    assert not (flat / "etc/motd").exists() and sorted(os.listdir(flat / "opt/app")) == ["new.txt"]
    assert settled_blob_gets(fresh_registry.log, 3)[top.digest] == 2


def test_killed_publisher_leaves_the_repository_locked_until_its_cvmfs_server_ends(
    fake: FakeCvmfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of the publisher while `cvmfs_server publish` runs: the command goes on (own session) and keeps the
    repository lock it inherited, so the next run's recovery waits for it instead of aborting a publish that is
    still going on."""
    import signal
    import subprocess
    import sys
    import time

    state = fake.state.parent / "publisher-state"
    script = (
        "from publisher.config import PublisherConfig\nfrom publisher.factory import make_backend\n"
        f"b = make_backend(PublisherConfig(backend='cvmfs-transaction', root={str(fake.root)!r}, repo={fake.repo!r}, "
        f"cvmfs_server={fake.exe!r}, state_dir={str(state)!r}))\n"
        "with b.transaction() as txn:\n    txn.write_file('published-by-orphan', b'x')\n"
    )
    env = {**os.environ, **fake.env(fail="hang-publish@1"), ENV_HANG_SECONDS: "4"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 60
    while not _hung_pids(fake, "publish"):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    orphan = _hung_pids(fake, "publish")[0]
    assert not _gone(orphan)
    backend = make_backend(PublisherConfig(backend="cvmfs-transaction", root=str(fake.root), repo=fake.repo,
                                           cvmfs_server=fake.exe, state_dir=str(state)))
    backend.recover()
    assert _gone(orphan)  # recovery waited for the orphaned publish
    assert (fake.root / "published-by-orphan").read_bytes() == b"x"  # which completed, and was not aborted
    assert fake.violations() == ""
    with backend.transaction() as txn:
        txn.write_file("after", b"y")
    assert (fake.root / "after").is_file()


def test_queued_layers_are_on_disk_for_any_process_and_the_next_run(fake: FakeCvmfs) -> None:
    """A queued layer is in the state directory, not in one process's memory: another backend object (a worker
    process, the daemon beside a cron run) sees and flushes it, and a killed run's queue is published by the next
    run's recover."""
    lay = base_layer("queued")
    cfg = PublisherConfig(backend="cvmfs-ingest", root=str(fake.root), repo=fake.repo, cvmfs_server=fake.exe,
                          state_dir=str(fake.state.parent / "publisher-state"))
    first = make_backend(cfg)
    first.publish_layer(LayerInfo(lay.digest, lay.media_type, len(lay.blob), expected_diff_id=lay.diff_id),
                        io.BytesIO(lay.tar))
    layout = RepositoryLayout(fake.root)
    assert first.has_layer(lay.digest) and not layout.is_layer_complete(lay.digest)
    assert not any(c[0] == "ingest" for c in fake.commands())
    second = make_backend(cfg)  # as a later run would
    assert second.has_layer(lay.digest)
    second.recover()
    assert layout.is_layer_complete(lay.digest) and _batch_argv(fake.repo) in fake.commands()
    n = len(fake.commands())
    first.flush_layers([lay.digest])  # nothing left to do: it is complete
    assert fake.commands()[n:] == [] and check_invariants(fake.root) == []
