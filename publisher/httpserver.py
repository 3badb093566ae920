"""The daemon's HTTP server: hypercorn on its own thread and event loop, serving :class:`publisher.httpapp.Endpoint`.

Why hypercorn: it is asyncio, so a connection that is idle, or that sends its headers a byte at a time, costs a
file descriptor and a coroutine but never a thread; its keep-alive timer runs from the moment a connection is
accepted until a request's headers are complete, and again between requests, so idle and half-sent connections
("slowloris") are closed after ``daemon.keep_alive_timeout`` seconds; it limits header size and requests per
connection. What this module adds:

* at most ``daemon.max_connections`` open connections, and never so many that the daemon runs out of file
  descriptors for its own work (publishing opens files and registry connections): ``RLIMIT_NOFILE`` minus
  :data:`FD_RESERVE`. Beyond that, new connections wait in the kernel's listen queue (:data:`BACKLOG`) until idle
  ones time out; asyncio retries accepting every second;
* HTTP/2 with prior knowledge is refused (hypercorn's keep-alive timer never runs for an HTTP/2 connection that
  opens no stream), and no connection stays open longer than ``daemon.connection_lifetime`` seconds, whatever it
  does;
* a bounded kernel send buffer per connection;
* reaching the limit is one log line every 10 s, not a traceback per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import threading
import time

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.utils import wrap_app
from prometheus_client import Counter

from cvmfs_snap.errors import InvalidInputError
from publisher import metrics
from publisher.config import DaemonConfig
from publisher.httpapp import Endpoint

log = logging.getLogger(__name__)

#: pending connections the kernel keeps for us while we are at the connection limit
BACKLOG = 1024
#: kernel send buffer per connection (bytes; Linux doubles it); answers are small
SEND_BUFFER = 256 * 1024
#: file descriptors kept free of HTTP connections for publishing, logs, the recipe watcher
FD_RESERVE = 64
#: the connection limit never goes below this, however low ``RLIMIT_NOFILE`` is
MIN_CONNECTIONS = 16

HTTP_EXPIRED = Counter(
    "cvmfs_snap_publisher_http_connections_expired_total",
    "HTTP connections shut down for being open longer than daemon.connection_lifetime",
    registry=metrics.REGISTRY,
)
HTTP_AT_LIMIT = Counter(
    "cvmfs_snap_publisher_http_connection_limit_total",
    "Times the HTTP endpoint stopped accepting for a second: at its connection limit or out of file descriptors",
    registry=metrics.REGISTRY,
)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); port 0 picks a free one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidInputError(f"daemon listen address {listen!r} must be host:port, e.g. 127.0.0.1:8080")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def connection_limit(configured: int) -> int:
    """``configured``, lowered so that :data:`FD_RESERVE` descriptors stay free under ``RLIMIT_NOFILE``."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(MIN_CONNECTIONS, min(configured, soft - FD_RESERVE))


#: how an HTTP/2 connection with prior knowledge starts; webhooks and nodes speak HTTP/1.1
H2_PREFACE = b"PRI * HTTP/2.0\r\n"


