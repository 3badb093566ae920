"""Blobs: verified streams, small blobs in memory, and the blob-URL cache.

* :class:`BlobStream`: a blob download as a binary file object; digest and size checked at EOF, the transfer's
  overall deadline checked with every chunk.
* :class:`Blobs`: ``open_blob`` / ``get_blob`` (a small blob such as a config: its size from the descriptor is
  required and enforced, larger or shorter bodies are an IntegrityError) and :meth:`Blobs.get`, the one blob GET,
  which keeps the URL a registry redirected a blob to (blob storage, often a signed URL) for ``url_ttl`` seconds,
  so that the next read of that blob (a range) costs one round trip, not two. A cached URL answered with 401, 403,
  404 or 410 (expired signature, moved object) is dropped and the registry asked again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx

from cvmfs_snap.errors import IntegrityError, InvalidInputError, UnavailableError
from cvmfs_snap.oci.reference import ImageReference, validate_digest
from cvmfs_snap.oci.session import Session
from cvmfs_snap.oci.transport import Deadline, drain

log = logging.getLogger(__name__)

#: small blobs (configs) read by get_blob; larger ones must be streamed with open_blob
DEFAULT_MAX_BLOB_BYTES = 64 * 1024 * 1024
#: how long a redirected blob URL is reused (stargz-snapshotter uses 60 s as well)
DEFAULT_BLOB_URL_TTL = 60.0
#: answers of a cached blob URL that mean "ask the registry for a fresh one"
_REFRESH = (401, 403, 404, 410)


class BlobStream(io.RawIOBase):
    """A blob download as a binary file object; the digest (and size, when known) is checked at EOF.

    ``read`` returning ``b""`` means the blob was complete and verified; a mismatch raises IntegrityError instead.
    Closing early (without reaching EOF) skips the check: the caller did not use the rest.
    """

    def __init__(self, resp: httpx.Response, image: str, digest: str, expected_size: int | None,
                 deadline: Deadline | None = None) -> None:
        super().__init__()
        self._deadline = deadline
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
        if self._deadline is not None and self._deadline.expired():
            self._resp.close()
            of = f" of {self._expected}" if self._expected is not None else ""
            raise self._deadline.error(f"{self._count}{of} bytes received")
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



class BlobUrlCache:
    """Redirected blob URLs per (registry host, repository, digest), each valid for ``ttl`` seconds."""

    def __init__(self, ttl: float = DEFAULT_BLOB_URL_TTL, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 4096) -> None:
        self.ttl = ttl
        self._clock = clock
        self._max = max_entries
        self._lock = threading.Lock()
        self._urls: dict[tuple[str, str, str], tuple[httpx.URL, float]] = {}

    def get(self, key: tuple[str, str, str]) -> httpx.URL | None:
        with self._lock:
            hit = self._urls.get(key)
            if hit is None:
                return None
            if self._clock() >= hit[1]:
                del self._urls[key]
                return None
            return hit[0]

    def put(self, key: tuple[str, str, str], url: httpx.URL) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._urls) >= self._max and key not in self._urls:
                self._urls.pop(next(iter(self._urls)))  # oldest first
            self._urls[key] = (url, self._clock() + self.ttl)

    def drop(self, key: tuple[str, str, str], url: httpx.URL) -> None:
        with self._lock:
            hit = self._urls.get(key)
            if hit is not None and hit[0] == url:
                del self._urls[key]


class Blobs:
    """Blob reads of one client (thread-safe)."""

    def __init__(self, session: Session, urls: BlobUrlCache) -> None:
        self.session = session
        self.urls = urls

    def get(self, ref: ImageReference, digest: str, what: str, headers: dict[str, str],
            ok: Sequence[int] = (200,), deadline: Deadline | None = None) -> httpx.Response:
        """GET the blob (open response, status in ``ok``), through its cached storage URL when there is one."""
        key = (ref.api_host, ref.repository, digest)
        cached = self.urls.get(key)
        if cached is not None:
            refresh = tuple(s for s in _REFRESH if s not in ok)
            resp = self.session.request(ref, "GET", cached, what, headers, (*ok, *refresh), deadline)
            if resp.status_code not in refresh:
                return resp
            drain(resp)
            self.urls.drop(key, cached)
            log.debug("cached storage URL of %s answered HTTP %d: asking the registry again", what,
                      resp.status_code)
        registry_url = httpx.URL(self.session.url(ref, f"blobs/{digest}"))
        resp = self.session.request(ref, "GET", registry_url, what, headers, ok, deadline)
        if resp.url != registry_url and resp.status_code in (200, 206):
            self.urls.put(key, resp.url)
        return resp

    def open_blob(self, ref: ImageReference, digest: str, size: int | None = None) -> BlobStream:
        """Stream a blob; the returned file object raises IntegrityError at EOF if digest or size are wrong."""
        validate_digest(digest)
        what = f"blob {digest} of {ref.name}"
        deadline = self.session.deadline(ref, f"the download of {what}", size)
        resp = self.get(ref, digest, what, {"Accept-Encoding": "identity"}, deadline=deadline)
        cl = resp.headers.get("content-length")
        if size is not None and cl and cl.isdigit() and int(cl) != size:
            resp.close()
            raise IntegrityError(f"{what}: the registry announces {cl} bytes but the descriptor says {size}; "
                                 "the image or the registry's copy is inconsistent")
        return BlobStream(resp, ref.name, digest, size, deadline)

    def get_blob(self, ref: ImageReference, digest: str, size: int, max_size: int = DEFAULT_MAX_BLOB_BYTES) -> bytes:
        """A small blob (config, TOC) in memory, verified against ``digest`` and the descriptor's ``size``."""
        if not isinstance(size, int) or size < 0:
            raise InvalidInputError(f"blob {digest} of {ref.name}: invalid size {size!r} in its descriptor")
        if size > max_size:
            raise InvalidInputError(f"blob {digest} of {ref.name} is {size} bytes, too big to read into memory "
                                    f"(limit {max_size}); stream it with open_blob")
        with self.open_blob(ref, digest, size) as stream:
            data = bytearray()
            while chunk := stream.read(1024 * 1024):
                data += chunk
        return bytes(data)
