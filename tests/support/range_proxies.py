"""Misbehaving HTTP proxies in front of a real docker-registry, for lazy range reads (issue 9).

docker-registry itself serves ``Range`` and ``multipart/byteranges`` correctly; real registries and the caches in
front of them do not always. :func:`range_proxy` forwards every request to the registry and bends the answers to
blob GETs as :class:`Behaviour` says:

- ``ignore_range``: the ``Range`` header is dropped, so the registry answers 200 with the whole blob (GitLab's
  registry, some caches);
- ``multi``: what a multi-range request gets: ``"pass"`` (served), ``"400"`` (refused), ``"whole"`` (200 with the
  whole blob, as some CDNs do);
- ``corrupt``: this many ranged blob answers get a flipped byte in the middle of their body (-1: all of them);
- ``drop``: this many ranged blob answers are cut after half their body and the connection is closed (-1: all);
- ``redirect``: blob GETs are answered with a 307 to ``/storage/<digest>?sig=N`` on the proxy (as registries
  backed by S3 or a CDN do), which serves the blob; with ``storage_uses`` a signed URL answers 403 after that
  many uses (an expired signature), so the client must ask the registry again.

Built on :func:`tests.support.http_servers.serve` (so every request is recorded in ``proxy.server.requests``).
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cvmfs_snap_devenv.images import Pusher, make_tar
from tests.support.estargz import esgz, to_estargz
from tests.support.http_servers import LoopbackServer, Reply, Request, serve

_PASS_HEADERS = ("content-type", "content-range", "docker-content-digest", "location", "www-authenticate",
                 "docker-distribution-api-version")


@dataclass
class Behaviour:
    ignore_range: bool = False
    multi: str = "pass"
    corrupt: int = 0
    drop: int = 0
    redirect: bool = False
    storage_uses: int = 0
    #: GETs of this blob digest wait for ``release`` (a slow registry), counted in ``holding``
    hold: str = ""
    release: threading.Event = field(default_factory=threading.Event)
    holding: int = 0


@dataclass
class RangeProxy:
    server: LoopbackServer
    behaviour: Behaviour
    #: blob GETs seen: (Range header or "", status answered, body bytes sent)
    blob_gets: list[tuple[str, int, int]] = field(default_factory=list)
    #: with ``redirect``: GETs of the registry's blob URL (the 307s) and of the storage URL
    registry_gets: int = 0
    storage_gets: int = 0

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def bytes_sent(self) -> int:
        return sum(n for _, _, n in self.blob_gets)


def _take(n: int) -> tuple[bool, int]:
    """(apply now?, remaining count) for a countdown where -1 means always."""
    if n == 0:
        return False, 0
    return True, (n if n < 0 else n - 1)


@contextmanager
def range_proxy(upstream: str, behaviour: Behaviour | None = None) -> Iterator[RangeProxy]:
    """A proxy on 127.0.0.1 in front of ``upstream`` (``http://127.0.0.1:PORT``)."""
    beh = behaviour or Behaviour()
    client = httpx.Client(base_url=upstream, timeout=60)
    holder: list[RangeProxy] = []
    signed: dict[str, tuple[str, int]] = {}  # sig -> (registry blob path, uses)

    def handle(req: Request) -> Reply:
        headers = {k: v for k, v in req.headers.items() if k in ("accept", "authorization", "range")}
        is_blob = "/blobs/sha256:" in req.path and req.method == "GET"
        proxy = holder[0]
        if beh.redirect and is_blob:
            proxy.registry_gets += 1
            sig = str(len(signed))
            signed[sig] = (req.path, 0)
            return Reply(307, {"Location": f"/storage/{req.path.rsplit('/', 1)[1]}?sig={sig}"})
        if req.path.startswith("/storage/"):
            proxy.storage_gets += 1
            sig = req.path.rsplit("sig=", 1)[-1]
            path, uses = signed.get(sig, ("", 0))
            if not path or (beh.storage_uses and uses >= beh.storage_uses):
                proxy.blob_gets.append((headers.get("range", ""), 403, 0))
                return Reply(403, {"Content-Type": "application/xml"}, b"<Error>Request has expired</Error>")
            signed[sig] = (path, uses + 1)
            headers.pop("authorization", None)
            req = Request(req.method, path, req.headers)
            is_blob = True
        rng = headers.get("range", "")
        if is_blob and rng and "," in rng and beh.multi != "pass":
            if beh.multi == "400":
                holder[0].blob_gets.append((rng, 400, 0))
                return Reply(400, {"Content-Type": "text/plain"}, b"multiple ranges not supported")
            headers.pop("range")
        if is_blob and beh.ignore_range:
            headers.pop("range", None)
        if is_blob and beh.hold and beh.hold in req.path:
            beh.holding += 1
            beh.release.wait(30)
        resp = client.request(req.method, req.path, headers=headers)
        body = resp.content
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() in _PASS_HEADERS}
        rep = Reply(resp.status_code, out_headers, body)
        if is_blob and resp.status_code == 206 and body:
            now, beh.corrupt = _take(beh.corrupt)
            if now:
                mid = len(body) // 2
                rep.body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1:]
            now, beh.drop = _take(beh.drop)
            if now:
                rep.content_length = len(body)
                rep.body = body[:len(body) // 2]
        if is_blob:
            holder[0].blob_gets.append((headers.get("range", ""), rep.status, len(rep.body)))
        return rep

    try:
        with serve(handle) as server:
            proxy = RangeProxy(server, beh)
            holder.append(proxy)
            yield proxy
    finally:
        client.close()


@dataclass(frozen=True)
class PushedLayer:
    """An eStargz layer blob pushed to a registry, with what the tests need to check reads of it."""

    ref: str  # host/repo:tag (the tag need not exist: blobs are fetched by digest)
    digest: str
    size: int
    toc_digest: str
    blob: bytes
    files: dict[str, bytes]


def push_estargz(registry_host: str, repo: str, files: dict[str, bytes], *, chunk_size: int = 64 * 1024,
                 prioritized: tuple[str, ...] = (), compression_level: int = 6, go: Path | None = None,
                 compression: str = "gzip") -> PushedLayer:
    """Build an eStargz blob of regular ``files`` with our writer (or, with ``go`` = a scratch directory, with the
    Go reference tool ``esgz``) and push it to the registry at ``registry_host`` (a real docker-registry); the
    blob may then be read through a proxy in front of it."""
    dirs = sorted({"/".join(p.split("/")[:i]) + "/" for p in files for i in range(1, p.count("/") + 1)})
    tar = make_tar([*dirs, *files.items()])
    if go is None:
        blob, res = to_estargz(tar, chunk_size=chunk_size, prioritized=prioritized,
                               compression_level=compression_level, workers=1, compression=compression)
        toc_digest = res.toc_digest
    else:
        src, out = go / "in.tar", go / "out.esgz"
        src.write_bytes(tar)
        extra = ["--prioritized-files", ",".join(prioritized)] if prioritized else []
        r = subprocess.run([esgz(), "build", str(src), str(out), "--json", "--chunk-size", str(chunk_size), *extra],
                           capture_output=True, text=True, timeout=120, check=True)
        blob, toc_digest = out.read_bytes(), json.loads(r.stdout)["tocDigest"]
    p = Pusher(f"http://{registry_host}")
    try:
        digest = p.blob(repo, blob)
    finally:
        p.close()
    return PushedLayer(f"{registry_host}/{repo}:lazy", digest, len(blob), toc_digest, blob, dict(files))
