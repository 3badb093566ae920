"""``cvmfs-snap pull`` against a real containerd 1.6 (no proxy plugin): the overlayfs snapshotter, ``ctr run``
afterwards, byte-for-byte the same result as ``ctr images pull``, GC labels, multi-platform images, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_snap.api.gen.containerd.services.leases.v1 import leases_pb2
from cvmfs_snap.cli import main as cli_main
from cvmfs_snap.containerd import labels as L
from cvmfs_snap.containerd.pull import run_pull
from cvmfs_snap.containerd.unpack import Outcome
from cvmfs_snap.errors import IntegrityError, InvalidInputError, NotFoundError, UnavailableError
from cvmfs_snap.labelnames import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    DISTRIBUTION_SOURCE,
    GC_REF_CONTENT_CONFIG,
    GC_REF_CONTENT_LAYER,
    GC_REF_CONTENT_MANIFEST,
    GC_REF_SNAPSHOT,
    SNAPSHOT_REF,
    UNCOMPRESSED,
)
from cvmfs_snap_devenv.containerd import Containerd, start_containerd
from cvmfs_snap_devenv.images import BuiltImage, Pusher, image, layer
from cvmfs_snap_devenv.registry import Registry
from tests.support.pullcheck import active, blob_gets, client, committed, containerd_in_tmp
from tests.support.runnable import push_runnable, require_busybox

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    with containerd_in_tmp() as cd:
        yield cd


def test_pull_overlayfs_then_ctr_run(registry: Registry, containerd: Containerd,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    require_busybox()
    p = push_runnable(registry.url, registry.host, "pull/run", extra=2)
    rc = cli_main(["pull", "--address", containerd.address, "--snapshotter", "overlayfs", "--json", p.ref])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == p.ref
    assert out["target"] == {"mediaType": p.img.manifest_media_type, "digest": p.digest,
                             "size": len(p.img.manifest)}
    assert [lay["outcome"] for lay in out["layers"]] == ["pulled"] * 3
    assert out["downloaded"] == sum(len(lay.blob) for lay in p.img.layers)
    chains = L.chain_ids([lay.diff_id for lay in p.img.layers])
    assert [lay["chainID"] for lay in out["layers"]] == chains

    # the image runs with ctr (ctr checks IsUnpacked by stating the top chain ID)
    r = containerd.ctr("run", "--rm", "--snapshotter", "overlayfs", p.ref, "pull-run-1", "/bin/cat",
                       "/data/file1", "/etc/hostname", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("content 1 of pull/run\n")
    assert r.stdout.endswith("cvmfs-snap-test\n")

    with client(containerd) as c:
        rec = c.get_image(p.ref)
        assert rec is not None and rec.target.digest == p.digest
        man = c.content_info(p.digest)
        cfg = c.content_info(p.img.config_digest)
        assert man is not None and cfg is not None
        # GC references as containerd's own pull sets them
        assert man.labels[GC_REF_CONTENT_CONFIG] == p.img.config_digest
        for i, lay in enumerate(p.img.layers):
            assert man.labels[f"{GC_REF_CONTENT_LAYER}{i}"] == lay.digest
            info = c.content_info(lay.digest)
            assert info is not None and info.labels[UNCOMPRESSED] == lay.diff_id
        assert cfg.labels[GC_REF_SNAPSHOT + "overlayfs"] == chains[-1]
        assert man.labels[DISTRIBUTION_SOURCE + "127.0.0.1"] == "pull/run"
        # the lease is gone
        leases = c.leases.List(leases_pb2.ListRequest(), metadata=c.metadata()).leases
        assert not [lease for lease in leases if lease.id.startswith("cvmfs-snap-pull-")]
    snaps = committed(containerd, "overlayfs")
    for i, chain in enumerate(chains):
        assert snaps[chain].parent == (chains[i - 1] if i else "")
        labels = snaps[chain].labels
        assert labels[SNAPSHOT_REF] == chain
        assert labels[CRI_LAYER_DIGEST] == p.img.layers[i].digest
        assert labels[CRI_IMAGE_REF] == p.ref
        assert labels[CRI_MANIFEST_DIGEST] == p.digest
        assert labels[CRI_IMAGE_LAYERS] == ",".join(lay.digest for lay in p.img.layers[i:])
    assert not active(containerd, "overlayfs")

    # a second pull finds everything in place and downloads nothing
    res = run_pull(p.ref, address=containerd.address, snapshotter="overlayfs")
    assert [lay.outcome for lay in res.layers] == [Outcome.PRESENT] * 3
    assert res.downloaded == 0


def test_same_result_as_ctr_images_pull(registry: Registry, containerd: Containerd) -> None:
    """Our pull and containerd's own (``ctr images pull``) give the same image record, chain IDs and GC labels."""
    layers = [layer([("a/one", b"1" * 1000)]), layer(["a/", ("a/two", b"2")], "zstd"), layer(["b/"], "plain")]
    img = image(layers)
    Pusher(registry.url).image("pull/same", "v1", img)
    ref = registry.ref("pull/same", "v1")
    r = containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref, namespace="viactr",
                       check=False)
    assert r.returncode == 0, r.stderr
    res = run_pull(ref, address=containerd.address, namespace="viaours", snapshotter="overlayfs")
    # containerd shares blobs between namespaces: ctr's download is reused, ours unpacks them itself
    assert [lay.outcome for lay in res.layers] == [Outcome.CACHED] * 3 and res.downloaded == 0

    with client(containerd, "viactr") as theirs, client(containerd, "viaours") as ours:
        a, b = theirs.get_image(ref), ours.get_image(ref)
        assert a is not None and b is not None
        assert (a.target.media_type, a.target.digest, a.target.size) == \
               (b.target.media_type, b.target.digest, b.target.size)
        for digest in (img.manifest_digest, img.config_digest, *[lay.digest for lay in layers]):
            ta, tb = theirs.content_info(digest), ours.content_info(digest)
            assert ta is not None and tb is not None, digest
            keys = [k for k in ta.labels if k.startswith("containerd.io/")]
            assert {k: ta.labels[k] for k in keys} == {k: tb.labels.get(k) for k in keys}, digest
    c_theirs, c_ours = committed(containerd, "overlayfs", "viactr"), committed(containerd, "overlayfs", "viaours")
    assert {(k, v.parent) for k, v in c_theirs.items()} == {(k, v.parent) for k, v in c_ours.items()}
    assert set(c_ours) == set(L.chain_ids([lay.diff_id for lay in layers]))


