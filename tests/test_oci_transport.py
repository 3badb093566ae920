"""The OCI client's transport, on the wire: plain-HTTP policy and credentials, overall transfer deadlines, declared
blob sizes, the blob-URL cache and the thread hand-off for trio callers.

"A registry elsewhere" (not loopback) is a loopback server reached under a made-up name
(``registry.example.test``): :class:`tests.support.http_servers.RenamingTransport` connects that name to 127.0.0.1
below the client, so the client's policy and auth flow see a non-loopback host, and the server records every byte
it receives (``raw``), i.e. what a sniffer on the path would see. Loopback names (127.0.0.1, localhost) count as
allowed plain HTTP by policy, so they cannot stand for a remote registry; a renamed host can.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
import trio  # type: ignore[import-untyped]

from cvmfs_snap.containerd.registry import OciRegistry
from cvmfs_snap.errors import AuthError, IntegrityError, InvalidInputError, UnavailableError
from cvmfs_snap.oci import Credentials, CredentialStore, ImageReference, Platform, RegistryClient
from cvmfs_snap.oci import transport as tr
from cvmfs_snap.oci.handoff import RangeHandoff
from cvmfs_snap_devenv import images as im
from tests.support.http_servers import (
    LoopbackServer,
    RenamingTransport,
    Reply,
    Request,
    parse_range_header,
    serve,
)

USER, PASSWORD = "alice", "s3cret-pa55word"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
REMOTE = "registry.example.test"
STORAGE = "storage.example.test"
IMG = im.image([im.layer([("etc/x", b"x" * 50)])])


@pytest.fixture
def script() -> Iterator[Callable[[Callable[[Request], Reply]], LoopbackServer]]:
    with ExitStack() as stack:
        yield lambda handler: stack.enter_context(serve(handler))


def _client(names: dict[str, str] | None = None, **kw: object) -> RegistryClient:
    kw.setdefault("timeout", 5)
    kw.setdefault("retries", 0)
    kw.setdefault("sleep", lambda _s: None)
    return RegistryClient(transport=RenamingTransport(names), **kw)  # type: ignore[arg-type]


def _secret_on_wire(srv: LoopbackServer) -> bool:
    raw = bytes(srv.raw)
    return PASSWORD.encode() in raw or BASIC.encode() in raw or b"authorization" in raw.lower()


def _basic_registry(r: Request) -> Reply:
    if r.headers.get("authorization") != BASIC:
        return Reply(401, {"WWW-Authenticate": 'Basic realm="test"'}, b"")
    return Reply(200, {"Content-Type": im.OCI_MANIFEST}, IMG.manifest)


# ---------------------------------------------------------------- item 1: plain HTTP and credentials

def test_http_reference_to_a_remote_host_is_refused_before_any_request(script) -> None:  # type: ignore[no-untyped-def]
    srv = script(_basic_registry)
    creds = CredentialStore({f"{REMOTE}:{srv.port}": Credentials(USER, PASSWORD)})
    with _client({REMOTE: "127.0.0.1"}, credentials=creds) as c:
        ref = ImageReference.parse(f"http://{REMOTE}:{srv.port}/priv/img:v1")
        with pytest.raises(InvalidInputError, match=r"plain HTTP .* not configured as an insecure registry"):
            c.get_manifest(ref)
        with pytest.raises(InvalidInputError, match="not configured as an insecure registry"):
            c.get_blob(ref, IMG.config_digest, size=len(IMG.config))
        with pytest.raises(InvalidInputError, match="not configured as an insecure registry"):
            c.list_tags(ref)
    assert srv.raw == b"" and srv.requests == []


def test_https_reference_never_falls_back_to_plain_http(script) -> None:  # type: ignore[no-untyped-def]
    """Written without http://, a remote host gets HTTPS: against a plain-HTTP server the TLS handshake fails, and
    nothing the server received holds the credentials."""
    srv = script(_basic_registry)
    creds = CredentialStore({f"{REMOTE}:{srv.port}": Credentials(USER, PASSWORD)})
    with _client({REMOTE: "127.0.0.1"}, credentials=creds) as c, pytest.raises(UnavailableError):
        c.get_manifest(ImageReference.parse(f"{REMOTE}:{srv.port}/priv/img:v1"))
    assert srv.raw, "the client did connect (TLS ClientHello)"
    assert srv.requests == [] and not _secret_on_wire(srv)


def test_configured_insecure_host_gets_plain_http_with_credentials(script) -> None:  # type: ignore[no-untyped-def]
    """The positive control: the same server, configured insecure (in another spelling), is spoken to in plain HTTP
    and does receive the credentials, so the refusals above are seen on the wire, not only in messages."""
    srv = script(_basic_registry)
    creds = CredentialStore({f"{REMOTE}:{srv.port}": Credentials(USER, PASSWORD)})
    with _client({REMOTE: "127.0.0.1"}, credentials=creds,
                 insecure_registries=[f"http://{REMOTE.upper()}:{srv.port}"]) as c:
        for text in (f"{REMOTE}:{srv.port}/priv/img:v1", f"http://{REMOTE}:{srv.port}/priv/img:v1"):
            assert c.get_manifest(ImageReference.parse(text)).digest == IMG.manifest_digest
    assert _secret_on_wire(srv)
    assert srv.requests[-1].headers["host"] == f"{REMOTE}:{srv.port}"


def test_no_redirect_to_plain_http_elsewhere(script) -> None:  # type: ignore[no-untyped-def]
    """A configured-insecure registry redirecting a blob to plain HTTP on another (not allowed) host: refused, and
    the storage host receives nothing (neither credentials nor the signed URL)."""
    storage = script(lambda r: Reply(200, {}, IMG.config))

    def registry(r: Request) -> Reply:
        if r.headers.get("authorization") != BASIC:
            return Reply(401, {"WWW-Authenticate": 'Basic realm="test"'}, b"")
        return Reply(307, {"Location": f"http://{STORAGE}:{storage.port}/blob?sig=abc"}, b"")

    reg = script(registry)
    creds = CredentialStore({f"{REMOTE}:{reg.port}": Credentials(USER, PASSWORD)})
    c = _client({REMOTE: "127.0.0.1", STORAGE: "127.0.0.1"}, credentials=creds,
                insecure_registries=[f"{REMOTE}:{reg.port}"])
    with c, pytest.raises(UnavailableError, match="redirected to plain HTTP"):
        c.get_blob(ImageReference.parse(f"{REMOTE}:{reg.port}/priv/img"), IMG.config_digest, size=len(IMG.config))
    assert storage.raw == b""


def test_plain_http_token_realm_elsewhere_is_refused(script) -> None:  # type: ignore[no-untyped-def]
    """A registry (insecure, configured) whose token realm is plain HTTP on another host: no request goes there."""
    realm = script(lambda r: Reply(200, {"Content-Type": "application/json"}, b'{"token": "t"}'))
    reg = script(lambda r: Reply(401, {"WWW-Authenticate":
                                       f'Bearer realm="http://auth.example.test:{realm.port}/token",service="s"'}))
    creds = CredentialStore({f"{REMOTE}:{reg.port}": Credentials(USER, PASSWORD)})
    with _client({REMOTE: "127.0.0.1", "auth.example.test": "127.0.0.1"}, credentials=creds,
                 insecure_registries=[f"{REMOTE}:{reg.port}"]) as c, pytest.raises(AuthError, match="plain HTTP"):
        c.get_manifest(ImageReference.parse(f"{REMOTE}:{reg.port}/priv/img:v1"))
    assert realm.raw == b""


def test_huge_401_body_is_not_read_for_a_retry(script) -> None:  # type: ignore[no-untyped-def]
    """A 401 declaring a huge body: no retry with credentials (httpx would read that body into memory first)."""
    srv = script(lambda r: Reply(401, {"WWW-Authenticate": 'Basic realm="x"'}, b"z" * (4 << 20)))
    creds = CredentialStore({srv.host: Credentials(USER, PASSWORD)})
    with _client(credentials=creds) as c, pytest.raises(AuthError, match="HTTP 401"):
        c.get_manifest(ImageReference.parse(f"{srv.host}/priv/img:v1"))
    assert len(srv.requests) == 1


# ---------------------------------------------------------------- item 13: overall deadlines

def _trickle(body: bytes, ctype: str = "application/octet-stream") -> Callable[[Request], Reply]:
    return lambda r: Reply(200, {"Content-Type": ctype}, body, trickle=0.2)


@pytest.mark.parametrize("what", ["manifest", "blob", "range", "tags", "token"])
def test_trickling_registry_is_cut_off_by_the_deadline(script, what: str) -> None:  # type: ignore[no-untyped-def]
    """One byte every 0.2 s never trips the 5 s read timeout; the 1.5 s overall deadline cuts it off."""
    blob = os.urandom(400)
    if what == "token":
        realm = script(_trickle(json.dumps({"token": "t" * 300}).encode(), "application/json"))
        srv = script(lambda r: Reply(401, {"WWW-Authenticate": f'Bearer realm="{realm.url}/token",service="s"'}))
    elif what == "manifest":
        srv = script(_trickle(IMG.manifest, im.OCI_MANIFEST))
    elif what == "tags":
        srv = script(_trickle(json.dumps({"tags": [f"t{i}" for i in range(40)]}).encode(), "application/json"))
    else:
        srv = script(_trickle(blob))
    ref = ImageReference.parse(f"{srv.host}/slow/img:v1")
    t0 = time.monotonic()
    c = _client(timeout=5, transfer_deadline=1.5, blob_min_rate=1 << 30)
    with c, pytest.raises(UnavailableError, match="deadline of 2 s") as ei:
        if what in ("manifest", "token"):
            c.get_manifest(ref)
        elif what == "tags":
            c.list_tags(ref)
        elif what == "blob":
            c.get_blob(ref, im.sha256(blob), size=len(blob))
        else:
            c.read_range(ref, im.sha256(blob), 0, len(blob))
    took = time.monotonic() - t0
    assert took < 4.5, took
    assert "too slow" in str(ei.value) and srv.host.split(":")[0] in str(ei.value)


def test_trickled_status_line_and_headers_are_cut_off_too(script) -> None:  # type: ignore[no-untyped-def]
    """The deadline holds while the response head is still arriving (httpx only bounds each socket operation)."""
    srv = script(lambda r: Reply(200, {"Content-Type": im.OCI_MANIFEST, "X-Pad": "p" * 200}, IMG.manifest,
                                 trickle=0.1, trickle_head=True))
    ref = ImageReference.parse(f"{srv.host}/slow/img:v1")
    t0 = time.monotonic()
    with RegistryClient(timeout=5, retries=0, transfer_deadline=1.5) as c, \
            pytest.raises(UnavailableError, match="deadline of 2 s"):
        c.get_manifest(ref)
    assert time.monotonic() - t0 < 4.0


def test_blob_deadline_scales_with_declared_size(script) -> None:  # type: ignore[no-untyped-def]
    """The same trickle passes when the declared size buys enough time: base + size / min_rate."""
    blob = os.urandom(12)
    srv = script(_trickle(blob))
    ref = ImageReference.parse(f"{srv.host}/slow/img:v1")
    with _client(timeout=5, transfer_deadline=0.5, blob_min_rate=4.0) as c:  # 0.5 + 12 / 4 = 3.5 s for 2.4 s
        assert c.get_blob(ref, im.sha256(blob), size=len(blob)) == blob


# ---------------------------------------------------------------- item 17: declared sizes of small blobs

def _image_server(config_served: bytes) -> Callable[[Request], Reply]:
    def handler(r: Request) -> Reply:
        if "/manifests/" in r.path:
            return Reply(200, {"Content-Type": im.OCI_MANIFEST}, IMG.manifest)
        if IMG.config_digest in r.path:
            return Reply(200, {}, config_served)
        return Reply(404, {}, b"")
    return handler


@pytest.mark.parametrize("served", ["longer", "shorter"])
def test_config_blob_declared_size_is_enforced(script, served: str) -> None:  # type: ignore[no-untyped-def]
    """A config body longer or shorter than the manifest declares is an IntegrityError (the pull's resolve and
    list_platforms both read it), never a silently accepted config."""
    body = IMG.config + b" " * 10 if served == "longer" else IMG.config[:-5]
    srv = script(_image_server(body))
    ref = ImageReference.parse(f"{srv.host}/cfg/img:v1")
    with _client() as c:
        with pytest.raises(IntegrityError, match="descriptor says"):
            OciRegistry(c).resolve(ref, Platform("linux", "amd64"))
        with pytest.raises(IntegrityError):
            c.list_platforms(ref)
        with pytest.raises(InvalidInputError, match="invalid size"):
            c.get_blob(ref, IMG.config_digest, size=-1)


# ---------------------------------------------------------------- blob-URL cache

BLOB = os.urandom(200_000)
BLOB_DIGEST = im.sha256(BLOB)


def _storage(state: dict[str, int]) -> Callable[[Request], Reply]:
    def handler(r: Request) -> Reply:
        if state.get("expired"):
            state["expired"] -= 1
            return Reply(403, {}, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>")
        rng = parse_range_header(r.headers.get("range", ""), len(BLOB))
        if rng is None:
            return Reply(200, {}, BLOB)
        s, e = rng[0]
        return Reply(206, {"Content-Range": f"bytes {s}-{e}/{len(BLOB)}"}, BLOB[s:e + 1])
    return handler


def test_blob_url_is_cached_refreshed_and_expires(script) -> None:  # type: ignore[no-untyped-def]
    state: dict[str, int] = {}
    storage = script(_storage(state))
    reg = script(lambda r: Reply(307, {"Location": f"{storage.url}/store/{BLOB_DIGEST[7:]}?X-Sig=1"}, b""))
    now = [1000.0]
    with _client(blob_url_ttl=60.0, clock=lambda: now[0]) as c:
        ref = ImageReference.parse(f"{reg.host}/lazy/img")
        for i in range(5):
            assert c.read_range(ref, BLOB_DIGEST, i * 1000, 100) == BLOB[i * 1000:i * 1000 + 100]
        # one round trip per range once the storage URL is known: the registry was asked once
        assert reg.count("/v2/") == 1 and storage.count("/store/") == 5
        # the signed URL expired at the storage: refreshed through the registry, then cached again
        state["expired"] = 1
        assert c.read_range(ref, BLOB_DIGEST, 7, 3) == BLOB[7:10]
        assert reg.count("/v2/") == 2 and storage.count("/store/") == 7
        assert c.read_range(ref, BLOB_DIGEST, 70, 3) == BLOB[70:73]
        assert reg.count("/v2/") == 2
        # past its TTL the URL is not used again
        now[0] += 61
        assert c.read_range(ref, BLOB_DIGEST, 700, 3) == BLOB[700:703]
        assert reg.count("/v2/") == 3
        # the cache is per repository: another repository's blob URL is asked for
        assert c.read_range(ImageReference.parse(f"{reg.host}/other/img"), BLOB_DIGEST, 0, 3) == BLOB[:3]
        assert reg.count("/v2/") == 4
    with _client(blob_url_ttl=0) as c:  # off
        ref = ImageReference.parse(f"{reg.host}/lazy/img")
        c.read_range(ref, BLOB_DIGEST, 0, 3)
        c.read_range(ref, BLOB_DIGEST, 0, 3)
        assert reg.count("/v2/") == 6


# ---------------------------------------------------------------- thread hand-off for trio callers

def test_handoff_one_slow_range_does_not_stall_others(script) -> None:  # type: ignore[no-untyped-def]
    lock = threading.Lock()
    active = [0, 0]  # now, max

    def handler(r: Request) -> Reply:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        try:
            rng = parse_range_header(r.headers.get("range", ""), len(BLOB))
            assert rng is not None
            s, e = rng[0]
            if s == 0:
                time.sleep(1.5)  # the slow one
            elif s >= 100_000:
                time.sleep(0.3)
            return Reply(206, {"Content-Range": f"bytes {s}-{e}/{len(BLOB)}"}, BLOB[s:e + 1])
        finally:
            with lock:
                active[0] -= 1

    srv = script(handler)
    ref = ImageReference.parse(f"{srv.host}/lazy/img")
    done: dict[int, float] = {}
    ticks: list[float] = []

    async def main(h: RangeHandoff) -> None:
        t0 = trio.current_time()

        async def read(off: int) -> None:
            assert await h.read_range(ref, BLOB_DIGEST, off, 10) == BLOB[off:off + 10]
            done[off] = trio.current_time() - t0

        async def ticker() -> None:  # the event loop keeps running while reads wait on the network
            while len(done) < 2:
                ticks.append(trio.current_time() - t0)
                await trio.sleep(0.05)

        async with trio.open_nursery() as n:
            n.start_soon(read, 0)
            await trio.sleep(0.05)
            n.start_soon(read, 50_000)
            n.start_soon(ticker)
        assert h.in_flight == 0

    with _client() as c:
        trio.run(main, RangeHandoff(c, max_threads=4))
        assert done[50_000] < 1.0 < done[0], done
        assert len(ticks) > 10, ticks

        # bounded: 6 reads through 2 threads never put more than 2 requests on the registry at once
        active[1] = 0

        async def many(h: RangeHandoff) -> None:
            async with trio.open_nursery() as n:
                for i in range(6):
                    n.start_soon(h.read_range, ref, BLOB_DIGEST, 100_000 + i * 100, 10)

        trio.run(many, RangeHandoff(c, max_threads=2))
        assert active[1] == 2

        async def failing(h: RangeHandoff) -> None:
            await h.read_range(ref, "sha256:nothex", 0, 1)

        with pytest.raises(InvalidInputError):
            trio.run(failing, RangeHandoff(c))
    with pytest.raises(InvalidInputError):
        RangeHandoff(RegistryClient(), max_threads=0)


def test_clients_share_one_tls_context() -> None:
    """Every client of the process uses the same SSL context for the same CA bundle (each costs about 1 MiB of
    RSS, and the lazyfs process has a client per attached layer): the second client's first HTTPS request loads
    no CA bundle again."""
    with socket.socket() as s:  # a port nobody listens on: the request fails after the TLS transport is made
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = tr.httpx.URL(f"https://127.0.0.1:{port}/v2/")
    clients = [tr.Transport(tr.TransportPolicy(), timeout=5.0) for _ in range(3)]
    try:
        made: list[int] = []
        for c in clients:
            with pytest.raises(tr.httpx.ConnectError):
                c.send("GET", url, {})
            made.append(tr.tls_contexts_made())
        assert made[1] == made[2] == made[0]
        assert made[0] >= 1
    finally:
        for c in clients:
            c.close()
