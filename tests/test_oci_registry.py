"""RegistryClient against the real docker-registry on loopback: manifests, platforms, blobs, ranges, tags."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from cvmfs_snap.errors import IntegrityError, InvalidInputError, NotFoundError
from cvmfs_snap.oci import ImageReference, Index, Manifest, Platform, RegistryClient
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry


@pytest.fixture(scope="module")
def pusher(registry: Registry) -> Iterator[im.Pusher]:
    p = im.Pusher(registry.url)
    yield p
    p.close()


def _ref(registry: Registry, repo: str, tag: str = "latest") -> ImageReference:
    return ImageReference.parse(registry.ref(repo, tag))


def _imgs() -> tuple[im.BuiltImage, im.BuiltImage, im.BuiltImage]:
    amd = im.image([im.layer([("etc/arch", b"amd64\n")])], architecture="amd64")
    arm = im.image([im.layer([("etc/arch", b"arm64\n")])], architecture="arm64", variant="v8")
    arm7 = im.image([im.layer([("etc/arch", b"armv7\n")])], architecture="arm", variant="v7")
    return amd, arm, arm7


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker"])
def test_single_manifest_kinds(registry: Registry, pusher: im.Pusher, client: RegistryClient, docker: bool) -> None:
    lay1 = im.layer([("a/one", b"1" * 100)])
    lay2 = im.layer([("b/two", b"2" * 100)], codec="zstd")
    img = im.image([lay1, lay2], docker=docker)
    repo = f"oci/single-{'docker' if docker else 'oci'}"
    digest = pusher.image(repo, "v1", img)
    ref = _ref(registry, repo, "v1")

    m = client.get_manifest(ref)
    assert isinstance(m, Manifest)
    assert m.media_type == (im.DOCKER_MANIFEST if docker else im.OCI_MANIFEST)
    assert m.digest == digest and m.raw == img.manifest
    assert m.config.digest == img.config_digest and m.config.size == len(img.config)
    assert [(d.digest, d.size, d.media_type) for d in m.layers] == [
        (lay1.digest, len(lay1.blob), lay1.media_type), (lay2.digest, len(lay2.blob), lay2.media_type)]

    # by digest: same manifest, digest verified
    assert client.get_manifest(ref.with_digest(digest)).raw == img.manifest
    man, idx = client.resolve(ref)
    assert idx is None and man.digest == digest
    assert client.list_platforms(ref) == [Platform("linux", "amd64")]
    assert client.get_blob(ref, m.config.digest, size=m.config.size) == img.config


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
def test_index_kinds_and_platform_selection(registry: Registry, pusher: im.Pusher, client: RegistryClient,
                                            docker: bool) -> None:
    amd, arm, arm7 = _imgs()
    if docker:
        amd, arm, arm7 = (im.image(i.layers, architecture=a, variant=v, docker=True)
                          for i, a, v in ((amd, "amd64", None), (arm, "arm64", "v8"), (arm7, "arm", "v7")))
    plats = [{"os": "linux", "architecture": "amd64"},
             {"os": "linux", "architecture": "arm64", "variant": "v8"},
             {"os": "linux", "architecture": "arm", "variant": "v7"}]
    repo = f"oci/multi-{'docker' if docker else 'oci'}"
    idx_digest = pusher.multiarch(repo, "v1", list(zip((amd, arm, arm7), plats, strict=True)), docker=docker)
    ref = _ref(registry, repo, "v1")

    idx = client.get_manifest(ref)
    assert isinstance(idx, Index)
    assert idx.media_type == (im.DOCKER_LIST if docker else im.OCI_INDEX)
    assert idx.digest == idx_digest
    assert [d.digest for d in idx.manifests] == [amd.manifest_digest, arm.manifest_digest, arm7.manifest_digest]
    assert [str(p) for p in client.list_platforms(ref)] == ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"]

    for wanted, img in (("linux/amd64", amd), ("linux/arm64", arm), ("linux/arm64/v8", arm),
                        ("linux/arm/v7", arm7)):
        man, got_idx = client.resolve(ref, platform=Platform.parse(wanted))
        assert man.digest == img.manifest_digest, wanted
        assert got_idx is not None and got_idx.digest == idx_digest
    # a digest-pinned index reference resolves the same way
    man, _ = client.resolve(ref.with_digest(idx_digest), platform=Platform.parse("linux/arm64"))
    assert man.digest == arm.manifest_digest
    with pytest.raises(NotFoundError, match=r"linux/s390x.*linux/amd64"):
        client.resolve(ref, platform=Platform.parse("linux/s390x"))


def test_not_found(registry: Registry, pusher: im.Pusher, client: RegistryClient) -> None:
    img = im.image([im.layer([("x", b"x")])])
    pusher.image("oci/nf", "v1", img)
    with pytest.raises(NotFoundError, match=r"oci/nf:nope.*MANIFEST_UNKNOWN"):
        client.get_manifest(_ref(registry, "oci/nf", "nope"))
    with pytest.raises(NotFoundError, match="no-such-repo"):
        client.get_manifest(_ref(registry, "oci/no-such-repo"))
    missing = "sha256:" + "0" * 64
    with pytest.raises(NotFoundError, match=missing):
        client.get_blob(_ref(registry, "oci/nf", "v1"), missing, size=1)
    with pytest.raises(NotFoundError):
        client.get_manifest(_ref(registry, "oci/nf").with_digest(missing))


def test_blob_streaming_and_size_check(registry: Registry, pusher: im.Pusher, client: RegistryClient) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    lay = im.layer([("big", data)], codec="plain")
    img = im.image([lay])
    pusher.image("oci/blob", "v1", img)
    ref = _ref(registry, "oci/blob", "v1")

    got = bytearray()
    with client.open_blob(ref, lay.digest, size=len(lay.blob)) as stream:
        while chunk := stream.read(64 * 1024 + 3):
            got += chunk
        assert stream.verified and stream.bytes_read == len(lay.blob)
    assert bytes(got) == lay.blob

    # a descriptor that disagrees with the registry's size is refused before any data is used
    with pytest.raises(IntegrityError, match="descriptor says"):
        client.open_blob(ref, lay.digest, size=len(lay.blob) - 1)
    # works as a file object for readers that use readinto (gzip, tarfile, shutil)
    import io
    with client.open_blob(ref, lay.digest) as stream:
        buffered = io.BufferedReader(stream)
        assert buffered.read() == lay.blob
    with pytest.raises(InvalidInputError, match="open_blob"):
        client.get_blob(ref, lay.digest, size=len(lay.blob), max_size=1024)
    with pytest.raises(InvalidInputError, match="invalid digest"):
        client.open_blob(ref, "sha256:../../x")


def test_range_reads_single_and_multi(registry: Registry, pusher: im.Pusher, client: RegistryClient) -> None:
    blob = os.urandom(200_000)
    digest = pusher.blob("oci/ranges", blob)
    ref = _ref(registry, "oci/ranges")

    assert client.read_range(ref, digest, 1000, 10) == blob[1000:1010]
    assert client.range_support(ref).single is True
    assert client.read_range(ref, digest, 0, 0) == b""
    # a range that runs past the end returns what there is
    assert client.read_range(ref, digest, 199_990, 100) == blob[199_990:]
    with pytest.raises(InvalidInputError, match="beyond the end"):
        client.read_range(ref, digest, 300_000, 10)
    with pytest.raises(InvalidInputError, match="invalid range"):
        client.read_range(ref, digest, -1, 10)

    # docker-registry (Go's http.ServeContent) answers multi-range requests with multipart/byteranges;
    # overlapping and out-of-order ranges are coalesced and returned in the order asked
    ranges = [(150_000, 5000), (10, 20), (0, 5), (20, 30), (199_999, 1), (3, 2)]
    got = client.read_ranges(ref, digest, ranges)
    assert got == [blob[o:o + n] for o, n in ranges]
    assert client.range_support(ref).multi is True


def test_tags_pagination(registry: Registry, pusher: im.Pusher, client: RegistryClient) -> None:
    img = im.image([im.layer([("t", b"t")])])
    tags = sorted(f"t{i}" for i in range(7))
    for t in tags:
        pusher.image("oci/tags", t, img)
    ref = _ref(registry, "oci/tags")
    assert sorted(client.list_tags(ref)) == tags
    # docker-registry 2.8 ignores ?n= for tag lists (it pages only /v2/_catalog) and sends all tags at once,
    # unsorted; a page size must still give the complete list. Link pagination itself is tested in
    # test_oci_faults.py against a server that pages.
    assert sorted(client.list_tags(ref, page_size=2)) == tags
    with pytest.raises(NotFoundError):
        client.list_tags(_ref(registry, "oci/no-tags-here"))


def test_localhost_name_uses_plain_http(registry: Registry, pusher: im.Pusher, client: RegistryClient) -> None:
    img = im.image([im.layer([("l", b"l")])])
    digest = pusher.image("oci/localhost", "v1", img)
    port = registry.host.rsplit(":", 1)[1]
    m = client.get_manifest(ImageReference.parse(f"localhost:{port}/oci/localhost:v1"))
    assert m.digest == digest
    # as DUCC recipes write it
    assert client.get_manifest(ImageReference.parse(f"http://{registry.host}/oci/localhost:v1")).digest == digest
    # non-loopback hosts get HTTPS unless configured insecure; http:// alone does not make a host insecure
    assert client.base_url(ImageReference.parse("registry.example.org/x")) == "https://registry.example.org"
    with pytest.raises(InvalidInputError, match="not configured as an insecure registry"):
        client.base_url(ImageReference.parse("http://registry.example.org/x"))
    with RegistryClient(insecure_registries=["Registry.Example.org:5000"]) as c2:
        assert c2.base_url(ImageReference.parse("registry.example.org:5000/x")).startswith("http://")
        assert c2.base_url(ImageReference.parse("http://registry.example.org:5000/x")).startswith("http://")
        assert c2.base_url(ImageReference.parse("registry.example.org/x")).startswith("https://")
    assert client.base_url(ImageReference.parse("ubuntu")) == "https://registry-1.docker.io"


def test_config_json_roundtrip(registry: Registry, pusher: im.Pusher, client: RegistryClient) -> None:
    """list_platforms of a single-arch image reads the platform from the config blob."""
    img = im.image([im.layer([("p", b"p")])], architecture="arm64", variant="v8")
    pusher.image("oci/plat", "v1", img)
    ref = _ref(registry, "oci/plat", "v1")
    assert client.list_platforms(ref) == [Platform("linux", "arm64", "v8")]
    cfg = json.loads(client.get_blob(ref, img.config_digest, size=len(img.config)))
    assert cfg["architecture"] == "arm64"
