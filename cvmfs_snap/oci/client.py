"""RegistryClient: the one way cvmfs-snap talks to an OCI distribution registry.

What it handles so that callers do not have to:

* **transport policy**: HTTPS everywhere, plain HTTP only for registries configured as insecure, written with
  ``http://``, or on loopback; timeouts on every request; redirects (to blob storage) followed by hand so that the
  ``Authorization`` header is only ever sent to the registry's own origin;
* **auth**: anonymous or credentialed Bearer tokens (``WWW-Authenticate`` challenge -> token server), Basic auth,
  a token cache shared by threads, one retry with a fresh token on 401;
* **retries**: exponential backoff with jitter, capped, on 5xx, 429 (``Retry-After`` honoured) and connection
  errors; afterwards an UnavailableError naming the host and what failed;
* **integrity**: manifest digests computed over the raw bytes and checked against what was asked for; blobs
  streamed through sha256 and checked at EOF; sizes checked against descriptors;
* **ranges**: single and multi-range reads, with per-host memory of what the registry supports.

One client is meant to be shared by a pool of worker threads: httpx's connection pool is thread-safe, and the
mutable state here (token cache, auth challenges, range capabilities) is guarded by locks.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import ipaddress
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from cvmfs_snap.errors import (
    AuthError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from cvmfs_snap.oci.auth import Challenge, Credentials, CredentialStore, TokenCache, parse_www_authenticate
from cvmfs_snap.oci.manifest import (
    ACCEPT_MANIFESTS,
    INDEX_TYPES,
    MAX_MANIFEST_SIZE,
    Index,
    Manifest,
    Platform,
    compute_digest,
    parse_manifest,
)
from cvmfs_snap.oci.reference import ImageReference, validate_digest

log = logging.getLogger(__name__)

USER_AGENT = "cvmfs-snap/0.1"
_REDIRECTS = (301, 302, 303, 307, 308)
#: a registry that ignores Range: blobs up to this size are downloaded whole (and verified) and sliced locally
DEFAULT_RANGE_FALLBACK_LIMIT = 16 * 1024 * 1024
#: at most this many ranges in one multi-range request (keeps the Range header reasonable)
MAX_RANGES_PER_REQUEST = 32
#: small blobs (configs) read by get_blob; larger ones must be streamed with open_blob
DEFAULT_MAX_BLOB_BYTES = 64 * 1024 * 1024
_ERROR_BODY_LIMIT = 64 * 1024


@dataclass
class RangeSupport:
    """What a registry host did with Range requests so far (None = not tried yet)."""

    single: bool | None = None
    multi: bool | None = None


class _Retryable(Exception):
    """Internal: a transient failure (5xx, 429, token server trouble) worth another attempt."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _is_loopback(host: str) -> bool:
    """``host[:port]`` is localhost, 127.0.0.0/8 or ::1."""
    h = host.lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    else:
        h = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.scheme, url.host.lower(), port


def _safe_url(url: httpx.URL) -> str:
    """URL for logs and messages: without query (signed storage URLs carry secrets there) and user info."""
    return str(url.copy_with(query=None, fragment=None, username=None, password=None))


def _parse_retry_after(value: str | None) -> float | None:
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


def _drain(resp: httpx.Response, limit: int = _ERROR_BODY_LIMIT) -> bytes:
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


