r"""The tests' HTTP servers on loopback: one base (:class:`LoopbackServer` + :class:`LoopbackHandler`, run by
:func:`running`) that every test server is built on, and tiny scripted servers (:func:`serve`) for behaviour no
real registry here shows on demand.

:func:`serve` is used for: a flaky server (503 then 200), a server that serves a tampered manifest, a redirecting
server that records the headers it receives, a blob server that speaks (or refuses) multi-range
``multipart/byteranges``, a server that trickles its body a byte at a time; the misbehaving range proxies
(``range_proxies.py``), the token issuer (``token_issuer.py``) and the publish-on-miss stand-in
(``test_missreport.py``) are :class:`LoopbackHandler`\s too. Each server runs in threads on 127.0.0.1 with a free
port and records every request, and every byte it received on the wire (``raw``: what a network sniffer would see).

:class:`RenamingTransport` lets a test speak to such a server under a name that is *not* loopback (e.g.
``registry.example.test:PORT``): the client, its policy and its auth see only that name; the transport connects to
127.0.0.1 instead. So "a registry elsewhere" can be tested on the wire without leaving the machine.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
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


class LoopbackServer(ThreadingHTTPServer):
    """The base of every HTTP server the tests start: on 127.0.0.1 with a free port, at most ``max_threads``
    connections served at once (more wait in the kernel's backlog), each connection's reads and writes bounded by
    ``timeout`` seconds (:class:`LoopbackHandler`), every request recorded in ``requests`` and every byte received
    in ``raw`` (all connections in arrival order: what a network sniffer would see), and a clean stop
    (:meth:`stop`: open connections are shut down and their threads joined). Run it with :func:`running`."""

    daemon_threads = True
    block_on_close = False  # stop() joins the connection threads itself, after shutting their sockets down

    def __init__(self, handler_class: type[LoopbackHandler], *, max_threads: int = 32) -> None:
        self.requests: list[Request] = []
        self.raw = bytearray()
        self.lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_threads)
        self._open: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__(("127.0.0.1", 0), handler_class)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def count(self, path_prefix: str = "") -> int:
        return sum(1 for r in self.requests if r.path.startswith(path_prefix))

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet finished (each has its thread)."""
        with self.lock:
            return len(self._open)

    def record(self, req: Request) -> None:
        with self.lock:
            self.requests.append(req)

    def received(self, data: bytes) -> None:
        with self.lock:
            self.raw.extend(data)

    # -- bounded threads and a clean stop
    def process_request(self, request: Any, client_address: Any) -> None:
        while not self._slots.acquire(timeout=0.1):
            if self._stopping.is_set():
                self.shutdown_request(request)
                return
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             name=f"{type(self).__name__}-conn", daemon=True)
        with self.lock:
            self._open[request] = t
        t.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self._open.pop(request, None)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients of these tests close connections early on purpose (ranges, truncation): do not print those."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()

    def stop(self, wait: float = 5.0) -> None:
        """Stop accepting, end the open connections (their handlers see EOF or an error) and join everything."""
        self._stopping.set()
        if self._thread is not None:
            self.shutdown()
            self._thread.join(wait)
        with self.lock:
            open_now = dict(self._open)
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + wait
        for t in open_now.values():
            t.join(max(0.0, deadline - time.monotonic()))
        self.server_close()


class _Tee:
    """A connection's request stream, with every byte read also given to ``sink``."""

    def __init__(self, f: Any, sink: Callable[[bytes], None]) -> None:
        self._f = f
        self._sink = sink

    def _rec(self, b: bytes) -> bytes:
        self._sink(b)
        return b

    def readline(self, *a: Any) -> bytes:
        return self._rec(self._f.readline(*a))

    def read(self, *a: Any) -> bytes:
        return self._rec(self._f.read(*a))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class LoopbackHandler(BaseHTTPRequestHandler):
    """The base handler of :class:`LoopbackServer`: HTTP/1.1, a ``timeout`` on each connection's socket (a client
    that stalls cannot hold a thread), silent, and every request recorded on the server before it is answered."""

    protocol_version = "HTTP/1.1"
    timeout = 30.0
    server: LoopbackServer

    def setup(self) -> None:
        super().setup()
        self.rfile = _Tee(self.rfile, self.server.received)  # type: ignore[assignment]

    #: this connection's current request, as recorded
    recorded: Request

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.recorded = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            self.server.record(self.recorded)
        return ok

    def send_json(self, status: int, payload: object, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def running(handler_class: type[LoopbackHandler], *, max_threads: int = 32) -> Iterator[LoopbackServer]:
    """A :class:`LoopbackServer` with ``handler_class`` (a :class:`LoopbackHandler`), stopped on exit."""
    server = LoopbackServer(handler_class, max_threads=max_threads)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def serve(handler: Handler) -> Iterator[LoopbackServer]:
    """Run ``handler`` (Request -> Reply) behind a :class:`LoopbackServer`."""

    class _H(LoopbackHandler):
        def _do(self) -> None:
            req = self.recorded
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

    with running(_H) as server:
        yield server


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
