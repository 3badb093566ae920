"""How cvmfs-snap speaks HTTP to registries: the plain-HTTP policy, redirects, deadlines, the retry policy.

* **plain-HTTP policy** (:class:`TransportPolicy`): HTTPS everywhere; plain HTTP only to loopback hosts
  (``localhost``, 127.0.0.0/8, ``::1``) and to hosts the site configured insecure. A reference written
  ``http://host/...`` does not make a host insecure: for any other host it is refused before a request is made, so
  credentials can never go over plain HTTP to a registry nobody configured that way.
* **redirects** (:meth:`Transport.send`): followed by hand, at most ``max_redirects``; a redirect to plain HTTP
  (a downgrade from HTTPS, or plain HTTP to a new host) is refused unless the target is allowed plain HTTP;
  ``Authorization`` is added only by the auth flow given, which adds it only for its own origin (so it never
  follows a redirect to blob storage).
* **deadlines** (:class:`Deadline`): every manifest, token and blob transfer has an overall deadline, in addition to
  httpx's per-operation timeouts, so a server trickling one byte per second cannot hold a worker forever: bodies
  are checked chunk by chunk, and every socket operation while a request is sent and its response head read
  (connect, TLS handshake, status line, headers) waits at most until the deadline (:class:`_DeadlineBackend`).
* **retries** (:class:`RetryPolicy`): exponential backoff with jitter, capped; ``Retry-After`` honoured (one parser,
  :func:`parse_retry_after`).
* **lazy TLS**: the CA bundle is loaded when the first HTTPS request is made, not when the client is created (a
  pull from a loopback registry never loads it).
"""

from __future__ import annotations

import contextvars
import email.utils
import functools
import json
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from cvmfs_snap.errors import IntegrityError, InvalidInputError, UnavailableError
from cvmfs_snap.oci.reference import ImageReference, is_loopback

log = logging.getLogger(__name__)

USER_AGENT = "cvmfs-snap/0.1"
REDIRECTS = (301, 302, 303, 307, 308)
ERROR_BODY_LIMIT = 64 * 1024
#: overall deadline of one manifest, token or tag-list transfer (retries included), seconds
DEFAULT_TRANSFER_DEADLINE = 300.0
#: a blob transfer may take ``transfer_deadline + declared size / min_rate`` seconds
DEFAULT_BLOB_MIN_RATE = 256 * 1024
_PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class Retryable(Exception):
    """A transient failure (5xx, 429, token server trouble) worth another attempt of the whole request."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after




def norm_host(h: str) -> str:
    """``https://Host:5000/`` -> ``host:5000`` (how insecure-registry entries are compared)."""
    h = h.strip().lower()
    for scheme in ("https://", "http://"):
        if h.startswith(scheme):
            h = h[len(scheme):]
    return h.rstrip("/")


def origin(url: httpx.URL) -> tuple[str, str, int]:
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.scheme, url.host.lower(), port


