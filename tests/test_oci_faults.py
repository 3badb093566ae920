"""RegistryClient against small scripted loopback servers, for behaviour a real registry will not show on demand:
tampered manifests, flaky and slow servers, redirects to another host, servers that page tags, and servers that
speak, refuse or ignore (multi-)range requests."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Iterator

import pytest

from cvmfs_snap.errors import IntegrityError, InvalidInputError, UnavailableError
from cvmfs_snap.oci import Credentials, CredentialStore, ImageReference, Manifest, RegistryClient
from cvmfs_snap.oci.manifest import compute_digest
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import free_port
from tests.support.http_servers import LoopbackServer, Reply, Request, byteranges_reply, parse_range_header, serve


def _client(**kw: object) -> RegistryClient:
    kw.setdefault("timeout", 5)
    kw.setdefault("retries", 3)
    kw.setdefault("sleep", lambda _s: None)
    return RegistryClient(**kw)  # type: ignore[arg-type]


@pytest.fixture
def sleeps() -> list[float]:
    return []


def _ref(server: LoopbackServer, rest: str) -> ImageReference:
    return ImageReference.parse(f"{server.host}/{rest}")


@pytest.fixture
def script() -> Iterator[Callable[[Callable[[Request], Reply]], LoopbackServer]]:
    """Start scripted servers; all stopped at the end of the test."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield lambda handler: stack.enter_context(serve(handler))


IMG = im.image([im.layer([("etc/x", b"x" * 50)])])


# ---------------------------------------------------------------- manifests

def test_tampered_manifest_is_rejected(script) -> None:  # type: ignore[no-untyped-def]
    good = IMG.manifest
    tampered = good.replace(b'"size"', b'"size" ', 1)
    srv = script(lambda r: Reply(200, {"Content-Type": im.OCI_MANIFEST}, tampered))
    with _client() as c:
        ref = _ref(srv, "t/img").with_digest(im.sha256(good))
        with pytest.raises(IntegrityError, match=rf"{im.sha256(tampered)}.*not the {im.sha256(good)}") as ei:
            c.get_manifest(ref)
        assert "t/img" in str(ei.value)
        # by tag, the digest is computed over the bytes received; a lying Docker-Content-Digest is caught
        m = c.get_manifest(_ref(srv, "t/img:v1"))
        assert isinstance(m, Manifest) and m.digest == im.sha256(tampered)

    srv2 = script(lambda r: Reply(200, {"Content-Type": im.OCI_MANIFEST, "Docker-Content-Digest": im.sha256(good)},
                                  tampered))
    with _client() as c, pytest.raises(IntegrityError, match="registry says its digest is"):
        c.get_manifest(_ref(srv2, "t/img:v1"))


def test_schema1_and_garbage_manifests(script) -> None:  # type: ignore[no-untyped-def]
    bodies = {
        "/v2/old/img/manifests/v1": (b'{"schemaVersion": 1, "name": "old/img", "fsLayers": []}',
                                     "application/vnd.docker.distribution.manifest.v1+prettyjws"),
        "/v2/bad/img/manifests/v1": (b"<html>login here</html>", "text/html"),
    }
    srv = script(lambda r: Reply(200, {"Content-Type": bodies[r.path][1]}, bodies[r.path][0]))
    with _client() as c:
        with pytest.raises(InvalidInputError, match=r"old/img:v1 uses the deprecated Docker schema 1.*convert"):
            c.get_manifest(_ref(srv, "old/img:v1"))
        with pytest.raises(InvalidInputError, match=r"bad/img:v1.*not valid JSON"):
            c.get_manifest(_ref(srv, "bad/img:v1"))
    accept = srv.requests[0].headers["accept"]
    for mt in (im.OCI_INDEX, im.DOCKER_LIST, im.OCI_MANIFEST, im.DOCKER_MANIFEST):
        assert mt in accept


# ---------------------------------------------------------------- retries and timeouts

