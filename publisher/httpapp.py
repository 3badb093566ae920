"""The daemon's HTTP endpoint as an ASGI application (served by :mod:`publisher.httpserver`).

What it guards, on top of what the server does (connection timeouts and limits):

* the shared secret is checked on the headers, **before** any body byte is read (401, connection closed);
* the body is bounded (``Content-Length`` over 1 MiB is refused with 413 before reading; chunked bodies are cut
  there too) and must arrive within ``daemon.request_timeout`` seconds (else 408);
* handlers run on a bounded pool of ``daemon.http_workers`` threads; more than ``4 x http_workers`` requests
  waiting for one are answered 503 with ``Retry-After`` instead of piling up;
* an answer the client does not read within ``daemon.request_timeout`` closes the connection.

Routes and answers are in docs/publisher-daemon.md; what a request *means* is :mod:`publisher.intake`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, HTTPScope, Scope
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError
from publisher import metrics
from publisher.config import DaemonConfig
from publisher.intake import MISSES_RECEIVED, WEBHOOKS_RECEIVED, Answer, Intake
from publisher.webhooks import MAX_BODY, check_authorization

log = logging.getLogger(__name__)

T = TypeVar("T")

#: POST paths of webhooks and the payload kind each expects
WEBHOOK_PATHS = {"/webhooks/registry": "registry", "/webhooks/harbor": "harbor", "/webhooks": "auto"}
MISS_PATH = "/publish-on-miss"
#: requests allowed to wait for a handler thread, per thread
QUEUE_PER_WORKER = 4

HTTP_REFUSED = Counter(
    "cvmfs_snap_publisher_http_refused_total",
    "HTTP requests answered early: busy (503), body too slow (408), too large (413), no length (411)", ["reason"],
    registry=metrics.REGISTRY,
)


class _SendTimeout(Exception):
    """The client did not take an answer within ``request_timeout``."""


class _Refused(Exception):
    """A request answered early (bad framing, too large, too slow); the connection is closed after it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def reason(self) -> str:
        return {503: "busy", 408: "slow-body", 413: "too-large", 411: "no-length"}.get(self.code, "bad-request")