def test_multi_platform_index(registry: Registry, containerd: Containerd) -> None:
    amd = image([layer([("arch", b"amd64")])], architecture="amd64")
    arm = image([layer([("arch", b"arm64")]), layer([("more", b"x")])], architecture="arm64", variant="v8")
    idx_digest = Pusher(registry.url).multiarch("pull/multi", "v1", [
        (amd, {"os": "linux", "architecture": "amd64"}),
        (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    ref = registry.ref("pull/multi", "v1")
    res = run_pull(ref, address=containerd.address, namespace="multi", snapshotter="overlayfs",
                   platform="linux/arm64")
    assert res.target.digest == idx_digest and res.manifest_digest == arm.manifest_digest
    assert res.chain_id == L.chain_ids([lay.diff_id for lay in arm.layers])[-1]
    with client(containerd, "multi") as c:
        idx = c.content_info(idx_digest)
        assert idx is not None
        assert idx.labels[GC_REF_CONTENT_MANIFEST + "0"] == amd.manifest_digest
        assert idx.labels[GC_REF_CONTENT_MANIFEST + "1"] == arm.manifest_digest
        assert c.content_info(amd.layers[0].digest) is None  # the other platform is not downloaded
        rec = c.get_image(ref)
        assert rec is not None and rec.target.digest == idx_digest
    assert set(committed(containerd, "overlayfs", "multi")) == set(L.chain_ids([x.diff_id for x in arm.layers]))
    with pytest.raises(NotFoundError, match=r"linux/s390x"):
        run_pull(ref, address=containerd.address, namespace="multi", snapshotter="overlayfs",
                 platform="linux/s390x")


def test_corrupt_layer_is_refused_and_cleaned_up(registry: Registry, containerd: Containerd) -> None:
    """A layer whose content does not match the diffID in the config: containerd's Apply computes the real
    diffID, the pull fails with IntegrityError and removes its extraction snapshot."""
    good = layer([("f", b"good")])
    liar = layer([("f", b"evil")])
    img = image([good])
    # config says the diffID of `good`, but the manifest's layer blob is `liar` (still matching its own digest)
    manifest = json.loads(img.manifest)
    manifest["layers"] = [liar.descriptor()]
    raw = json.dumps(manifest).encode()
    bad = BuiltImage([liar], img.config, raw, img.manifest_media_type)
    p = Pusher(registry.url)
    p.blob("pull/corrupt", liar.blob)
    p.blob("pull/corrupt", img.config)
    p.manifest("pull/corrupt", "v1", bad.manifest, bad.manifest_media_type)
    with pytest.raises(IntegrityError, match=liar.digest):
        run_pull(registry.ref("pull/corrupt", "v1"), address=containerd.address, namespace="corrupt",
                 snapshotter="overlayfs")
    assert not active(containerd, "overlayfs", "corrupt")
    assert not committed(containerd, "overlayfs", "corrupt")
    with client(containerd, "corrupt") as c:
        assert c.get_image(registry.ref("pull/corrupt", "v1")) is None


def test_errors_name_the_problem(registry: Registry, containerd: Containerd) -> None:
    img = image([layer([("x", b"x")])])
    Pusher(registry.url).image("pull/errors", "v1", img)
    ref = registry.ref("pull/errors", "v1")
    with pytest.raises(UnavailableError, match=r"not running at /nonexistent/c\.sock"):
        run_pull(ref, address="/nonexistent/c.sock", snapshotter="overlayfs")
    with pytest.raises(InvalidInputError, match=r"no-such-snapshotter.*proxy_plugins"):
        run_pull(ref, address=containerd.address, namespace="errors", snapshotter="no-such-snapshotter")
    with pytest.raises(NotFoundError, match="pull/errors"):
        run_pull(registry.ref("pull/errors", "nope"), address=containerd.address, namespace="errors",
                 snapshotter="overlayfs")
    with pytest.raises(InvalidInputError):
        run_pull(f"{registry.host}/Bad/Name:v1", address=containerd.address, snapshotter="overlayfs")
    # the CLI turns them into exit statuses
    assert cli_main(["pull", "--address", "/nonexistent/c.sock", ref]) == UnavailableError.exit_code
    assert cli_main(["pull", "--address", containerd.address, "--snapshotter", "overlayfs", "--platform",
                     "bogus", ref]) == InvalidInputError.exit_code


def test_blob_in_content_store_is_not_downloaded_again(fresh_registry: Registry, containerd: Containerd) -> None:
    """Pulling into another snapshotter (native) reuses the blobs already in the content store."""
    img = image([layer([("c", b"c" * 5000)])])
    Pusher(fresh_registry.url).image("pull/cached", "v1", img)
    ref = fresh_registry.ref("pull/cached", "v1")
    run_pull(ref, address=containerd.address, namespace="cached", snapshotter="overlayfs")
    res = run_pull(ref, address=containerd.address, namespace="cached", snapshotter="native")
    assert [lay.outcome for lay in res.layers] == [Outcome.CACHED]
    assert blob_gets(fresh_registry.log, img.layers[0].digest) == 1
    assert set(committed(containerd, "native", "cached")) == {img.layers[0].diff_id}
    # another namespace: containerd shares the blob (shared content policy), the registry is not asked again
    res = run_pull(ref, address=containerd.address, namespace="cached2", snapshotter="overlayfs")
    assert [lay.outcome for lay in res.layers] == [Outcome.CACHED] and res.downloaded == 0
    assert blob_gets(fresh_registry.log, img.layers[0].digest) == 1
    with client(containerd, "cached2") as c:
        info = c.content_info(img.layers[0].digest)
        assert info is not None and info.labels[DISTRIBUTION_SOURCE + "127.0.0.1"] == "pull/cached"


def _tamper(reg: Registry, digest: str) -> None:
    """Flip bytes of a blob in the registry's storage: it then serves content that does not match its digest."""
    path = reg.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / digest[7:9] / digest[7:] / "data"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_blob_fails_cleanly(fresh_registry: Registry, containerd: Containerd) -> None:
    img = image([layer([("ok", b"fine")]), layer([("big", bytes(range(256)) * 4000)], "plain")])
    Pusher(fresh_registry.url).image("pull/tampered", "v1", img)
    _tamper(fresh_registry, img.layers[1].digest)
    ref = fresh_registry.ref("pull/tampered", "v1")
    with pytest.raises(IntegrityError, match=img.layers[1].digest):
        run_pull(ref, address=containerd.address, namespace="tampered", snapshotter="overlayfs")
    with client(containerd, "tampered") as c:
        assert c.content_info(img.layers[1].digest) is None
        assert c.get_image(ref) is None
    assert not active(containerd, "overlayfs", "tampered"), "the extraction snapshot was left behind"
    ingests = containerd.ctr("content", "active", namespace="tampered").stdout
    assert img.layers[1].digest not in ingests and "layer-" not in ingests


def test_concurrent_pulls_of_one_image(registry: Registry, containerd: Containerd) -> None:
    """Two pulls at once (kubelet and an admin, say) share blobs and snapshots and both succeed."""
    from concurrent.futures import ThreadPoolExecutor

    img = image([layer([(f"f{i}", bytes([i]) * 200_000)], "plain") for i in range(4)])
    Pusher(registry.url).image("pull/concurrent", "v1", img)
    ref = registry.ref("pull/concurrent", "v1")
    with ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(run_pull, ref, address=containerd.address, namespace="conc", snapshotter="overlayfs")
                for _ in range(2)]
        results = [f.result(timeout=120) for f in futs]
    assert all(r.chain_id == results[0].chain_id for r in results)
    assert set(committed(containerd, "overlayfs", "conc")) == set(L.chain_ids([x.diff_id for x in img.layers]))
    assert not active(containerd, "overlayfs", "conc")
    # every layer was unpacked once (by one of the two); the other found it present or committed concurrently
    outcomes = [lay.outcome for r in results for lay in r.layers]
    assert outcomes.count(Outcome.PULLED) + outcomes.count(Outcome.CACHED) >= 4


def test_progress_reporting(registry: Registry, containerd: Containerd, caplog: pytest.LogCaptureFixture) -> None:
    import io
    import logging

    from cvmfs_snap.containerd.progress import LogProgress, RichProgress, summary

    img = image([layer([("p", b"p" * 3000)]), layer([("q", b"q")])])
    Pusher(registry.url).image("pull/progress", "v1", img)
    ref = registry.ref("pull/progress", "v1")
    out = io.StringIO()
    with RichProgress(stream=out) as prog:
        res = run_pull(ref, address=containerd.address, namespace="progress", snapshotter="overlayfs",
                       progress=prog)
    text = out.getvalue()
    assert "pull/progress" in text and img.layers[0].digest[7:19] in text and "pulled" in text
    with caplog.at_level(logging.INFO, logger="cvmfs_snap.containerd"):
        run_pull(ref, address=containerd.address, namespace="progress2", snapshotter="overlayfs",
                 progress=LogProgress())
    lines = [r.getMessage() for r in caplog.records if r.name == "cvmfs_snap.containerd.progress"]
    # (another namespace: containerd shares the blobs, nothing is downloaded again)
    assert any(img.layers[1].digest in m and "cached, 0 B downloaded" in m for m in lines), lines
    s = summary(res)
    assert f"layer 1/2 {img.layers[0].digest} pulled" in s and "2 pulled" in s


def test_proxy_snapshotter_not_running(registry: Registry, short_tmp: Path) -> None:
    img = image([layer([("gone", b"g")])])
    Pusher(registry.url).image("pull/gone", "v1", img)
    with start_containerd(short_tmp / "c", proxy_plugins={"gone": str(short_tmp / "nothing.sock")}) as cd:
        with pytest.raises(UnavailableError, match=r"'gone' does not answer containerd.*cvmfs-snap snapshotter"):
            run_pull(registry.ref("pull/gone", "v1"), address=cd.address, snapshotter="gone")
        with client(cd) as c:
            assert c.get_image(registry.ref("pull/gone", "v1")) is None


@pytest.mark.parametrize("max_downloads", [1, 3])
def test_downloads_ahead_of_unpacking(fresh_registry: Registry, containerd: Containerd, max_downloads: int) -> None:
    img = image([layer([(f"l{i}", bytes([i + 10 * max_downloads]) * 300_000)]) for i in range(5)])
    repo = f"pull/ahead{max_downloads}"
    Pusher(fresh_registry.url).image(repo, "v1", img)
    ns = f"ahead{max_downloads}"
    res = run_pull(fresh_registry.ref(repo, "v1"), address=containerd.address, namespace=ns,
                   snapshotter="overlayfs", max_downloads=max_downloads)
    assert [lay.outcome for lay in res.layers] == [Outcome.PULLED] * 5
    assert [lay.downloaded for lay in res.layers] == [len(lay.blob) for lay in img.layers]
    for lay in img.layers:
        assert blob_gets(fresh_registry.log, lay.digest) == 1
    assert set(committed(containerd, "overlayfs", ns)) == set(L.chain_ids([x.diff_id for x in img.layers]))
    assert not active(containerd, "overlayfs", ns)


def test_docker_media_types(registry: Registry, containerd: Containerd) -> None:
    """Docker schema 2 manifests and manifest lists (what most registries still serve) work like OCI ones."""
    amd = image([layer([("d", b"docker")])], docker=True)
    arm = image([layer([("d", b"arm")])], architecture="arm64", docker=True)
    list_digest = Pusher(registry.url).multiarch("pull/docker", "v1", [
        (amd, {"os": "linux", "architecture": "amd64"}), (arm, {"os": "linux", "architecture": "arm64"})],
        docker=True)
    ref = registry.ref("pull/docker", "v1")
    res = run_pull(ref, address=containerd.address, namespace="docker", snapshotter="overlayfs",
                   platform="linux/amd64")
    assert res.target.digest == list_digest
    assert res.target.media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
    assert res.manifest_digest == amd.manifest_digest
    with client(containerd, "docker") as c:
        man = c.content_info(amd.manifest_digest)
        assert man is not None and man.labels[GC_REF_CONTENT_CONFIG] == amd.config_digest
        assert man.labels[GC_REF_CONTENT_LAYER + "0"] == amd.layers[0].digest
    assert set(committed(containerd, "overlayfs", "docker")) == {amd.layers[0].diff_id}