def test_retry_on_503_then_success(script, sleeps: list[float]) -> None:  # type: ignore[no-untyped-def]
    attempts = []

    def handler(r: Request) -> Reply:
        attempts.append(r.path)
        if len(attempts) <= 2:
            return Reply(503, {}, b"busy")
        return Reply(200, {"Content-Type": im.OCI_MANIFEST}, IMG.manifest)

    srv = script(handler)
    with _client(sleep=sleeps.append, backoff_base=1.0, backoff_cap=8.0) as c:
        m = c.get_manifest(_ref(srv, "flaky/img:v1"))
    assert m.digest == IMG.manifest_digest
    assert len(attempts) == 3
    # exponential backoff with jitter in [50 %, 100 %] of base * 2^attempt
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0


def test_retries_exhausted_and_capped(script, sleeps: list[float]) -> None:  # type: ignore[no-untyped-def]
    srv = script(lambda r: Reply(502, {}, b"bad gateway"))
    with _client(sleep=sleeps.append, retries=5, backoff_base=1.0, backoff_cap=2.0) as c, \
            pytest.raises(UnavailableError) as ei:
        c.get_manifest(_ref(srv, "down/img:v1"))
    msg = str(ei.value)
    assert srv.host in msg and "manifest of" in msg and "6 attempts" in msg and "HTTP 502" in msg
    assert srv.count() == 6
    assert len(sleeps) == 5 and max(sleeps) <= 2.0 and min(sleeps[1:]) >= 1.0


def test_429_honours_retry_after(script, sleeps: list[float]) -> None:  # type: ignore[no-untyped-def]
    n = []

    def handler(r: Request) -> Reply:
        n.append(1)
        if len(n) == 1:
            return Reply(429, {"Retry-After": "7"}, b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}')
        return Reply(200, {"Content-Type": im.OCI_MANIFEST}, IMG.manifest)

    srv = script(handler)
    with _client(sleep=sleeps.append) as c:
        assert c.get_manifest(_ref(srv, "busy/img:v1")).digest == IMG.manifest_digest
    assert sleeps == [7.0]


def test_connection_refused_and_timeout(script, sleeps: list[float]) -> None:  # type: ignore[no-untyped-def]
    port = free_port()  # nothing listens there
    with _client(sleep=sleeps.append, retries=2) as c, pytest.raises(UnavailableError) as ei:
        c.get_manifest(ImageReference.parse(f"127.0.0.1:{port}/gone/img:v1"))
    assert f"127.0.0.1:{port}" in str(ei.value) and "ConnectError" in str(ei.value)
    assert len(sleeps) == 2

    def slow(r: Request) -> Reply:
        time.sleep(1.5)
        return Reply(200, {}, b"{}")

    srv = script(slow)
    with _client(timeout=0.3, retries=0) as c, pytest.raises(UnavailableError, match="Timeout"):
        c.get_manifest(_ref(srv, "slow/img:v1"))