class Endpoint:
    """The ASGI application: routes, authentication, body limits; the meaning of requests is :class:`Intake`'s."""

    def __init__(self, intake: Intake, settings: DaemonConfig, *, health: Callable[[], dict[str, object]],
                 status: Callable[[], dict[str, object]]) -> None:
        self.intake = intake
        self.settings = settings
        self._health = health
        self._status = status
        self._pool = ThreadPoolExecutor(max_workers=settings.http_workers, thread_name_prefix="http")
        self._waiting = 0  # requests waiting for or running on a pool thread (touched only on the event loop)

    @property
    def pending(self) -> int:
        """Requests running on or waiting for a handler thread."""
        return self._waiting

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            try:
                await self._http(scope, receive, self._timed(send))
            except _SendTimeout:
                # the client does not read its answer: returning unfinished makes hypercorn close the connection
                log.debug("HTTP client %s did not read its answer within %gs; connection closed",
                          scope["client"], self.settings.request_timeout)
        # websockets are not served: returning without accepting closes them

    def _timed(self, send: ASGISendCallable) -> ASGISendCallable:
        """``send`` with a deadline: a client that stops reading must not keep a connection open forever."""
        timeout = self.settings.request_timeout

        async def timed_send(message: ASGISendEvent) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await send(message)
            except TimeoutError:
                raise _SendTimeout() from None

        return timed_send

    async def _http(self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        method, path = scope["method"], scope["path"]
        peer = scope["client"]
        client = f"{peer[0]}:{peer[1]}" if peer else "?"
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers[name.lower()] = value
        try:
            if method in ("GET", "HEAD"):
                await self._get(path, send)
            elif method == "POST":
                await self._post(path, headers, client, receive, send)
            else:
                await _respond(send, 405, {"error": f"method {method} not allowed"},
                               headers=[(b"allow", b"GET, HEAD, POST")])
        except _Refused as exc:
            HTTP_REFUSED.labels(exc.reason).inc()
            await _respond(send, exc.code, {"error": str(exc)}, close=True)

    async def _get(self, path: str, send: ASGISendCallable) -> None:
        if path == "/metrics":
            body = await self._run(lambda: generate_latest(metrics.REGISTRY))
            await _respond_raw(send, 200, body, CONTENT_TYPE_LATEST.encode())
        elif path == "/healthz":
            await _respond(send, 200, await self._run(self._health))
        elif path == "/status":
            await _respond(send, 200, await self._run(self._status))
        else:
            await _respond(send, 404, {"error": f"no such endpoint {path}"})

    async def _post(self, path: str, headers: dict[bytes, bytes], client: str, receive: ASGIReceiveCallable,
                    send: ASGISendCallable) -> None:
        kind = WEBHOOK_PATHS.get(path)
        if kind is None and path != MISS_PATH:
            await _respond(send, 404, {"error": f"no such endpoint {path}"}, close=True)
            return
        # one shared secret guards every POST endpoint: registry webhooks and node reports alike; it is checked on
        # the headers, before a byte of the body is read
        auth = headers.get(b"authorization")
        if not check_authorization(auth.decode("latin-1") if auth is not None else None,
                                   self.settings.webhook_secret):
            if kind is not None:
                WEBHOOKS_RECEIVED.labels(kind, "unauthorized").inc()
            else:
                MISSES_RECEIVED.labels("unauthorized").inc()
            log.warning("POST %s from %s refused: missing or wrong Authorization", path, client)
            await _respond(send, 401, {"error": "missing or wrong Authorization header"}, close=True,
                           headers=[(b"www-authenticate", b'Bearer realm="cvmfs-snap-publisher"')])
            return
        body = await self._body(headers, receive)
        if body is None:
            return  # the client went away
        try:
            if kind is not None:
                result = await self._run(lambda: self.intake.handle_webhook(kind, body))
                answer: Answer = (200, dict(result))
            else:
                answer = await self._run(lambda: self.intake.handle_miss(body))
        except InvalidInputError as exc:
            log.warning("malformed POST %s from %s: %s", path, client, exc)
            await _respond(send, 400, {"error": str(exc)})
            return
        except CvmfsSnapError as exc:  # e.g. the repository cannot be read to check a layer
            log.error("POST %s from %s not handled: %s", path, client, exc)
            await _respond(send, 503, {"error": str(exc)})
            return
        code, payload = answer
        extra = [(b"retry-after", str(payload["retry_after"]).encode())] if code == 429 else []
        await _respond(send, code, payload, headers=extra)

    async def _body(self, headers: dict[bytes, bytes], receive: ASGIReceiveCallable) -> bytes | None:
        """The request body, bounded in size and time; None when the client disconnected."""
        length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if length is None and not chunked:
            raise _Refused(411, "Content-Length required")
        if length is not None:
            if not length.strip().isdigit():
                raise _Refused(400, "Content-Length is not a number")
            if int(length) > MAX_BODY:
                raise _Refused(413, f"body larger than {MAX_BODY} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    if message["type"] != "http.request":
                        continue
                    data = message.get("body", b"")
                    size += len(data)
                    if size > MAX_BODY:
                        raise _Refused(413, f"body larger than {MAX_BODY} bytes")
                    chunks.append(data)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise _Refused(408, f"request body not received within {self.settings.request_timeout:g}s") from None

    async def _run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a handler thread; 503 when too many requests wait for one already."""
        if self._waiting >= self.settings.http_workers * QUEUE_PER_WORKER:
            raise _Busy()
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        finally:
            self._waiting -= 1


class _Busy(_Refused):
    def __init__(self) -> None:
        super().__init__(503, "the publisher is busy; retry in a second")


async def _respond(send: ASGISendCallable, code: int, payload: object, *, close: bool = False,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = (json.dumps(payload, indent=1) + "\n").encode()
    await _respond_raw(send, code, body, b"application/json", close=close, headers=headers)


async def _respond_raw(send: ASGISendCallable, code: int, body: bytes, content_type: bytes, *, close: bool = False,
                       headers: list[tuple[bytes, bytes]] | None = None) -> None:
    all_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(headers or [])]
    if close:
        all_headers.append((b"connection", b"close"))
    if code == 503:
        all_headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": code, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
