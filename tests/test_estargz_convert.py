"""``cvmfs-snap convert`` registry to registry: every platform kept, annotations right, layers verify with our reader
and Go's, eStargz layers kept as they are, and the converted image runs under containerd's overlayfs snapshotter."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_snap.cli import main as cli_main
from cvmfs_snap.errors import AuthError, IntegrityError, InvalidInputError, NotFoundError
from cvmfs_snap.estargz import EStargz
from cvmfs_snap.labelnames import TOC_DIGEST, UNCOMPRESSED_SIZE
from cvmfs_snap.oci import ImageReference, Manifest, RegistryClient
from cvmfs_snap.oci.push import Pusher as OciPusher
from cvmfs_snap_devenv.containerd import Containerd
from cvmfs_snap_devenv.images import BuiltImage, Entry, Pusher, image, layer
from cvmfs_snap_devenv.registry import Registry
from tests.support.estargz import esgz
from tests.support.pullcheck import containerd_in_tmp
from tests.support.runnable import busybox_layer, goref_bin, require_busybox

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    with containerd_in_tmp() as cd:
        yield cd


def _client(reg: Registry) -> RegistryClient:
    return RegistryClient(insecure_registries=[reg.host])


def _convert(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    rc = cli_main(["convert", "--json", "--progress", "plain", *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)  # type: ignore[no-any-return]


def _push(reg: Registry, repo: str, tag: str, img: BuiltImage) -> None:
    p = Pusher(reg.url)
    try:
        p.image(repo, tag, img)
    finally:
        p.close()


def _check_estargz_image(reg: Registry, ref: str, tmp: Path) -> Manifest:
    """Every layer: annotations present and right, TOC and chunks verify, config diffIDs are the gunzipped sha256."""
    r = ImageReference.parse(ref)
    with _client(reg) as c:
        m, _ = c.resolve(r)
        cfg = json.loads(c.get_blob(r, m.config.digest, m.config.size))
        for i, d in enumerate(m.layers):
            assert d.media_type.endswith("gzip")
            blob = c.get_blob(r, d.digest, d.size, max_size=1 << 30)
            es = EStargz.open(lambda o, n, b=blob: b[o : o + n], len(blob),
                              toc_digest=d.annotations[TOC_DIGEST])
            es.verify_all(lambda o, n, b=blob: b[o : o + n])
            plain = gzip.decompress(blob)
            assert int(d.annotations[UNCOMPRESSED_SIZE]) == len(plain)
            assert cfg["rootfs"]["diff_ids"][i] == "sha256:" + hashlib.sha256(plain).hexdigest()
            if goref_bin("esgz"):
                p = tmp / f"layer{i}.esgz"
                p.write_bytes(blob)
                v = subprocess.run([esgz(), "verify", str(p), es.toc_digest, "--diff-id",
                                    cfg["rootfs"]["diff_ids"][i]], capture_output=True, text=True)
                assert v.returncode == 0, v.stdout + v.stderr
    return m


def test_convert_and_run_under_containerd(registry: Registry, containerd: Containerd, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    require_busybox()
    big = bytes(range(256)) * 4000
    img = image([busybox_layer("gzip"),
                 layer(["data/", ("data/file1", b"content 1\n"), ("data/big", big)], "zstd"),
                 layer([Entry("data/.wh.file1")], "plain")], cmd=("/bin/sh",))
    _push(registry, "conv/run", "v1", img)
    src, dst = registry.ref("conv/run", "v1"), registry.ref("conv/run-esgz", "v1")
    out = _convert(capsys, src, dst, "--workers", "2", "--chunk-size", "65536")
    assert [lay["kept"] for lay in out["layers"]] == [False] * 3
    m = _check_estargz_image(registry, dst, tmp_path)
    assert out["digest"] == m.digest
    # a valid tar.gz for containerd: pull with its own client, unpack with overlayfs, run
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", dst)
    r = containerd.ctr("run", "--rm", "--snapshotter", "overlayfs", dst, "conv-run-1", "/bin/sh", "-c",
                       "ls /data; wc -c < /data/big; test -e /data/file1 || echo deleted", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["big", str(len(big)), "deleted"]


def test_every_platform_is_kept_and_estargz_layers_are_kept(registry: Registry, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    shared = layer(["etc/", ("etc/os-release", b"ID=test\n")])
    amd = image([shared, layer([("amd", b"x86" * 1000)])], architecture="amd64")
    arm = image([shared, layer([("arm", b"arm" * 1000)])], architecture="arm64", variant="v8")
    p = Pusher(registry.url)
    try:
        p.multiarch("conv/multi", "v1", [(amd, {"os": "linux", "architecture": "amd64"}),
                                         (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    finally:
        p.close()
    src, dst = registry.ref("conv/multi", "v1"), registry.ref("conv/multi-esgz", "v1")
    out = _convert(capsys, src, dst)
    assert len(out["layers"]) == 4 and not any(lay["kept"] for lay in out["layers"])
    assert out["layers"][0]["digest"] == out["layers"][2]["digest"]  # the shared layer is converted once
    with _client(registry) as c:
        idx = json.loads(c.get_manifest(ImageReference.parse(dst)).raw)
    assert [m["platform"]["architecture"] for m in idx["manifests"]] == ["amd64", "arm64"]
    for arch, variant in (("amd64", ""), ("arm64", "v8")):
        from cvmfs_snap.oci import Platform

        with _client(registry) as c:
            m, _ = c.resolve(ImageReference.parse(dst), Platform("linux", arch, variant))
        assert all(TOC_DIGEST in d.annotations for d in m.layers)
    # converting the result again keeps every layer byte for byte (and so every manifest)
    again = _convert(capsys, dst, registry.ref("conv/multi-again", "v1"))
    assert all(lay["kept"] for lay in again["layers"])
    assert again["digest"] == out["digest"]
    # one platform only: a single manifest
    one = _convert(capsys, src, registry.ref("conv/multi-arm", "v1"), "--platform", "linux/arm64/v8")
    assert one["mediaType"].endswith("manifest.v1+json") and len(one["layers"]) == 2
    _check_estargz_image(registry, registry.ref("conv/multi-arm", "v1"), tmp_path)


def test_estargz_base_layer_without_uncompressed_size_is_kept_and_annotated(
        registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = layer([("base", b"b" * 5000)])
    img = image([base, layer([("top", b"t")])])
    _push(registry, "conv/base", "v1", img)
    out1 = _convert(capsys, registry.ref("conv/base", "v1"), registry.ref("conv/base-esgz", "v1"))
    # strip the uncompressed-size annotation, as some tools write it: it is computed again, the layer kept
    ref = ImageReference.parse(registry.ref("conv/base-esgz", "v1"))
    with _client(registry) as c:
        m, _ = c.resolve(ref)
        doc = json.loads(m.raw)
        for d in doc["layers"]:
            del d["annotations"][UNCOMPRESSED_SIZE]
        OciPusher(c).push_manifest(ref, json.dumps(doc).encode(), m.media_type, reference="stripped")
    out2 = _convert(capsys, registry.ref("conv/base-esgz", "stripped"), registry.ref("conv/other-repo", "v1"))
    assert [lay["kept"] for lay in out2["layers"]] == [True, True]
    assert [lay["digest"] for lay in out2["layers"]] == [lay["digest"] for lay in out1["layers"]]
    assert [lay["uncompressedSize"] for lay in out2["layers"]] == [lay["uncompressedSize"] for lay in out1["layers"]]
    _check_estargz_image(registry, registry.ref("conv/other-repo", "v1"), tmp_path)


def test_prioritize_file(registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = image([layer(["app/", ("app/a", b"a" * 100), ("app/main", b"m" * 100), ("z", b"z")])])
    _push(registry, "conv/prio", "v1", img)
    prio = tmp_path / "prio.txt"
    prio.write_text("# start-up files\n/app/main\nz\n")
    _convert(capsys, registry.ref("conv/prio", "v1"), registry.ref("conv/prio-esgz", "v1"), "--prioritize",
             str(prio))
    m = _check_estargz_image(registry, registry.ref("conv/prio-esgz", "v1"), tmp_path)
    with _client(registry) as c:
        r = ImageReference.parse(registry.ref("conv/prio-esgz", "v1"))
        blob = c.get_blob(r, m.layers[0].digest, m.layers[0].size)
    es = EStargz.open(lambda o, n: blob[o : o + n], len(blob))
    assert es.prefetch == ["app", "app/main", "z"]


def test_a_lying_source_publishes_nothing(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    good = layer([("f", b"x" * 100)])
    img = image([good])
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"] = ["sha256:" + "3" * 64]
    bad = image([good])
    bad.config = json.dumps(cfg).encode()
    bad.manifest = json.dumps({**json.loads(bad.manifest), "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": "sha256:" + hashlib.sha256(bad.config).hexdigest(), "size": len(bad.config)}}).encode()
    _push(registry, "conv/liar", "v1", bad)
    rc = cli_main(["convert", "--progress", "plain", registry.ref("conv/liar", "v1"),
                   registry.ref("conv/liar-esgz", "v1")])
    assert rc == IntegrityError.exit_code
    with _client(registry) as c, pytest.raises(NotFoundError, match="not found"):
        c.get_manifest(ImageReference.parse(registry.ref("conv/liar-esgz", "v1")))


def test_convert_with_token_auth_never_leaks_the_password(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import base64
    import logging

    from cvmfs_snap_devenv.registry import start_registry
    from tests.support.token_issuer import start_token_issuer

    secret = "c0nvert-Very-Secret-pw"
    root = tmp_path / "reg"
    img = image([layer([("etc/motd", b"hello\n")]), layer([("big", b"b" * 300_000)])])
    with start_registry(root) as plain:
        _push(plain, "private/app", "v1", img)
    cfg = tmp_path / "config.json"
    with start_token_issuer(tmp_path / "issuer", users={"bob": secret}, allow_anonymous=False) as issuer, \
            start_registry(root, issuer.registry_auth_config()) as reg:
        cfg.write_text(json.dumps({"auths": {f"http://{reg.host}": {
            "auth": base64.b64encode(f"bob:{secret}".encode()).decode()}}}))
        caplog.set_level(logging.DEBUG)
        out = _convert(capsys, reg.ref("private/app", "v1"), reg.ref("private/app-esgz", "v1"),
                       "--docker-config", str(cfg))
        assert len(out["layers"]) == 2
        assert ("bob", "repository:private/app-esgz:pull,push") in issuer.requests
        assert ("bob", "repository:private/app:pull") in issuer.requests
        # anonymous: refused with a clear error, nothing pushed
        (tmp_path / "none.json").write_text("{}")
        rc = cli_main(["convert", "--progress", "plain", "--docker-config", str(tmp_path / "none.json"),
                       reg.ref("private/app", "v1"), reg.ref("private/app-anon", "v1")])
        assert rc == AuthError.exit_code and "needs credentials" in caplog.text
    assert secret not in caplog.text and secret not in capsys.readouterr().err


def test_chunked_upload_streams_in_pieces_and_the_registry_checks_the_digest(registry: Registry) -> None:
    ref = ImageReference.parse(registry.ref("conv/upload", "v1"))
    data = bytes(range(256)) * 40  # 10240 bytes: 10 PATCHes of 1000 and the rest in the PUT
    with _client(registry) as c:
        p = OciPusher(c)
        up = p.start_upload(ref, chunk_size=1000)
        for i in range(0, len(data), 333):
            up.write(data[i : i + 333])
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        up.commit(digest)
        assert c.get_blob(ref, digest, len(data)) == data and p.blob_exists(ref, digest)
        bad = p.start_upload(ref, chunk_size=1000)
        bad.write(data[:3000])
        with pytest.raises(InvalidInputError, match=r"rejected the request .*HTTP 400"):
            bad.commit("sha256:" + "4" * 64)
        assert not p.blob_exists(ref, "sha256:" + "4" * 64)


class _ThreadsHashing:
    """A ``hash_factory`` that counts the bytes each thread feeds the layer streams' sha256s (source blob and tar)."""

    threads: dict[str, int] = {}

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: bytes, /) -> None:
        import threading

        name = threading.current_thread().name
        _ThreadsHashing.threads[name] = _ThreadsHashing.threads.get(name, 0) + len(data)
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def test_with_workers_the_source_is_decoded_and_hashed_beside_the_tar_parser(
        registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import random

    from cvmfs_snap.layer import digesting

    data = [layer([(f"l{k}/f{i}", random.Random(k * 100 + i).randbytes(50_000) * 3) for i in range(20)])
            for k in range(4)]
    _push(registry, "conv/threads", "v1", image(data))
    monkeypatch.setattr(digesting, "hash_factory", _ThreadsHashing)
    _ThreadsHashing.threads = {}
    out = _convert(capsys, registry.ref("conv/threads", "v1"), registry.ref("conv/threads-esgz", "v1"),
                   "--workers", "2", "--chunk-size", "65536")
    assert len(out["layers"]) == 4
    # download + sha256 + inflate + sha256 of each source layer ran on its read-ahead thread, not the tar parser's
    # (which only sniffs the first 512 bytes of each blob)
    ahead = sum(n for t, n in _ThreadsHashing.threads.items() if t.startswith("readahead"))
    assert ahead > 12_000_000 and sum(_ThreadsHashing.threads.values()) - ahead <= 4 * 512
    m = _check_estargz_image(registry, registry.ref("conv/threads-esgz", "v1"), tmp_path)  # layers in order
    assert [d.digest for d in m.layers] == [lay["digest"] for lay in out["layers"]]
    _ThreadsHashing.threads = {}
    _convert(capsys, registry.ref("conv/threads", "v1"), registry.ref("conv/threads-w1", "v1"), "--workers", "1",
             "--chunk-size", "65536")
    assert len(_ThreadsHashing.threads) == 1  # one worker: one thread does everything
    with _client(registry) as c:  # and the same image, byte for byte
        assert c.get_manifest(ImageReference.parse(registry.ref("conv/threads-w1", "v1"))).digest == out["digest"]


def test_a_corrupt_layer_among_several_fails_cleanly_with_workers(registry: Registry,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses
    import threading

    good = [layer([(f"g{k}", bytes([k]) * 300_000)]) for k in range(4)]
    bad = bytearray(good[2].blob)
    bad[len(bad) // 2 : len(bad) // 2 + 32] = b"\xff" * 32
    img = image([good[0], good[1], dataclasses.replace(good[2], blob=bytes(bad)), good[3]])
    _push(registry, "conv/corrupt", "v1", img)
    before = {t.ident for t in threading.enumerate()}
    capsys.readouterr()
    rc = cli_main(["convert", "--progress", "plain", "--workers", "2", registry.ref("conv/corrupt", "v1"),
                   registry.ref("conv/corrupt-esgz", "v1")])
    assert rc == InvalidInputError.exit_code
    assert f"layer {img.layers[2].digest}" in caplog.text and "corrupt gzip data" in caplog.text
    with _client(registry) as c, pytest.raises(NotFoundError, match="not found"):
        c.get_manifest(ImageReference.parse(registry.ref("conv/corrupt-esgz", "v1")))
    assert {t.ident for t in threading.enumerate() if t.is_alive()} <= before


def test_a_failed_layer_stops_the_one_beside_it_before_it_commits(registry: Registry,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """With workers, the next layer starts beside a failing one; it stops at its next read, its upload dropped."""
    import dataclasses
    import random

    first = layer([("a", random.Random(1).randbytes(200_000))])
    bad = bytearray(first.blob)
    bad[100:132] = b"\xff" * 32  # near the start: the inflater fails early
    rest = [layer([(f"r{k}/f{i}", random.Random(k * 10 + i).randbytes(400_000)) for i in range(8)])
            for k in range(3)]
    _push(registry, "conv/first-bad", "v1", image([dataclasses.replace(first, blob=bytes(bad)), *rest]))
    capsys.readouterr()
    rc = cli_main(["convert", "--progress", "plain", "--workers", "2", registry.ref("conv/first-bad", "v1"),
                   registry.ref("conv/first-bad-esgz", "v1")])
    assert rc == InvalidInputError.exit_code
    links = registry.root / "data/docker/registry/v2/repositories/conv/first-bad-esgz/_layers"
    assert not links.exists() or not any(links.rglob("link"))  # no converted layer was committed
