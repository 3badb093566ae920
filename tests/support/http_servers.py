"""Tiny scripted HTTP servers on loopback, for behaviour no real registry here shows on demand.

Used for: a flaky server (503 then 200), a server that serves a tampered manifest, a redirecting server that
records the headers it receives, a blob server that speaks (or refuses) multi-range ``multipart/byteranges``, a
server that trickles its body a byte at a time. Each server runs in a thread on 127.0.0.1 with a free port and
records every request, and every byte it received on the wire (``raw``: what a network sniffer would see).

:class:`RenamingTransport` lets a test speak to such a server under a name that is *not* loopback (e.g.
``registry.example.test:PORT``): the client, its policy and its auth see only that name; the transport connects to
127.0.0.1 instead. So "a registry elsewhere" can be tested on the wire without leaving the machine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: send this Content-Length instead of len(body) (to simulate a truncated body), None = len(body)
    content_length: int | None = None
    #: send the body one byte every ``trickle`` seconds (a slow or hostile server), None = all at once
    trickle: float | None = None
    #: with ``trickle``: the status line and headers too, not only the body
    trickle_head: bool = False


Handler = Callable[[Request], Reply]


class _QuietServer(ThreadingHTTPServer):
    """Clients of these tests close connections early on purpose (ranges, truncation): do not print those."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


@dataclass
class LoopbackServer:
    host: str  # 127.0.0.1:PORT
    requests: list[Request]
    #: every byte received, all connections in arrival order
    raw: bytearray = field(default_factory=bytearray)

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def count(self, path_prefix: str = "") -> int:
        return sum(1 for r in self.requests if r.path.startswith(path_prefix))


@contextmanager
def serve(handler: Handler) -> Iterator[LoopbackServer]:
    """Run ``handler`` (Request -> Reply) behind an HTTP/1.1 server on 127.0.0.1:<free port>."""
    requests: list[Request] = []
    raw = bytearray()
    lock = threading.Lock()

    class _Tee:
        """The request stream, with every byte read also appended to ``raw``."""

        def __init__(self, f: Any) -> None:
            self._f = f

        def _rec(self, b: bytes) -> bytes:
            with lock:
                raw.extend(b)
            return b

        def readline(self, *a: Any) -> bytes:
            return self._rec(self._f.readline(*a))

        def read(self, *a: Any) -> bytes:
            return self._rec(self._f.read(*a))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

    class _H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.rfile = _Tee(self.rfile)  # type: ignore[assignment]

        def _do(self) -> None:
            req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            with lock:
                requests.append(req)
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            rep = handler(req)
            if rep.trickle is not None and rep.trickle_head:
                self._trickle(rep)
                return
            self.send_response(rep.status)
            for k, v in rep.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(rep.content_length if rep.content_length is not None
                                                   else len(rep.body)))
            if rep.content_length is not None:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD" and rep.trickle is not None:
                self.wfile.flush()
                try:
                    for i in range(len(rep.body)):
                        self.wfile.write(rep.body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(rep.trickle)
                except OSError:  # the client gave up, as it should
                    self.close_connection = True
                    return
            elif self.command != "HEAD":
                self.wfile.write(rep.body)
            self.wfile.flush()

        def _trickle(self, rep: Reply) -> None:
            head = f"HTTP/1.1 {rep.status} Whatever\r\n" + "".join(f"{k}: {v}\r\n" for k, v in rep.headers.items())
            data = (head + f"Content-Length: {len(rep.body)}\r\n\r\n").encode("latin-1") + rep.body
            assert rep.trickle is not None
            try:
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(rep.trickle)
            except OSError:
                pass
            self.close_connection = True

        do_GET = do_HEAD = do_POST = do_PUT = _do

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = _QuietServer(("127.0.0.1", 0), _H)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-http",
                              daemon=True)
    thread.start()
    try:
        yield LoopbackServer(host=f"127.0.0.1:{server.server_address[1]}", requests=requests, raw=raw)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def parse_range_header(value: str, size: int) -> list[tuple[int, int]] | None:
    """``bytes=a-b,c-d`` -> [(a, b), (c, d)] (inclusive ends, clipped to size); None if unparsable."""
    if not value.startswith("bytes="):
        return None
    out = []
    for part in value[len("bytes="):].split(","):
        a, _, b = part.strip().partition("-")
        if not a.isdigit():
            return None
        start = int(a)
        end = min(int(b), size - 1) if b.isdigit() else size - 1
        out.append((start, end))
    return out


def byteranges_reply(blob: bytes, ranges: list[tuple[int, int]], boundary: str = "CVMFS_SNAP_BOUNDARY") -> Reply:
    """A 206 reply with a multipart/byteranges body (RFC 7233 appendix A)."""
    body = b""
    for start, end in ranges:
        body += (f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Range: bytes {start}-{end}/{len(blob)}\r\n\r\n").encode()
        body += blob[start:end + 1] + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return Reply(206, {"Content-Type": f"multipart/byteranges; boundary={boundary}"}, body)


class RenamingTransport(httpx.BaseTransport):
    """Connects requests for ``names`` (host name -> loopback host, ports kept) to 127.0.0.1, leaving the URL the
    client built (and its Host header) as they are everywhere above the transport. HTTPS requests really start a
    TLS handshake (against a plain-HTTP test server it fails, which shows no plain request was made)."""

    def __init__(self, names: Mapping[str, str] | None = None) -> None:
        self.names = dict(names or {})
        self._inner = httpx.HTTPTransport(verify=False)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        target = self.names.get(request.url.host)
        if target is not None:  # a copy: the client keeps seeing its own request (and URL) on the response
            request = httpx.Request(request.method, request.url.copy_with(host=target), headers=request.headers,
                                    stream=request.stream, extensions=request.extensions)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()