def _registry_error(body: bytes) -> str:
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


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def parse_multipart_byteranges(body: bytes, content_type: str) -> list[tuple[int, int, bytes]]:
    """Parse a ``multipart/byteranges`` body into (start, end inclusive, data) parts.

    Each part's length is taken from its Content-Range, not from searching the boundary, so binary data that
    happens to contain the boundary string cannot confuse the parser.
    """
    m = re.search(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', content_type, re.IGNORECASE)
    if not m:
        raise ValueError("multipart/byteranges response without boundary")
    delim = b"--" + (m.group(1) or m.group(2)).encode("latin-1")
    parts: list[tuple[int, int, bytes]] = []
    pos = body.find(delim)
    if pos < 0:
        raise ValueError("multipart boundary not found in body")
    while True:
        pos += len(delim)
        if body[pos:pos + 2] == b"--":
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("truncated multipart body")
        hdr_end = body.find(b"\r\n\r\n", eol)
        if hdr_end < 0:
            raise ValueError("truncated multipart part headers")
        headers: dict[str, str] = {}
        for line in body[eol + 2:hdr_end].split(b"\r\n"):
            k, sep, v = line.decode("latin-1").partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        cr = _parse_content_range(headers.get("content-range"))
        if cr is None:
            raise ValueError("multipart part without a valid Content-Range")
        start, end, _ = cr
        if end < start:
            raise ValueError("multipart part with an inverted range")
        data_start = hdr_end + 4
        data = body[data_start:data_start + end - start + 1]
        if len(data) != end - start + 1:
            raise ValueError("truncated multipart part data")
        parts.append((start, end, data))
        pos = body.find(delim, data_start + len(data))
        if pos < 0:
            raise ValueError("multipart body without closing boundary")


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, coalesced [start, end) spans covering all (offset, length) ranges (overlapping or adjacent merge).

    Servers (Go's http.ServeContent, so docker-registry) answer 200 with the whole blob when requested ranges
    overlap, so overlapping ranges are never sent as such.
    """
    spans: list[tuple[int, int]] = []
    for off, length in sorted((o, n) for o, n in ranges if n > 0):
        end = off + length
        if spans and off <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((off, end))
    return spans


class BlobStream(io.RawIOBase):
    """A blob download as a binary file object; the digest (and size, when known) is checked at EOF.

    ``read`` returning ``b""`` means the blob was complete and verified; a mismatch raises IntegrityError instead.
    Closing early (without reaching EOF) skips the check: the caller did not use the rest.
    """

    def __init__(self, resp: httpx.Response, image: str, digest: str, expected_size: int | None) -> None:
        super().__init__()
        self._resp = resp
        self._image = image
        self._digest = digest
        self._host = resp.url.host
        algo = digest.split(":", 1)[0]
        self._hasher = hashlib.new(algo)
        self._expected = expected_size
        self._iter: Iterator[bytes] = resp.iter_bytes()
        self._chunk = b""
        self._pos = 0
        self._count = 0
        self._eof = False
        self.verified = False

    @property
    def bytes_read(self) -> int:
        """Bytes received from the server so far."""
        return self._count

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bool:
        try:
            chunk = next(self._iter)
        except StopIteration:
            return False
        except httpx.RemoteProtocolError as e:
            raise IntegrityError(
                f"blob {self._digest} of {self._image} is truncated: the server closed the connection after "
                f"{self._count} bytes ({e}); retry, and if it persists the registry's copy is broken") from None
        except httpx.TransportError as e:
            raise UnavailableError(
                f"download of blob {self._digest} of {self._image} from {self._host} failed after {self._count} "
                f"bytes: {type(e).__name__}: {e}; retry later") from None
        self._count += len(chunk)
        self._hasher.update(chunk)
        if self._expected is not None and self._count > self._expected:
            raise IntegrityError(f"blob {self._digest} of {self._image} is larger than the {self._expected} bytes "
                                 "its descriptor says; the registry served different content")
        self._chunk, self._pos = chunk, 0
        return True

    def _finish(self) -> None:
        self._eof = True
        self._resp.close()
        if self._expected is not None and self._count != self._expected:
            raise IntegrityError(f"blob {self._digest} of {self._image} is truncated: got {self._count} of "
                                 f"{self._expected} bytes; retry, and if it persists the registry's copy is broken")
        got = f"{self._digest.split(':', 1)[0]}:{self._hasher.hexdigest()}"
        if got != self._digest:
            raise IntegrityError(f"blob {self._digest} of {self._image} does not match its digest (got {got} over "
                                 f"{self._count} bytes): corrupted or tampered content; do not use it")
        self.verified = True

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed blob stream")
        if self._eof:
            return 0
        while self._pos >= len(self._chunk):
            if not self._next_chunk():
                self._finish()
                return 0
        mv = memoryview(buffer).cast("B")
        n = min(len(mv), len(self._chunk) - self._pos)
        mv[:n] = self._chunk[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._resp.close()
        super().close()


class RegistryClient:
    """Client for OCI distribution registries (see module docstring). Thread-safe; close() when done."""

    def __init__(
        self,
        credentials: CredentialStore | None = None,
        insecure_registries: Sequence[str] = (),
        timeout: float = 30.0,
        retries: int = 4,
        *,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_retry_after: float = 120.0,
        max_redirects: int = 5,
        range_fallback_limit: int = DEFAULT_RANGE_FALLBACK_LIMIT,
        user_agent: str = USER_AGENT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        ca_bundle: str | None = None,
    ) -> None:
        if retries < 0:
            raise InvalidInputError(f"retries must be >= 0, got {retries}")
        self.credentials = credentials or CredentialStore()
        self.insecure_registries = frozenset(self._norm_host(h) for h in insecure_registries)
        self.timeout = timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_retry_after = max_retry_after
        self.max_redirects = max_redirects
        self.range_fallback_limit = range_fallback_limit
        self._sleep = sleep
        self._tokens = TokenCache(clock)
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._ranges: dict[str, RangeSupport] = {}
        self._fetch_locks: dict[tuple[str, str], threading.Lock] = {}
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"User-Agent": user_agent},
            # a site CA bundle (e.g. for a registry with a grid CA certificate); else certifi / SSL_CERT_FILE
            verify=ca_bundle if ca_bundle else True,
            trust_env=True,
        )

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RegistryClient(credentials={self.credentials!r}, insecure={sorted(self.insecure_registries)!r})"

    # ------------------------------------------------------------------ transport policy

    @staticmethod
    def _norm_host(h: str) -> str:
        h = h.strip().lower()
        for scheme in ("https://", "http://"):
            if h.startswith(scheme):
                h = h[len(scheme):]
        return h.rstrip("/")

    def _is_insecure(self, host: str) -> bool:
        h = host.lower()
        return h in self.insecure_registries or _is_loopback(h)

    def _base_url(self, ref: ImageReference) -> str:
        """``scheme://api_host``: plain HTTP only for http:// references, insecure registries and loopback."""
        plain = ref.insecure or self._is_insecure(ref.registry) or self._is_insecure(ref.api_host)
        return f"{'http' if plain else 'https'}://{ref.api_host}"

    def range_support(self, ref: ImageReference) -> RangeSupport:
        """What is known about Range support of ``ref``'s registry host (a copy)."""
        with self._lock:
            rs = self._ranges.get(ref.api_host, RangeSupport())
            return RangeSupport(rs.single, rs.multi)

    def _set_ranges(self, host: str, *, single: bool | None = None, multi: bool | None = None) -> None:
        with self._lock:
            rs = self._ranges.setdefault(host, RangeSupport())
            if single is not None:
                if rs.single is not False and single is False:
                    log.warning("registry %s ignores HTTP Range requests: range reads fall back to downloading "
                                "blobs from their start", host)
                rs.single = single
            if multi is not None:
                if rs.multi is not False and multi is False:
                    log.info("registry %s does not serve multi-range requests: using one request per range", host)
                rs.multi = multi

    # ------------------------------------------------------------------ low level: one request, redirects

    def _send_following(self, method: str, url: httpx.URL, headers: dict[str, str], auth_value: str | None,
                        auth_origin: tuple[str, str, int | None], content: bytes | None = None) -> httpx.Response:
        """Send with redirects followed by hand; Authorization goes only to ``auth_origin``. Response is open."""
        first_secure = url.scheme == "https"
        for _hop in range(self.max_redirects + 1):
            h = dict(headers)
            if auth_value and _origin(url) == auth_origin:
                h["Authorization"] = auth_value
            req = self._http.build_request(method, url, headers=h, content=content)
            resp = self._http.send(req, stream=True)
            if resp.status_code in _REDIRECTS and "location" in resp.headers:
                target = resp.url.join(resp.headers["location"])
                resp.close()
                if target.scheme not in ("http", "https"):
                    raise UnavailableError(f"{_safe_url(url)} redirected to an unsupported URL scheme "
                                           f"{target.scheme!r}")
                if first_secure and target.scheme == "http" and not self._is_insecure(target.netloc.decode()):
                    raise UnavailableError(f"{_safe_url(url)} redirected from HTTPS to plain HTTP "
                                           f"({_safe_url(target)}); refusing the downgrade. Add that host to "
                                           "insecure_registries if this is intended")
                log.debug("%s %s redirected to %s", method, _safe_url(url), _safe_url(target))
                if resp.status_code == 303:
                    method = "GET"
                url = target
                continue
            return resp
        raise UnavailableError(f"more than {self.max_redirects} redirects starting at {_safe_url(url)}")

    # ------------------------------------------------------------------ auth

    @staticmethod
    def _scope(ref: ImageReference) -> str:
        return f"repository:{ref.repository}:pull"

    def _creds(self, ref: ImageReference) -> Credentials | None:
        return self.credentials.get(ref.registry) or self.credentials.get(ref.api_host)

    def _auth_value(self, ref: ImageReference, scope: str) -> str | None:
        """The Authorization value to send up front, from what this host asked for before."""
        host = ref.api_host
        with self._lock:
            ch = self._challenges.get(host)
        if ch is None:
            return None
        if ch.scheme == "bearer":
            tok = self._tokens.get(host, scope)
            return f"Bearer {tok if tok is not None else self._token(ref, scope, ch, None)}"
        if ch.scheme == "basic":
            cred = self._creds(ref)
            return cred.basic_header() if cred else None
        return None

    def _token(self, ref: ImageReference, scope: str, ch: Challenge, stale: str | None) -> str:
        """A cached token other than ``stale``, or a new one. One thread fetches per (host, scope) while the
        others wait and reuse its token: a pool starting cold asks the token server once, not once per thread."""
        key = (ref.api_host, scope)
        with self._lock:
            fetch_lock = self._fetch_locks.setdefault(key, threading.Lock())
        with fetch_lock:
            tok = self._tokens.get(*key)
            if tok is not None and tok != stale:
                return tok
            return self._fetch_token(ref, scope, ch)

    def _fetch_token(self, ref: ImageReference, scope: str, ch: Challenge) -> str:
        """Get a Bearer token from the challenge's realm (Basic credentials there when we have them)."""
        host = ref.api_host
        realm = ch.params.get("realm", "")
        try:
            realm_url = httpx.URL(realm)
        except (httpx.InvalidURL, TypeError):
            realm_url = None
        if realm_url is None or realm_url.scheme not in ("http", "https") or not realm_url.host:
            raise AuthError(f"registry {host} asked for a Bearer token with an unusable realm {realm!r}; the "
                            "registry's auth configuration is broken")
        cred = self._creds(ref)
        if realm_url.scheme == "http" and cred is not None and not (
                self._is_insecure(realm_url.netloc.decode()) or self._is_insecure(host)):
            raise AuthError(f"token server {realm_url.host} of registry {host} uses plain HTTP; refusing to send "
                            "credentials there. Fix the registry's token realm or mark it insecure")
        params = {}
        if ch.params.get("service"):
            params["service"] = ch.params["service"]
        params["scope"] = scope
        url = realm_url.copy_merge_params(params)
        who = f"user {cred.username!r}" if cred else "anonymous access"
        resp = self._send_following("GET", url, {"Accept": "application/json"},
                                    cred.basic_header() if cred else None, _origin(realm_url))
        try:
            body = _drain(resp, 1024 * 1024)
            if resp.status_code in (401, 403):
                raise AuthError(
                    f"token server {realm_url.host} refused {who} for {scope} of registry {host} "
                    f"(HTTP {resp.status_code}); "
                    + ("check the username/password in the docker config.json used by cvmfs-snap"
                       if cred else "this image needs credentials: add them to the docker config.json "
                       "used by cvmfs-snap (docker login)"))
            if resp.status_code == 429 or resp.status_code >= 500:
                raise _Retryable(f"token server {realm_url.host} answered HTTP {resp.status_code}",
                                 _parse_retry_after(resp.headers.get("retry-after")))
            if resp.status_code != 200:
                raise AuthError(f"token server {realm_url.host} of registry {host} answered HTTP "
                                f"{resp.status_code} for {scope}; check the registry's auth configuration")
            try:
                obj = json.loads(body)
            except ValueError:
                obj = None
        finally:
            resp.close()
        token = (obj.get("token") or obj.get("access_token")) if isinstance(obj, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError(f"token server {realm_url.host} of registry {host} sent no token for {scope}")
        assert isinstance(obj, dict)
        expires_in = obj.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else 0.0
        issued = obj.get("issued_at")
        if lifetime and isinstance(issued, str):
            try:
                from datetime import datetime

                age = time.time() - datetime.fromisoformat(issued.replace("Z", "+00:00")).timestamp()
                # honour issued_at, unless clocks are so skewed that the token would look dead on arrival
                if 0 < age < lifetime:
                    lifetime -= age
            except ValueError:
                pass
        self._tokens.put(host, scope, token, lifetime)
        log.debug("got a token for %s on %s (%s)", scope, host, who)
        return token

    def _on_unauthorized(self, ref: ImageReference, scope: str, resp: httpx.Response,
                         sent: str | None) -> str | None:
        """After a 401: remember the challenge and produce new Authorization (None if there is nothing to try)."""
        challenges = parse_www_authenticate(resp.headers.get_list("www-authenticate"))
        host = ref.api_host
        ch = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None)
        if ch is None:
            return None
        with self._lock:
            self._challenges[host] = ch
        if ch.scheme == "bearer":
            stale = sent[len("Bearer "):] if sent and sent.startswith("Bearer ") else None
            if stale:
                self._tokens.invalidate(host, scope, stale)
            return f"Bearer {self._token(ref, scope, ch, stale)}"
        cred = self._creds(ref)
        if cred is None:
            return None
        value = cred.basic_header()
        return None if value == sent else value

    def _auth_error(self, ref: ImageReference, what: str, status: int, detail: str) -> AuthError:
        cred = self._creds(ref)
        if cred is None:
            hint = ("no credentials are configured for this registry: add them to the docker config.json used by "
                    "cvmfs-snap (docker login), or check that the image name is right")
        else:
            hint = (f"the credentials of user {cred.username!r} were refused or lack pull access: check them in "
                    "the docker config.json used by cvmfs-snap")
        extra = f" ({detail})" if detail else ""
        return AuthError(f"registry {ref.api_host} denied access to {what} (HTTP {status}){extra}; {hint}")

    # ------------------------------------------------------------------ request with auth + retries

    def _request(self, ref: ImageReference, method: str, url: str | httpx.URL, what: str,
                 headers: dict[str, str] | None = None, ok: Sequence[int] = (200,), *,
                 content: bytes | None = None, scope: str | None = None) -> httpx.Response:
        """One logical request: auth, redirects, retries, error mapping. Returns an *open* (streaming) response
        whose status is in ``ok``; the caller closes it."""
        target = httpx.URL(url)
        auth_origin = _origin(httpx.URL(self._base_url(ref)))
        scope = scope or self._scope(ref)
        hdrs = dict(headers or {})
        last = ""
        for attempt in range(self.retries + 1):
            retry_after: float | None = None
            try:
                sent = self._auth_value(ref, scope)
                resp = self._send_following(method, target, hdrs, sent, auth_origin, content)
                body: bytes | None = None
                if resp.status_code == 401:
                    body = _drain(resp)
                    new = self._on_unauthorized(ref, scope, resp, sent)
                    if new is not None:
                        sent = new
                        resp = self._send_following(method, target, hdrs, sent, auth_origin, content)
                        body = None
                if resp.status_code in ok:
                    return resp
                detail = _registry_error(_drain(resp) if body is None else body)
                status = resp.status_code
                if status in (401, 403):
                    raise self._auth_error(ref, what, status, detail)
                if status == 429 or status >= 500:
                    retry_after = _parse_retry_after(resp.headers.get("retry-after"))
                    raise _Retryable(f"HTTP {status}" + (f" ({detail})" if detail else ""), retry_after)
                extra = f": {detail}" if detail else ""
                if status == 404:
                    raise NotFoundError(f"{what} not found on registry {ref.api_host} (HTTP 404{extra}); check "
                                        "the image name, tag and digest")
                raise InvalidInputError(f"registry {ref.api_host} rejected the request for {what} "
                                        f"(HTTP {status}{extra})")
            except _Retryable as e:
                last, retry_after = str(e), e.retry_after
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt < self.retries:
                delay = self._backoff(attempt, retry_after)
                log.warning("%s %s for %s failed (%s); retry %d/%d in %.1fs", method, _safe_url(target), what,
                            last, attempt + 1, self.retries, delay)
                self._sleep(delay)
        raise UnavailableError(f"registry {ref.api_host} unavailable: {method} of {what} failed after "
                               f"{self.retries + 1} attempts, last error: {last}; check that the registry is up "
                               "and reachable from this host, then retry")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        base: float = min(self.backoff_cap, self.backoff_base * (2 ** attempt))
        return base * (0.5 + random.random() / 2)

    @staticmethod
    def _read_limited(resp: httpx.Response, limit: int, what: str) -> bytes:
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
        except httpx.RemoteProtocolError as e:
            raise IntegrityError(f"{what} is truncated: the server closed the connection after {len(buf)} "
                                 f"bytes ({e}); retry") from None
        except httpx.TransportError as e:
            raise UnavailableError(f"reading {what} failed after {len(buf)} bytes: {type(e).__name__}: {e}; "
                                   "retry later") from None
        finally:
            resp.close()
        return bytes(buf)

    def _url(self, ref: ImageReference, tail: str) -> str:
        return f"{self._base_url(ref)}/v2/{ref.repository}/{tail}"

    # ------------------------------------------------------------------ manifests

    def get_manifest(self, ref: ImageReference) -> Manifest | Index:
        """Fetch and parse the manifest or index ``ref`` names; verified against ``ref.digest`` when present."""
        what = f"manifest of {ref}"
        resp = self._request(ref, "GET", self._url(ref, f"manifests/{ref.reference}"), what,
                             headers={"Accept": ", ".join(ACCEPT_MANIFESTS)})
        ctype = resp.headers.get("content-type", "")
        header_digest = resp.headers.get("docker-content-digest", "")
        raw = self._read_limited(resp, MAX_MANIFEST_SIZE, what)
        algo = ref.digest.split(":", 1)[0] if ref.digest else "sha256"
        digest = compute_digest(raw, algo)
        if ref.digest and digest != ref.digest:
            raise IntegrityError(f"registry {ref.api_host} served a manifest for {ref} whose digest is {digest}, "
                                 f"not the {ref.digest} asked for: tampered or corrupted; do not use it")
        if not ref.digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise IntegrityError(f"manifest of {ref}: the registry says its digest is {header_digest} but the "
                                 f"bytes received hash to {digest}: corrupted in transit or tampered; retry")
        return parse_manifest(raw, ctype, str(ref), digest)

    def resolve(self, ref: ImageReference, platform: Platform | None = None) -> tuple[Manifest, Index | None]:
        """The image manifest for ``platform`` (default: this host's), and the index it came from (None for
        single-platform images, whose platform is not checked here: it lives in the config blob)."""
        wanted = platform or Platform.host()
        obj = self.get_manifest(ref)
        if isinstance(obj, Manifest):
            return obj, None
        desc = obj.select(wanted, str(ref))
        if desc.media_type in INDEX_TYPES:
            raise InvalidInputError(f"image {ref}: the {wanted} entry of its index is itself an index "
                                    f"({desc.digest}); nested indexes are not supported")
        child = self.get_manifest(ref.with_digest(desc.digest))
        if not isinstance(child, Manifest):
            raise InvalidInputError(f"image {ref}: the {wanted} entry {desc.digest} is not an image manifest")
        if len(child.raw) != desc.size:
            raise IntegrityError(f"image {ref}: manifest {desc.digest} is {len(child.raw)} bytes but the index "
                                 f"says {desc.size}; the index is inconsistent")
        return child, obj

    def list_platforms(self, ref: ImageReference) -> list[Platform]:
        """Platforms the image exists for: from the index, or from the config of a single-platform image."""
        obj = self.get_manifest(ref)
        if isinstance(obj, Index):
            return obj.platforms()
        raw = self.get_blob(ref, obj.config.digest, size=obj.config.size)
        try:
            cfg = json.loads(raw)
            p = Platform(str(cfg["os"]), str(cfg["architecture"]), str(cfg.get("variant") or ""))
        except (ValueError, KeyError, TypeError):
            raise InvalidInputError(
                f"config {obj.config.digest} of image {ref} has no valid os/architecture") from None
        return [p]

    # ------------------------------------------------------------------ blobs

    def open_blob(self, ref: ImageReference, digest: str, size: int | None = None) -> BlobStream:
        """Stream a blob; the returned file object raises IntegrityError at EOF if digest or size are wrong."""
        validate_digest(digest)
        what = f"blob {digest} of {ref.name}"
        resp = self._request(ref, "GET", self._url(ref, f"blobs/{digest}"), what,
                             headers={"Accept-Encoding": "identity"})
        cl = resp.headers.get("content-length")
        if size is not None and cl and cl.isdigit() and int(cl) != size:
            resp.close()
            raise IntegrityError(f"{what}: the registry announces {cl} bytes but the descriptor says {size}; "
                                 "the image or the registry's copy is inconsistent")
        return BlobStream(resp, ref.name, digest, size)

    def get_blob(self, ref: ImageReference, digest: str, size: int | None = None,
                 max_size: int = DEFAULT_MAX_BLOB_BYTES) -> bytes:
        """A small blob (config, TOC) in memory, verified. Use open_blob for layers."""
        if size is not None and size > max_size:
            raise InvalidInputError(f"blob {digest} of {ref.name} is {size} bytes, too big to read into memory "
                                    f"(limit {max_size}); stream it with open_blob")
        with self.open_blob(ref, digest, size) as stream:
            data = bytearray()
            while chunk := stream.read(1024 * 1024):
                data += chunk
                if len(data) > max_size:
                    raise InvalidInputError(f"blob {digest} of {ref.name} is larger than {max_size} bytes; "
                                            "stream it with open_blob")
        return bytes(data)

    # ------------------------------------------------------------------ ranges

    def read_range(self, ref: ImageReference, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of a blob from ``offset`` (fewer only if the blob ends first)."""
        return self.read_ranges(ref, digest, [(offset, length)])[0]

    def read_ranges(self, ref: ImageReference, digest: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several (offset, length) ranges of one blob, in the order asked; multi-range requests where the
        registry supports them, single ranges otherwise, whole-blob download as the last resort."""
        validate_digest(digest)
        for off, length in ranges:
            if not isinstance(off, int) or not isinstance(length, int) or off < 0 or length < 0:
                raise InvalidInputError(f"invalid range ({off!r}, {length!r}) for blob {digest} of {ref.name}")
        spans = _merge_ranges(ranges)
        got: dict[tuple[int, int], bytes] = {}
        if spans:
            rs = self.range_support(ref)
            if rs.single is False:
                got = self._whole_blob_spans(ref, digest, spans, None)
            else:
                todo = list(spans)
                if len(todo) > 1 and rs.multi is not False:
                    for i in range(0, len(todo), MAX_RANGES_PER_REQUEST):
                        got.update(self._multi_range(ref, digest, todo[i:i + MAX_RANGES_PER_REQUEST]))
                        if self.range_support(ref).multi is False:
                            break
                for span in todo:
                    if span not in got:
                        got.update(self._single_range(ref, digest, span, todo))
        out: list[bytes] = []
        for off, length in ranges:
            if length == 0:
                out.append(b"")
                continue
            span = next(s for s in spans if s[0] <= off < s[1])
            data = got[span]
            out.append(data[off - span[0]:off - span[0] + length])
        return out

    def _range_what(self, ref: ImageReference, digest: str) -> str:
        return f"blob {digest} of {ref.name}"

    def _single_range(self, ref: ImageReference, digest: str, span: tuple[int, int],
                      all_spans: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        what = self._range_what(ref, digest)
        start, end = span
        resp = self._request(ref, "GET", self._url(ref, f"blobs/{digest}"), f"bytes {start}-{end - 1} of {what}",
                             headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"},
                             ok=(200, 206, 416))
        if resp.status_code == 416:
            _drain(resp)
            cr = resp.headers.get("content-range", "")
            raise InvalidInputError(f"range {start}-{end - 1} is beyond the end of {what} ({cr or 'size unknown'})")
        if resp.status_code == 200:
            self._set_ranges(ref.api_host, single=False, multi=False)
            return self._whole_blob_spans(ref, digest, all_spans, resp)
        self._set_ranges(ref.api_host, single=True)
        ctype = resp.headers.get("content-type", "")
        body = self._read_limited(resp, (end - start) * 2 + _ERROR_BODY_LIMIT, f"range of {what}")
        if ctype.lower().startswith("multipart/byteranges"):
            parts = self._parse_parts(body, ctype, what)
        else:
            cr = _parse_content_range(resp.headers.get("content-range"))
            if cr is None:
                raise IntegrityError(f"registry {ref.api_host} answered a range request for {what} with 206 but "
                                     "no valid Content-Range")
            parts = [(cr[0], cr[1], body, cr[2])]
        data = self._cover(parts, span, what)
        if data is None:
            raise IntegrityError(f"registry {ref.api_host} returned other bytes than the range {start}-{end - 1} "
                                 f"asked for from {what}")
        return {span: data}

    @staticmethod
    def _parse_parts(body: bytes, ctype: str, what: str) -> list[tuple[int, int, bytes, int | None]]:
        try:
            return [(s, e, d, None) for s, e, d in parse_multipart_byteranges(body, ctype)]
        except ValueError as e:
            raise IntegrityError(f"malformed multipart/byteranges response for {what}: {e}") from None

    @staticmethod
    def _cover(parts: list[tuple[int, int, bytes, int | None]], span: tuple[int, int], what: str) -> bytes | None:
        """The bytes of ``span`` from the parts that cover it; a part may end early only where the blob ends."""
        start, end = span
        for s, e, data, total in parts:
            if len(data) != e - s + 1:
                raise IntegrityError(f"range {s}-{e} of {what} came with {len(data)} bytes instead of {e - s + 1}")
            if s <= start and end - 1 <= e:
                return data[start - s:end - s]
            if s <= start <= e and total is not None and e == total - 1:
                return data[start - s:]
        return None

    def _multi_range(self, ref: ImageReference, digest: str,
                     spans: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """One multi-range request; returns the spans it got (possibly none, then single ranges follow)."""
        what = self._range_what(ref, digest)
        header = "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in spans)
        resp = self._request(ref, "GET", self._url(ref, f"blobs/{digest}"), f"{len(spans)} ranges of {what}",
                             headers={"Range": header, "Accept-Encoding": "identity"}, ok=(200, 206, 400, 416))
        if resp.status_code in (200, 400, 416):
            # 200: server ignored (or gave up on) the ranges; 400/416: refused multi-range. Try single ranges.
            resp.close()
            self._set_ranges(ref.api_host, multi=False)
            return {}
        ctype = resp.headers.get("content-type", "")
        # a server may coalesce ranges (RFC 9110 14.3), but never needs more than first..last byte asked for
        limit = max(sum(e - s for s, e in spans) * 2, spans[-1][1] - spans[0][0]) + _ERROR_BODY_LIMIT
        body = self._read_limited(resp, limit, f"ranges of {what}")
        self._set_ranges(ref.api_host, single=True)
        if ctype.lower().startswith("multipart/byteranges"):
            parts = self._parse_parts(body, ctype, what)
            self._set_ranges(ref.api_host, multi=True)
        else:
            cr = _parse_content_range(resp.headers.get("content-range"))
            if cr is None:
                raise IntegrityError(f"registry {ref.api_host} answered a multi-range request for {what} with 206 "
                                     "but neither multipart/byteranges nor a Content-Range")
            parts = [(cr[0], cr[1], body, cr[2])]
        got: dict[tuple[int, int], bytes] = {}
        for span in spans:
            data = self._cover(parts, span, what)
            if data is not None:
                got[span] = data
        return got

    def _whole_blob_spans(self, ref: ImageReference, digest: str, spans: list[tuple[int, int]],
                          resp: httpx.Response | None) -> dict[tuple[int, int], bytes]:
        """Serve ranges from a plain download of the blob (the registry ignores Range).

        Blobs up to ``range_fallback_limit`` are read whole and verified before slicing; for larger ones the
        download stops after the last byte needed (unverified, as any range read) and a warning says how much
        was downloaded for how little.
        """
        what = self._range_what(ref, digest)
        if resp is None:
            resp = self._request(ref, "GET", self._url(ref, f"blobs/{digest}"), what,
                                 headers={"Accept-Encoding": "identity"})
        need_end = max(e for _, e in spans)
        cl = resp.headers.get("content-length")
        total = int(cl) if cl and cl.isdigit() else None
        verify = total is not None and total <= self.range_fallback_limit
        stream = BlobStream(resp, ref.name, digest, total)
        buf = bytearray()
        try:
            while True:
                chunk = stream.read(1024 * 1024)
                if not chunk:
                    break
                buf += chunk
                if not verify and len(buf) >= need_end:
                    break
        finally:
            stream.close()
        if not stream.verified and len(buf) < need_end and total is None:
            raise IntegrityError(f"{what} ended at {len(buf)} bytes, before the ranges asked for")
        wanted = sum(e - s for s, e in spans)
        log.warning("registry %s ignored Range for %s: downloaded %d bytes to serve %d%s", ref.api_host, what,
                    len(buf), wanted, "" if stream.verified else " (not digest-verified: blob larger than the "
                    "range fallback limit)")
        out: dict[tuple[int, int], bytes] = {}
        for s, e in spans:
            if s >= len(buf):
                raise InvalidInputError(f"range starting at {s} is beyond the end of {what} ({len(buf)} bytes)")
            out[(s, e)] = bytes(buf[s:e])
        return out

    # ------------------------------------------------------------------ tags

    def list_tags(self, ref: ImageReference, page_size: int | None = None) -> list[str]:
        """All tags of ``ref``'s repository, following ``Link: <...>; rel="next"`` pagination."""
        what = f"tag list of {ref.name}"
        url: httpx.URL | None = httpx.URL(self._url(ref, "tags/list"))
        if page_size is not None:
            if page_size <= 0:
                raise InvalidInputError(f"page size must be positive, got {page_size}")
            assert url is not None
            url = url.copy_merge_params({"n": str(page_size)})
        tags: list[str] = []
        seen: set[str] = set()
        while url is not None:
            if str(url) in seen or len(seen) > 100_000:
                raise InvalidInputError(f"registry {ref.api_host} paginates the {what} in a loop")
            seen.add(str(url))
            resp = self._request(ref, "GET", url, what, headers={"Accept": "application/json"})
            link = resp.headers.get("link", "")
            base = resp.url
            body = self._read_limited(resp, 16 * 1024 * 1024, what)
            try:
                obj = json.loads(body)
            except ValueError:
                raise InvalidInputError(f"registry {ref.api_host} sent an invalid {what} (not JSON)") from None
            page = obj.get("tags") if isinstance(obj, dict) else None
            if page is None and isinstance(obj, dict):
                page = []
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise InvalidInputError(f"registry {ref.api_host} sent an invalid {what}: 'tags' is not a list "
                                        "of strings")
            tags.extend(page)
            url = None
            for part in link.split(","):
                m = re.match(r'\s*<([^>]*)>\s*;(.*)$', part)
                if m and re.search(r'rel\s*=\s*"?next"?', m.group(2)):
                    url = base.join(m.group(1))
                    break
        return tags