def test_404_and_400_mapping(script) -> None:  # type: ignore[no-untyped-def]
    from cvmfs_snap.errors import NotFoundError

    srv = script(lambda r: Reply(404, {"Content-Type": "application/json"},
                                 b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
                 if "missing" in r.path else Reply(400, {}, b"what?"))
    with _client() as c:
        with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN"):
            c.get_manifest(_ref(srv, "x/missing:v1"))
        with pytest.raises(InvalidInputError, match=r"HTTP 400: what\?"):
            c.get_manifest(_ref(srv, "x/other:v1"))
    assert srv.count() == 2  # client errors are not retried


# ---------------------------------------------------------------- blobs

def test_blob_integrity_failures(script) -> None:  # type: ignore[no-untyped-def]
    blob = os.urandom(100_000)
    digest = im.sha256(blob)

    def handler(r: Request) -> Reply:
        if "wrong" in r.path:
            return Reply(200, {}, blob[:-1] + b"X")
        if "short" in r.path:
            return Reply(200, {}, blob[:5000], content_length=len(blob))
        if "chunky" in r.path:  # no Content-Length known up front is not possible here; size via descriptor
            return Reply(200, {}, blob[:-10])
        return Reply(200, {}, blob)

    srv = script(handler)
    with _client() as c:
        with pytest.raises(IntegrityError, match=rf"{digest} of .*wrong/img does not match its digest"):
            c.get_blob(_ref(srv, "wrong/img"), digest, size=len(blob))
        with c.open_blob(_ref(srv, "wrong/img"), digest) as s:
            assert len(s.read(1000)) == 1000  # data flows; the verdict comes at EOF
            with pytest.raises(IntegrityError):
                s.read()
        with pytest.raises(IntegrityError, match="truncated"):
            c.get_blob(_ref(srv, "short/img"), digest, size=len(blob))
        with pytest.raises(IntegrityError, match="descriptor says"):
            c.get_blob(_ref(srv, "chunky/img"), digest, size=len(blob))
        assert c.get_blob(_ref(srv, "good/img"), digest, size=len(blob)) == blob


def test_redirect_does_not_leak_authorization(script) -> None:  # type: ignore[no-untyped-def]
    blob = os.urandom(5000)
    digest = im.sha256(blob)
    storage = script(lambda r: Reply(200, {"Content-Type": "application/octet-stream"}, blob))

    def registry(r: Request) -> Reply:
        if "authorization" not in r.headers:
            return Reply(401, {"WWW-Authenticate": 'Basic realm="test"'}, b"")
        if r.headers["authorization"] != "Basic " + base64.b64encode(b"alice:wonderland").decode():
            return Reply(401, {"WWW-Authenticate": 'Basic realm="test"'}, b"")
        return Reply(307, {"Location": f"http://{storage.host}/store/{digest[7:]}?X-Signature=abc"}, b"")

    reg = script(registry)
    creds = CredentialStore({reg.host: Credentials("alice", "wonderland")})
    with _client(credentials=creds) as c:
        assert c.get_blob(_ref(reg, "priv/img"), digest, size=len(blob)) == blob
        assert c.read_range(_ref(reg, "priv/img"), digest, 10, 20) == blob[10:30]
    assert any("authorization" in r.headers for r in reg.requests)
    assert storage.count("/store/") == 2
    for r in storage.requests:
        assert "authorization" not in r.headers, r.headers
    # the range header does travel with the redirect
    assert storage.requests[1].headers.get("range") == "bytes=10-29"


# ---------------------------------------------------------------- ranges

BLOB = os.urandom(300_000)
BLOB_DIGEST = im.sha256(BLOB)
RANGES = [(5, 10), (100_000, 50), (299_990, 10), (7, 3)]


def _range_server(mode: str) -> Callable[[Request], Reply]:
    """mode: multipart (RFC 7233), refuse-multi (416 on several ranges), refuse-400, ignore (always 200),
    coalesce (several ranges answered by one 206 covering all)."""

    def handler(r: Request) -> Reply:
        rng = parse_range_header(r.headers.get("range", ""), len(BLOB))
        if mode == "ignore" or rng is None:
            return Reply(200, {"Content-Type": "application/octet-stream"}, BLOB)
        if len(rng) > 1:
            if mode == "refuse-multi":
                return Reply(416, {"Content-Range": f"bytes */{len(BLOB)}"}, b"")
            if mode == "refuse-400":
                return Reply(400, {}, b"multiple ranges not supported")
            if mode == "coalesce":
                s, e = min(a for a, _ in rng), max(b for _, b in rng)
                return Reply(206, {"Content-Range": f"bytes {s}-{e}/{len(BLOB)}"}, BLOB[s:e + 1])
            return byteranges_reply(BLOB, rng)
        s, e = rng[0]
        return Reply(206, {"Content-Range": f"bytes {s}-{e}/{len(BLOB)}"}, BLOB[s:e + 1])

    return handler


def _multi_requests(srv: LoopbackServer) -> int:
    return sum(1 for r in srv.requests if "," in r.headers.get("range", ""))


def test_multi_range_multipart(script) -> None:  # type: ignore[no-untyped-def]
    srv = script(_range_server("multipart"))
    with _client() as c:
        ref = _ref(srv, "r/img")
        assert c.read_ranges(ref, BLOB_DIGEST, RANGES) == [BLOB[o:o + n] for o, n in RANGES]
        rs = c.range_support(ref)
        assert rs.single is True and rs.multi is True
    assert srv.count() == 1 and _multi_requests(srv) == 1
    # (5,10) and (7,3) overlap: sent as one coalesced range
    assert srv.requests[0].headers["range"] == "bytes=5-14,100000-100049,299990-299999"


@pytest.mark.parametrize("mode", ["refuse-multi", "refuse-400"])
def test_multi_range_refused_falls_back_and_remembers(script, mode: str) -> None:  # type: ignore[no-untyped-def]
    srv = script(_range_server(mode))
    with _client() as c:
        ref = _ref(srv, "r/img")
        assert c.read_ranges(ref, BLOB_DIGEST, RANGES) == [BLOB[o:o + n] for o, n in RANGES]
        assert c.range_support(ref).multi is False and c.range_support(ref).single is True
        assert _multi_requests(srv) == 1 and srv.count() == 4  # 1 refused + 3 single
        assert c.read_ranges(ref, BLOB_DIGEST, RANGES) == [BLOB[o:o + n] for o, n in RANGES]
    assert _multi_requests(srv) == 1  # not asked again: remembered per host
    assert srv.count() == 7


def test_multi_range_coalesced_by_server(script) -> None:  # type: ignore[no-untyped-def]
    srv = script(_range_server("coalesce"))
    with _client() as c:
        assert c.read_ranges(_ref(srv, "r/img"), BLOB_DIGEST, RANGES) == [BLOB[o:o + n] for o, n in RANGES]
    assert srv.count() == 1


def test_ranges_ignored_by_server(script) -> None:  # type: ignore[no-untyped-def]
    srv = script(_range_server("ignore"))
    with _client() as c:
        ref = _ref(srv, "r/img")
        assert c.read_range(ref, BLOB_DIGEST, 1000, 100) == BLOB[1000:1100]
        assert c.range_support(ref).single is False
        assert c.read_ranges(ref, BLOB_DIGEST, RANGES) == [BLOB[o:o + n] for o, n in RANGES]
    # once known, no more Range headers are sent to that host
    assert [("range" in r.headers) for r in srv.requests] == [True, False]

    # the whole-blob fallback verifies what it slices from
    bad = script(lambda r: Reply(200, {}, BLOB[:-1] + b"!"))
    with _client() as c, pytest.raises(IntegrityError, match="does not match its digest"):
        c.read_range(_ref(bad, "r/img"), BLOB_DIGEST, 0, 10)
    # above the fallback limit it stops after the last byte needed instead of downloading everything
    with _client(range_fallback_limit=1000) as c:
        assert c.read_range(_ref(srv, "r/img"), BLOB_DIGEST, 10, 10) == BLOB[10:20]


# ---------------------------------------------------------------- tags

def test_tags_link_pagination(script) -> None:  # type: ignore[no-untyped-def]
    tags = [f"v{i}" for i in range(7)]

    def handler(r: Request) -> Reply:
        from urllib.parse import parse_qs, urlsplit

        q = parse_qs(urlsplit(r.path).query)
        n = int(q.get("n", ["100"])[0])
        last = q.get("last", [""])[0]
        start = tags.index(last) + 1 if last else 0
        page = tags[start:start + n]
        headers = {"Content-Type": "application/json"}
        if start + n < len(tags):
            headers["Link"] = f'</v2/p/img/tags/list?last={page[-1]}&n={n}>; rel="next"'
        return Reply(200, headers, json.dumps({"name": "p/img", "tags": page}).encode())

    srv = script(handler)
    with _client() as c:
        assert c.list_tags(_ref(srv, "p/img"), page_size=2) == tags
    assert srv.count() == 4
    assert srv.requests[0].path == "/v2/p/img/tags/list?n=2"

    loop = script(lambda r: Reply(200, {"Link": '</v2/p/img/tags/list?n=1>; rel="next"'},
                                  b'{"name": "p/img", "tags": ["a"]}'))
    with _client() as c, pytest.raises(InvalidInputError, match="loop"):
        c.list_tags(_ref(loop, "p/img"), page_size=1)


def test_digest_helper() -> None:
    assert compute_digest(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