def safe_url(url: httpx.URL | str) -> str:
    """URL for logs and messages: without query (signed storage URLs carry secrets there) and user info."""
    try:
        u = httpx.URL(url)
        return str(u.copy_with(query=None, fragment=None, username=None, password=None))
    except (httpx.InvalidURL, TypeError, ValueError):
        return "<unparsable URL>"


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` (seconds or an HTTP date) -> seconds from now; None if absent or unparsable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class TransportPolicy:
    """Which hosts may be spoken to in plain HTTP: loopback and ``insecure`` (normalised host[:port]) only; never
    the ``tls`` hosts (a site's ``hosts.toml`` naming a loopback host with ``https://``: a local TLS mirror)."""

    insecure: frozenset[str] = frozenset()
    tls: frozenset[str] = frozenset()

    @classmethod
    def of(cls, insecure_registries: Iterable[str], tls_registries: Iterable[str] = ()) -> TransportPolicy:
        return cls(frozenset(norm_host(h) for h in insecure_registries),
                   frozenset(norm_host(h) for h in tls_registries))

    def plain_allowed(self, host: str) -> bool:
        h = host.lower()
        if h in self.tls:
            return False
        return h in self.insecure or is_loopback(h)

    def scheme(self, ref: ImageReference) -> str:
        """``http`` or ``https`` for ``ref``'s registry; InvalidInputError for an ``http://`` reference to a host
        that is neither loopback nor configured insecure (before any request is made)."""
        plain = self.plain_allowed(ref.api_host)  # the host spoken to (Docker Hub's aliases: registry-1.docker.io)
        if ref.insecure and not plain:
            raise InvalidInputError(
                f"image reference http://{ref} asks for plain HTTP to {ref.registry}, which is not configured as "
                "an insecure registry: refusing (credentials and images would travel unprotected). Write it "
                "without http:// to use HTTPS, or add the host to the insecure registries of the configuration")
        return "http" if plain else "https"

    def base_url(self, ref: ImageReference) -> str:
        return f"{self.scheme(ref)}://{ref.api_host}"


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts and backoff of one logical request."""

    retries: int = 4
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    max_retry_after: float = 120.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        base: float = min(self.backoff_cap, self.backoff_base * (2 ** attempt))
        return base * (0.5 + random.random() / 2)


class Deadline:
    """The overall deadline of one transfer; :meth:`check` raises UnavailableError once it has passed."""

    def __init__(self, seconds: float, what: str, host: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.what = what
        self.host = host
        self._clock = clock
        self._end = clock() + seconds

    def remaining(self) -> float:
        return self._end - self._clock()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def error(self, done: str = "") -> UnavailableError:
        extra = f" ({done})" if done else ""
        return UnavailableError(
            f"registry {self.host} too slow: {self.what} did not complete within its deadline of "
            f"{self.seconds:.0f} s{extra}; the registry or the network is overloaded or hostile. Retry later, or "
            "raise the transfer deadline in the configuration if this link is really that slow")

    def check(self, done: str = "") -> None:
        if self.expired():
            raise self.error(done)


#: the monotonic time the current thread's transfer must end by (set while a request is sent and its headers read)
_TRANSFER_END: contextvars.ContextVar[float | None] = contextvars.ContextVar("cvmfs_snap_transfer_end", default=None)


def _capped(timeout: float | None) -> float | None:
    """``timeout`` of one socket operation, cut to what is left of the transfer's deadline."""
    end = _TRANSFER_END.get()
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the transfer's overall deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read/write/handshake waits at most until the transfer's deadline, so a server
    trickling its status line and headers a byte at a time is cut off too (httpx only bounds each operation)."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _capped(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _capped(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, _capped(timeout)))

    def get_extra_info(self, info: str) -> object:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's own sync backend, with :class:`_DeadlineStream` around its sockets."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(host, port, _capped(timeout), local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _capped(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


@functools.cache
def _unused_tls_context() -> ssl.SSLContext:
    """What httpx's transport is given for plain HTTP: it makes a TLS context of its own even for ``verify=False``
    (about 1 ms each, for every client: the lazyfs process and the snapshotter make clients on the Prepare path),
    and the pool that replaces its own never uses it. One per process, never used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _deadline_transport(ssl_context: ssl.SSLContext | None) -> httpx.HTTPTransport:
    """httpx's transport on a connection pool with :class:`_DeadlineBackend` (httpcore's network-backend extension
    point, which httpx does not expose: the pool is swapped in after construction, with httpx's default limits)."""
    t = httpx.HTTPTransport(verify=ssl_context if ssl_context is not None else _unused_tls_context())
    t._pool = httpcore.ConnectionPool(ssl_context=ssl_context, max_connections=100, max_keepalive_connections=20,
                                      keepalive_expiry=5.0, network_backend=_DeadlineBackend())
    return t


class _LazyTransport(httpx.BaseTransport):
    """Creates its real transport (and so its SSL context) on first use."""

    def __init__(self, factory: Callable[[], httpx.BaseTransport]) -> None:
        self._factory = factory
        self._real: httpx.BaseTransport | None = None
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        real = self._real
        if real is None:
            with self._lock:
                if self._real is None:
                    self._real = self._factory()
                real = self._real
        return real.handle_request(request)

    def close(self) -> None:
        if self._real is not None:
            self._real.close()


class _SchemeTransport(httpx.BaseTransport):
    """Plain HTTP to one transport, HTTPS to another (created lazily)."""

    def __init__(self, plain: httpx.BaseTransport, tls: httpx.BaseTransport) -> None:
        self._plain = plain
        self._tls = tls

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return (self._tls if request.url.scheme == "https" else self._plain).handle_request(request)

    def close(self) -> None:
        self._plain.close()
        self._tls.close()


_tls_contexts = 0
#: one SSL context per CA bundle for the whole process: each holds its parsed CA certificates (about 1 MiB of RSS
#: for certifi's), and the lazyfs process has a client per attached layer (issue 9's RSS goal). A context is safe
#: to share between clients and threads; nothing changes it after it is made.
_contexts: dict[str | None, ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def tls_contexts_made() -> int:
    """How many TLS contexts (CA bundle loads) this process has made so far."""
    return _tls_contexts


def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    global _tls_contexts
    with _contexts_lock:
        ctx = _contexts.get(ca_bundle)
        if ctx is None:
            _tls_contexts += 1
            if ca_bundle:
                ctx = ssl.create_default_context(cafile=ca_bundle)
            else:
                ctx = httpx.create_ssl_context(trust_env=True)  # certifi, or SSL_CERT_FILE / SSL_CERT_DIR
            _contexts[ca_bundle] = ctx
        return ctx


def drain(resp: httpx.Response, limit: int = ERROR_BODY_LIMIT) -> bytes:
    """Read at most ``limit`` bytes of a (small, usually error) response body and close it.

    Tolerates broken bodies: docker-registry, for one, declares the blob's Content-Length on a 416 and then sends
    a short error text.
    """
    buf = bytearray()
    try:
        for chunk in resp.iter_bytes():
            buf += chunk
            if len(buf) >= limit:
                break
    except httpx.HTTPError:
        pass
    finally:
        resp.close()
    return bytes(buf[:limit])


def registry_error(body: bytes) -> str:
    """The registry's own error code/message (distribution's JSON error body), or a short text body."""
    try:
        obj = json.loads(body)
        errs = obj.get("errors") if isinstance(obj, dict) else None
        if isinstance(errs, list) and errs:
            parts = []
            for e in errs[:3]:
                if isinstance(e, dict):
                    parts.append(f"{e.get('code', '')}: {e.get('message', '')}".strip(": "))
            return "; ".join(p for p in parts if p)
    except ValueError:
        pass
    text = body.decode("utf-8", "replace").strip()
    return text[:200] if text and "<html" not in text.lower() else ""


def read_limited(resp: httpx.Response, limit: int, what: str, deadline: Deadline | None = None) -> bytes:
    """The whole body of ``resp`` (closed afterwards), at most ``limit`` bytes, within ``deadline``."""
    cl = resp.headers.get("content-length")
    if cl and cl.isdigit() and int(cl) > limit:
        resp.close()
        raise InvalidInputError(f"{what} is {cl} bytes, more than the {limit} bytes allowed here")
    buf = bytearray()
    try:
        for chunk in resp.iter_bytes():
            buf += chunk
            if len(buf) > limit:
                raise InvalidInputError(f"{what} is larger than the {limit} bytes allowed here")
            if deadline is not None:
                deadline.check(f"{len(buf)} bytes received")
    except httpx.RemoteProtocolError as e:
        raise IntegrityError(f"{what} is truncated: the server closed the connection after {len(buf)} "
                             f"bytes ({e}); retry") from None
    except httpx.TransportError as e:
        raise UnavailableError(f"reading {what} failed after {len(buf)} bytes: {type(e).__name__}: {e}; "
                               "retry later") from None
    finally:
        resp.close()
    return bytes(buf)


class Transport:
    """The HTTP client of one RegistryClient: connection pool, lazy TLS, policy, redirects. Thread-safe."""

    def __init__(
        self,
        policy: TransportPolicy,
        timeout: float = 30.0,
        *,
        max_redirects: int = 5,
        user_agent: str = USER_AGENT,
        ca_bundle: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        self.max_redirects = max_redirects
        if transport is None and not any(os.environ.get(k) for k in _PROXY_ENV):
            # no proxy from the environment: our own transports, so that TLS is set up only when first needed
            transport = _SchemeTransport(_deadline_transport(None),
                                         _LazyTransport(lambda: _deadline_transport(_ssl_context(ca_bundle))))
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"User-Agent": user_agent},
            # with a proxy from the environment httpx builds the transports (and the SSL context) itself
            verify=_ssl_context(ca_bundle) if transport is None else True,
            trust_env=True,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def send(self, method: str, url: httpx.URL, headers: dict[str, str], auth: httpx.Auth | None = None,
             deadline: Deadline | None = None, content: bytes | None = None) -> httpx.Response:
        """Send with redirects followed by hand; returns the final, *open* (streaming) response.

        ``url`` must be allowed by the policy (plain HTTP only to allowed hosts); so must every redirect target
        reached from HTTPS. ``auth`` (an httpx auth flow) is applied to every hop and decides itself where to
        send credentials."""
        if url.scheme == "http" and not self.policy.plain_allowed(url.netloc.decode()):
            raise InvalidInputError(f"refusing plain HTTP to {safe_url(url)}: {url.host} is neither loopback nor "
                                    "configured as an insecure registry")
        for _hop in range(self.max_redirects + 1):
            timeout: httpx.Timeout | float = self.timeout
            if deadline is not None:
                deadline.check()
                timeout = max(0.001, min(self.timeout, deadline.remaining()))
            req = self._http.build_request(method, url, headers=headers, timeout=timeout, content=content)
            token = _TRANSFER_END.set(None if deadline is None else time.monotonic() + deadline.remaining())
            try:
                resp = self._http.send(req, stream=True, auth=auth)
            finally:
                _TRANSFER_END.reset(token)
            if resp.status_code in REDIRECTS and "location" in resp.headers:
                target = resp.url.join(resp.headers["location"])
                resp.close()
                if target.scheme not in ("http", "https"):
                    raise UnavailableError(f"{safe_url(url)} redirected to an unsupported URL scheme "
                                           f"{target.scheme!r}")
                if target.scheme == "http" and not self.policy.plain_allowed(target.netloc.decode()):
                    raise UnavailableError(f"{safe_url(url)} redirected to plain HTTP ({safe_url(target)}); "
                                           "refusing the downgrade. Add that host to the insecure registries of the "
                                           "configuration if this is intended")
                log.debug("%s %s redirected to %s", method, safe_url(url), safe_url(target))
                if resp.status_code == 303:
                    method = "GET"
                url = target
                continue
            return resp
        raise UnavailableError(f"more than {self.max_redirects} redirects starting at {safe_url(url)}")