class _Connection(socket.socket):
    """An accepted connection that tells its listener when it is closed, and ends itself if it starts as HTTP/2
    with prior knowledge (hypercorn would keep such a connection forever when it opens no stream)."""

    listener: CappedListener | None = None
    accepted_at = 0.0
    expired = False
    _head = b""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if len(self._head) < len(H2_PREFACE) and data:
            self._head += data[: len(H2_PREFACE) - len(self._head)]
            if self._head == H2_PREFACE:
                log.debug("HTTP/2 with prior knowledge refused: the endpoint speaks HTTP/1.1")
                with contextlib.suppress(OSError):
                    self.shutdown(socket.SHUT_RDWR)
                return b""  # end of stream: the server closes the connection
        return data

    def close(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.connections.discard(self)
        super().close()


class CappedListener(socket.socket):
    """A listening socket whose ``accept`` reports EMFILE while ``limit`` of its connections are open.

    asyncio treats that as it treats a real descriptor shortage: it stops accepting for a second, then retries;
    the connections meanwhile wait in the kernel's queue. Used only on the event loop's thread."""

    limit = MIN_CONNECTIONS

    def __init__(self, family: int, sock_type: int) -> None:
        super().__init__(family, sock_type)
        self.connections: set[_Connection] = set()

    def accept(self) -> tuple[socket.socket, object]:
        if len(self.connections) >= self.limit:
            raise OSError(errno.EMFILE, f"{len(self.connections)} HTTP connections open, the limit")
        conn, addr = super().accept()
        wrapped = _Connection(conn.family, conn.type, conn.proto, fileno=conn.detach())
        wrapped.listener = self
        wrapped.accepted_at = time.monotonic()
        self.connections.add(wrapped)
        return wrapped, addr

    def expire(self, lifetime: float) -> int:
        """Shut down connections open longer than ``lifetime`` seconds (the server then closes them)."""
        cutoff = time.monotonic() - lifetime
        n = 0
        for conn in list(self.connections):
            if conn.accepted_at < cutoff and not conn.expired:
                conn.expired = True
                n += 1
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        return n


class HttpServer:
    """Serves an :class:`Endpoint` with hypercorn on its own thread and event loop."""

    def __init__(self, endpoint: Endpoint, settings: DaemonConfig) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.max_connections = connection_limit(settings.max_connections)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._last_limit_warning = 0.0

    def start(self) -> tuple[str, int]:
        """Bind and listen (OSError when the address cannot be had), then serve; returns the bound address."""
        host, port = parse_listen(self.settings.listen)
        sock = CappedListener(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.limit = self.max_connections
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # accepted connections inherit it: kernel memory per connection stays bounded
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            sock.bind((host, port))
            sock.listen(BACKLOG)  # connections queue in the kernel from now on, before the loop runs
            sock.setblocking(False)
            bound_host, bound_port = sock.getsockname()[:2]
        except OSError:
            sock.close()
            raise
        config = HypercornConfig()
        config.backlog = BACKLOG
        config.keep_alive_timeout = self.settings.keep_alive_timeout
        config.keep_alive_max_requests = 100
        config.graceful_timeout = 2.0
        config.h11_max_incomplete_size = 16 * 1024
        config.include_server_header = False
        config.accesslog = None  # an access log would show request headers, Authorization included
        config.errorlog = logging.getLogger("publisher.httpserver.hypercorn")
        self._thread = threading.Thread(target=self._serve, args=(config, sock), name="http", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        log.debug("HTTP endpoint: at most %d connections", self.max_connections)
        return str(bound_host), int(bound_port)

    def _serve(self, config: HypercornConfig, sock: CappedListener) -> None:
        try:
            asyncio.run(self._main(config, sock))
        except Exception:
            log.exception("the HTTP endpoint stopped")
        finally:
            self._ready.set()

    async def _main(self, config: HypercornConfig, sock: CappedListener) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        self._loop = loop
        self._stop = asyncio.Event()
        self._ready.set()
        app = wrap_app(self.endpoint, config.wsgi_max_body_size, "asgi")
        reaper = asyncio.create_task(self._expire(sock))
        try:
            await worker_serve(app, config, sockets=Sockets([], [sock], []), shutdown_trigger=self._stop.wait)
        finally:
            reaper.cancel()

    async def _expire(self, sock: CappedListener) -> None:
        """Whatever a connection does, it is shut down once it has been open for ``connection_lifetime`` seconds."""
        lifetime = self.settings.connection_lifetime
        while True:
            await asyncio.sleep(min(1.0, lifetime / 4))
            n = sock.expire(lifetime)
            if n:
                HTTP_EXPIRED.inc(n)
                log.debug("shut down %d HTTP connection(s) open for more than %gs", n, lifetime)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        message = str(context.get("message", ""))
        if message.startswith("socket.accept() out of system resource"):
            # asyncio stops accepting for a second and retries; idle connections are closed by the keep-alive timer
            HTTP_AT_LIMIT.inc()
            now = time.monotonic()
            if now - self._last_limit_warning > 10:
                self._last_limit_warning = now
                log.warning("HTTP endpoint at its connection limit (%s); new connections wait in the kernel's "
                            "queue until idle ones time out", context.get("exception"))
            return
        loop.default_exception_handler(context)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, close connections (in-flight requests get ``graceful_timeout``), free the threads."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self.endpoint.close()
