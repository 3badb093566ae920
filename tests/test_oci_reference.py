"""Pure parts of the OCI client: references, platforms, manifest validation, credentials, header parsing."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from cvmfs_snap.errors import InvalidInputError, NotFoundError
from cvmfs_snap.oci import (
    Credentials,
    CredentialStore,
    Descriptor,
    ImageReference,
    Index,
    Manifest,
    Platform,
    validate_digest,
)
from cvmfs_snap.oci.auth import TokenCache, parse_www_authenticate
from cvmfs_snap.oci.manifest import compute_digest, parse_manifest
from cvmfs_snap.oci.ranges import merge_ranges, parse_multipart_byteranges
from cvmfs_snap.oci.transport import is_loopback
from cvmfs_snap_devenv import images as im
from tests.support.http_servers import byteranges_reply

D = "sha256:" + "ab" * 32
D2 = "sha256:" + "cd" * 32

# text -> (registry, repository, tag, digest, api_host, str, insecure)
GOOD = [
    ("ubuntu", ("docker.io", "library/ubuntu", "latest", None, "registry-1.docker.io",
                "docker.io/library/ubuntu:latest", False)),
    ("ubuntu:22.04", ("docker.io", "library/ubuntu", "22.04", None, "registry-1.docker.io",
                      "docker.io/library/ubuntu:22.04", False)),
    ("library/ubuntu", ("docker.io", "library/ubuntu", "latest", None, "registry-1.docker.io",
                        "docker.io/library/ubuntu:latest", False)),
    ("atlas/athanalysis:21.2", ("docker.io", "atlas/athanalysis", "21.2", None, "registry-1.docker.io",
                                "docker.io/atlas/athanalysis:21.2", False)),
    ("docker.io/ubuntu", ("docker.io", "library/ubuntu", "latest", None, "registry-1.docker.io",
                          "docker.io/library/ubuntu:latest", False)),
    ("index.docker.io/library/alpine:3", ("index.docker.io", "library/alpine", "3", None, "registry-1.docker.io",
                                          "index.docker.io/library/alpine:3", False)),
    ("registry.hub.docker.com/library/centos:centos7",
     ("registry.hub.docker.com", "library/centos", "centos7", None, "registry-1.docker.io",
      "registry.hub.docker.com/library/centos:centos7", False)),
    ("https://registry.hub.docker.com/library/centos:centos7",
     ("registry.hub.docker.com", "library/centos", "centos7", None, "registry-1.docker.io",
      "registry.hub.docker.com/library/centos:centos7", False)),
    ("registry.hub.docker.com/centos", ("registry.hub.docker.com", "library/centos", "latest", None,
                                        "registry-1.docker.io", "registry.hub.docker.com/library/centos:latest",
                                        False)),
    ("http://registry.example.org:5000/a/b", ("registry.example.org:5000", "a/b", "latest", None,
                                              "registry.example.org:5000", "registry.example.org:5000/a/b:latest",
                                              True)),
    ("localhost:5000/x", ("localhost:5000", "x", "latest", None, "localhost:5000", "localhost:5000/x:latest", False)),
    ("localhost/x:1", ("localhost", "x", "1", None, "localhost", "localhost/x:1", False)),
    ("127.0.0.1:5000/a/b/c/d:v1.2-rc_3", ("127.0.0.1:5000", "a/b/c/d", "v1.2-rc_3", None, "127.0.0.1:5000",
                                          "127.0.0.1:5000/a/b/c/d:v1.2-rc_3", False)),
    ("[::1]:5000/x", ("[::1]:5000", "x", "latest", None, "[::1]:5000", "[::1]:5000/x:latest", False)),
    ("gitlab-registry.cern.ch/linuxsupport/alma9-base",
     ("gitlab-registry.cern.ch", "linuxsupport/alma9-base", "latest", None, "gitlab-registry.cern.ch",
      "gitlab-registry.cern.ch/linuxsupport/alma9-base:latest", False)),
    (f"ubuntu@{D}", ("docker.io", "library/ubuntu", None, D, "registry-1.docker.io",
                     f"docker.io/library/ubuntu@{D}", False)),
    (f"ghcr.io/o/r:t@{D}", ("ghcr.io", "o/r", "t", D, "ghcr.io", f"ghcr.io/o/r:t@{D}", False)),
    (f"host:1/r@{D}", ("host:1", "r", None, D, "host:1", f"host:1/r@{D}", False)),
    ("a.b/c__d.e-f---g", ("a.b", "c__d.e-f---g", "latest", None, "a.b", "a.b/c__d.e-f---g:latest", False)),
    ("Registry.Example.org/x", ("registry.example.org", "x", "latest", None, "registry.example.org",
                                "registry.example.org/x:latest", False)),
    ("LOCALHOST:5000/x", ("localhost:5000", "x", "latest", None, "localhost:5000", "localhost:5000/x:latest", False)),
    ("[::ABCD]:5000/x", ("[::abcd]:5000", "x", "latest", None, "[::abcd]:5000", "[::abcd]:5000/x:latest", False)),
    ("Docker.IO/ubuntu", ("docker.io", "library/ubuntu", "latest", None, "registry-1.docker.io",
                          "docker.io/library/ubuntu:latest", False)),
    ("  ubuntu  ", ("docker.io", "library/ubuntu", "latest", None, "registry-1.docker.io",
                    "docker.io/library/ubuntu:latest", False)),
]


@pytest.mark.parametrize(("text", "want"), GOOD, ids=[g[0] for g in GOOD])
def test_parse_good_references(text: str, want: tuple[object, ...]) -> None:
    ref = ImageReference.parse(text)
    got = (ref.registry, ref.repository, ref.tag, ref.digest, ref.api_host, str(ref), ref.insecure)
    assert got == want
    # the canonical form parses back to the same reference
    assert ImageReference.parse(str(ref)) == ref


BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("Ubuntu", "lower case"),
    ("docker.io/Library/ubuntu", "lower case"),
    ("ubuntu:", "invalid tag"),
    ("ubuntu:-x", "invalid tag"),
    ("ubuntu:a/b", "invalid registry host"),  # 'ubuntu:a' looks like host:port, but the port is not numeric
    ("ubuntu:bad!tag", "invalid tag"),
    ("ubuntu:" + "t" * 129, "invalid tag"),
    ("ubuntu@sha256:abc", "64 hex"),
    ("ubuntu@sha256:" + "AB" * 32, "invalid digest"),
    ("ubuntu@md5:" + "ab" * 16, "unsupported digest algorithm"),
    ("ubuntu@" + "ab" * 32, "invalid digest"),
    ("a//b", "invalid repository name component"),
    ("a/b/", "invalid repository name component"),
    ("host:5000/", "invalid repository name component"),
    ("x/-a", "invalid repository name component"),
    ("x/a..b", "invalid repository name component"),
    ("x/a_-b", "invalid repository name component"),
    ("ftp://host/x", "http:// and https://"),
    ("ubuntu latest", "white space"),
    ("bad_host.org/x", "invalid registry host"),
    ("h.org/" + "a" * 250, "longer than 255"),
    (":tag", "no repository"),
    ("@" + D, "no repository"),
]


@pytest.mark.parametrize(("text", "msg"), BAD, ids=[b[0][:40] or "empty" for b in BAD])
def test_parse_bad_references(text: str, msg: str) -> None:
    with pytest.raises(InvalidInputError, match=msg):
        ImageReference.parse(text)


def test_with_tag_and_digest() -> None:
    ref = ImageReference.parse("localhost:5000/a/b:v1")
    assert str(ref.with_tag("v2")) == "localhost:5000/a/b:v2"
    pinned = ref.with_digest(D)
    assert str(pinned) == f"localhost:5000/a/b:v1@{D}"
    assert pinned.reference == D
    assert ref.reference == "v1"
    assert ref.with_digest(D).with_tag("x").digest is None
    with pytest.raises(InvalidInputError):
        ref.with_digest("sha256:nothex")
    with pytest.raises(InvalidInputError):
        ref.with_tag("no/slash")


def test_validators_match_the_whole_string() -> None:
    """A tag from a webhook or a tag list ending in a newline is refused with a clear error (it used to pass the
    `$`-anchored check and reach httpx as an unexpected error); so is a digest with one."""
    ref = ImageReference.parse("localhost:5000/a/b:v1")
    for tag in ("v2\n", "v2\r\n", "\nv2", "v2\x00"):
        with pytest.raises(InvalidInputError, match="invalid tag"):
            ref.with_tag(tag)
    for digest in (D + "\n", "\n" + D, "sha256\n:" + "ab" * 32):
        with pytest.raises(InvalidInputError, match="invalid digest"):
            validate_digest(digest)
        with pytest.raises(InvalidInputError, match="invalid digest"):
            ref.with_digest(digest)
    with pytest.raises(InvalidInputError, match="invalid tag"):
        ref.with_tag(None)  # type: ignore[arg-type]


def test_registry_host_has_one_spelling() -> None:
    """`LOCALHOST:5000` and `LocalHost:5000` are one registry: equal references, one name (metadata path)."""
    spellings = ["LOCALHOST:5000/a/b:v1", "LocalHost:5000/a/b:v1", "localhost:5000/a/b:v1",
                 "http://LocalHost:5000/a/b:v1"]
    refs = [ImageReference.parse(s) for s in spellings]
    assert {r.name for r in refs} == {"localhost:5000/a/b"}
    assert len(set(refs)) == 1
    # built directly (e.g. from a webhook's host field), the spelling is canonical too
    assert ImageReference("LocalHost:5000", "a/b", "v1") == refs[0]
    assert ImageReference("LocalHost:5000", "a/b", "v1").registry == "localhost:5000"


# ---------------------------------------------------------------- platforms

@pytest.mark.parametrize(("wanted", "offered", "ok"), [
    ("linux/amd64", "linux/amd64", True),
    ("linux/amd64", "linux/arm64", False),
    ("linux/amd64", "windows/amd64", False),
    ("linux/arm64", "linux/arm64/v8", True),
    ("linux/arm64", "linux/arm64", True),
    ("linux/arm64/v8", "linux/arm64", True),
    ("linux/arm64/v8", "linux/arm64/v8", True),
    ("linux/arm/v7", "linux/arm/v6", False),
    ("linux/arm/v7", "linux/arm", True),
    ("linux/arm", "linux/arm/v6", True),
    ("linux/x86_64", "linux/amd64", True),
    ("linux/aarch64", "linux/arm64/v8", True),
    ("linux/ppc64le", "linux/ppc64le", True),
])
def test_platform_matching(wanted: str, offered: str, ok: bool) -> None:
    assert Platform.parse(wanted).matches(Platform.parse(offered)) is ok


def test_platform_parse_and_str() -> None:
    assert str(Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    assert Platform.parse("Linux/AMD64") == Platform("linux", "amd64", "")
    assert str(Platform("linux", "amd64")) == "linux/amd64"
    for bad in ("linux", "linux/", "/amd64", "a/b/c/d", ""):
        with pytest.raises(InvalidInputError, match="invalid platform"):
            Platform.parse(bad)
    assert Platform.host().os == "linux"


def _index_of(plats: list[str]) -> Index:
    body = json.dumps({"schemaVersion": 2, "mediaType": im.OCI_INDEX, "manifests": [
        {"mediaType": im.OCI_MANIFEST, "digest": "sha256:" + f"{i:02x}" * 32, "size": 10,
         "platform": dict(zip(("os", "architecture", "variant"), p.split("/"), strict=False))}
        for i, p in enumerate(plats)]}).encode()
    obj = parse_manifest(body, "", "test/index")
    assert isinstance(obj, Index)
    return obj


def test_index_select_prefers_exact_variant() -> None:
    idx = _index_of(["linux/amd64", "linux/arm/v6", "linux/arm/v7", "linux/arm64/v8", "unknown/unknown"])
    assert idx.select(Platform.parse("linux/arm64")).digest == "sha256:" + "03" * 32
    assert idx.select(Platform.parse("linux/arm/v7")).digest == "sha256:" + "02" * 32
    assert idx.select(Platform.parse("linux/arm")).digest == "sha256:" + "01" * 32
    assert [str(p) for p in idx.platforms()] == ["linux/amd64", "linux/arm/v6", "linux/arm/v7", "linux/arm64/v8"]
    with pytest.raises(NotFoundError, match=r"linux/s390x.*available: linux/amd64, linux/arm/v6"):
        idx.select(Platform.parse("linux/s390x"), "img:1")


# ---------------------------------------------------------------- manifest validation

def _manifest(**over: object) -> bytes:
    obj: dict[str, object] = {
        "schemaVersion": 2, "mediaType": im.OCI_MANIFEST,
        "config": {"mediaType": im.OCI_CONFIG, "digest": D, "size": 5},
        "layers": [{"mediaType": im.OCI_LAYER_GZIP, "digest": D2, "size": 7, "annotations": {"a": "b"},
                    "urls": ["https://x/y"]}],
    }
    for k, v in over.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    return json.dumps(obj).encode()


def test_parse_valid_manifest_and_descriptor_fields() -> None:
    raw = _manifest(annotations={"org.opencontainers.image.ref.name": "x"})
    m = parse_manifest(raw, "application/json", "img:1")
    assert isinstance(m, Manifest)
    assert m.digest == compute_digest(raw)
    assert m.raw == raw
    assert m.config == Descriptor(im.OCI_CONFIG, D, 5)
    assert m.layers[0].annotations == {"a": "b"} and m.layers[0].urls == ("https://x/y",)
    assert m.annotations == {"org.opencontainers.image.ref.name": "x"}
    # mediaType may be left out (OCI): the Content-Type decides, or the shape
    m2 = parse_manifest(_manifest(mediaType=None), im.DOCKER_MANIFEST, "img:1")
    assert isinstance(m2, Manifest) and m2.media_type == im.DOCKER_MANIFEST
    m3 = parse_manifest(_manifest(mediaType=None), "", "img:1")
    assert m3.media_type == im.OCI_MANIFEST


@pytest.mark.parametrize(("raw", "msg"), [
    (b"<html>nope</html>", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (_manifest(schemaVersion=3), "schemaVersion 3"),
    (_manifest(schemaVersion=None), "schemaVersion None"),
    (_manifest(config=None), "no 'config'"),
    (_manifest(layers=None), "no 'layers'"),
    (_manifest(layers={"x": 1}), "no 'layers'"),
    (_manifest(config={"mediaType": "x", "digest": "sha256:123", "size": 1}), "invalid digest"),
    (_manifest(layers=[{"mediaType": "x", "digest": "../../etc/passwd", "size": 1}]), "invalid digest"),
    (_manifest(layers=[{"mediaType": "x", "digest": D, "size": -1}]), "no valid size"),
    (_manifest(layers=[{"mediaType": "x", "digest": D}]), "no valid size"),
    (_manifest(layers=["nope"]), "not a JSON object"),
    (_manifest(mediaType="application/vnd.example.thing+json"), "unknown manifest media type"),
    (_manifest(annotations={"a": 1}), "annotations"),
    (json.dumps({"schemaVersion": 2, "mediaType": im.OCI_INDEX, "manifests": [
        {"mediaType": im.OCI_MANIFEST, "digest": D, "size": 3, "platform": {"os": "linux"}}]}).encode(),
     "platform"),
    (json.dumps({"schemaVersion": 2, "mediaType": im.OCI_INDEX}).encode(), "no 'manifests'"),
])
def test_parse_broken_manifests(raw: bytes, msg: str) -> None:
    with pytest.raises(InvalidInputError, match=msg) as ei:
        parse_manifest(raw, "", "registry.example.org/img:1")
    assert "registry.example.org/img:1" in str(ei.value)


def test_schema1_is_refused_with_advice() -> None:
    raw = json.dumps({"schemaVersion": 1, "name": "x", "tag": "1", "fsLayers": []}).encode()
    for ctype in ("application/vnd.docker.distribution.manifest.v1+prettyjws", ""):
        with pytest.raises(InvalidInputError, match=r"schema 1.*convert the image"):
            parse_manifest(raw, ctype, "old/img:1")


def test_oversized_manifest_refused() -> None:
    with pytest.raises(InvalidInputError, match="more than"):
        parse_manifest(b" " * (4 * 1024 * 1024 + 1), "", "big:1")


# ---------------------------------------------------------------- credentials

def test_docker_config_credentials(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hub:pass").decode()},
        "registry.example.org": {"username": "alice", "password": "s3cret"},
        "http://127.0.0.1:5000": {"auth": base64.b64encode(b"bob:pw").decode()},
        "https://gitlab-registry.cern.ch/v2/": {"identitytoken": "tok"},
        "broken.example.org": {"auth": "!!notbase64"},
        "empty.example.org": {},
    }, "credHelpers": {"gcr.io": "gcloud"}}))
    store = CredentialStore.from_docker_config(cfg)
    assert store.get("docker.io") == Credentials("hubuser", "hub:pass")
    assert store.get("registry-1.docker.io") == Credentials("hubuser", "hub:pass")
    assert store.get("registry.hub.docker.com") == Credentials("hubuser", "hub:pass")
    assert store.get("Registry.Example.org") == Credentials("alice", "s3cret")
    assert store.get("127.0.0.1:5000") == Credentials("bob", "pw")
    assert store.get("127.0.0.1:5001") is None
    assert store.get("gitlab-registry.cern.ch") == Credentials("<token>", "tok")
    assert store.get("broken.example.org") is None and store.get("empty.example.org") is None
    # secrets never show in reprs
    for text in (repr(store), str(store.get("registry.example.org")), repr(store.get("docker.io"))):
        assert "s3cret" not in text and "hub:pass" not in text


def test_docker_config_missing_and_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        CredentialStore.from_docker_config(tmp_path / "nope.json")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-such-dir"))
    assert CredentialStore.from_docker_config(None).hosts() == []
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        CredentialStore.from_docker_config(tmp_path / "bad.json")
    d = tmp_path / "dcfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"auths": {"h.org": {"username": "u", "password": "p"}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    assert CredentialStore.from_docker_config().get("h.org") == Credentials("u", "p")


def test_www_authenticate_parsing() -> None:
    chs = parse_www_authenticate([
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull"',
        'Basic realm="Registry Realm", Bearer realm="http://x/t" , service=svc',
    ])
    assert [c.scheme for c in chs] == ["bearer", "basic", "bearer"]
    assert chs[0].params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                             "scope": "repository:a/b:pull"}
    assert chs[1].params == {"realm": "Registry Realm"}
    assert chs[2].params == {"realm": "http://x/t", "service": "svc"}


def test_token_cache_expiry_and_invalidate() -> None:
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put("h", "s", "t1", 60)
    assert cache.get("h", "s") == "t1"
    now[0] += 49
    assert cache.get("h", "s") == "t1"
    now[0] += 2  # within the renewal margin before expiry
    assert cache.get("h", "s") is None
    cache.put("h", "s", "t2", 0)  # no expires_in -> the default 60 s
    assert cache.get("h", "s") == "t2"
    cache.invalidate("h", "s", "other")
    assert cache.get("h", "s") == "t2"
    cache.invalidate("h", "s", "t2")
    assert cache.get("h", "s") is None


# ---------------------------------------------------------------- small helpers

def test_loopback_detection() -> None:
    for h in ("localhost", "localhost:5000", "127.0.0.1", "127.0.0.1:80", "127.9.8.7:1", "[::1]:5000", "::1"):
        assert is_loopback(h), h
    for h in ("registry.example.org", "10.0.0.1:5000", "[2001:db8::1]:5000", "localhost.example.org"):
        assert not is_loopback(h), h


def test_multipart_byteranges_parser_and_merge() -> None:
    blob = bytes(range(256)) * 4
    # the boundary string inside the data must not confuse the parser
    blob = blob[:100] + b"--CVMFS_SNAP_BOUNDARY\r\n" + blob[100:]
    rep = byteranges_reply(blob, [(0, 9), (95, 140), (500, 500)])
    parts = parse_multipart_byteranges(rep.body, rep.headers["Content-Type"])
    assert parts == [(0, 9, blob[0:10]), (95, 140, blob[95:141]), (500, 500, blob[500:501])]
    with pytest.raises(ValueError):
        parse_multipart_byteranges(rep.body[:-40], rep.headers["Content-Type"])
    with pytest.raises(ValueError):
        parse_multipart_byteranges(rep.body, "multipart/byteranges")
    assert merge_ranges([(10, 5), (0, 5), (5, 5), (100, 1), (12, 20), (50, 0)]) == [(0, 32), (100, 101)]
