"""RegistryClient: the one way cvmfs-snap talks to an OCI distribution registry (a thin facade).

The work is done by the parts below it, each with one job:

* :mod:`cvmfs_snap.oci.transport`: plain-HTTP policy (loopback and configured-insecure hosts only; an ``http://``
  reference to any other host is refused before a request), redirects with downgrade refusal, overall deadlines,
  the retry policy, lazy TLS set-up;
* :mod:`cvmfs_snap.oci.authflow`: an ``httpx.Auth`` flow for the challenge / token / retry dance; credentials only
  to the registry's own origin;
* :mod:`cvmfs_snap.oci.session`: one logical request (auth, redirects, retries, deadline, error mapping);
* :mod:`cvmfs_snap.oci.blobs`: verified blob streams, small blobs with their declared size enforced, the
  redirected-blob-URL cache;
* :mod:`cvmfs_snap.oci.ranges`: single and multi-range reads with per-host memory of what the registry supports;
* :mod:`cvmfs_snap.oci.handoff`: range reads for an async (trio) caller on a bounded pool of threads.

Integrity: manifest digests computed over the raw bytes and checked against what was asked for; blobs streamed
through sha256 and checked at EOF; sizes checked against descriptors.

One client is meant to be shared by a pool of worker threads: httpx's connection pool is thread-safe, and the
mutable state (token cache, auth challenges, range capabilities, blob URLs) is guarded by locks.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence

import httpx

from cvmfs_snap.errors import IntegrityError, InvalidInputError
from cvmfs_snap.oci.auth import CredentialStore
from cvmfs_snap.oci.authflow import RegistryAuth
from cvmfs_snap.oci.blobs import DEFAULT_BLOB_URL_TTL, DEFAULT_MAX_BLOB_BYTES, Blobs, BlobStream, BlobUrlCache
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
from cvmfs_snap.oci.ranges import DEFAULT_RANGE_FALLBACK_LIMIT, Deliver, RangeReader, RangeSupport
from cvmfs_snap.oci.reference import ImageReference
from cvmfs_snap.oci.session import Session
from cvmfs_snap.oci.transport import (
    DEFAULT_BLOB_MIN_RATE,
    DEFAULT_TRANSFER_DEADLINE,
    USER_AGENT,
    RetryPolicy,
    Transport,
    TransportPolicy,
    read_limited,
)

__all__ = ["BlobStream", "RangeSupport", "RegistryClient"]


class RegistryClient:
    """Client for OCI distribution registries (see module docstring). Thread-safe; close() when done.

    ``transfer_deadline``: seconds one manifest, token or tag-list transfer may take in all (retries included);
    a blob transfer may take ``transfer_deadline + size / blob_min_rate``. ``blob_url_ttl``: seconds a redirected
    blob URL is reused (0 = never). ``transport``: an httpx transport to use instead of the default one (tests,
    special networks); the plain-HTTP policy applies to it all the same.
    """

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
        transfer_deadline: float = DEFAULT_TRANSFER_DEADLINE,
        blob_min_rate: float = DEFAULT_BLOB_MIN_RATE,
        blob_url_ttl: float = DEFAULT_BLOB_URL_TTL,
        transport: httpx.BaseTransport | None = None,
        tls_registries: Sequence[str] = (),
    ) -> None:
        if retries < 0:
            raise InvalidInputError(f"retries must be >= 0, got {retries}")
        self.credentials = credentials or CredentialStore()
        policy = TransportPolicy.of(insecure_registries, tls_registries)
        self.insecure_registries = policy.insecure
        self.timeout = timeout
        self.retries = retries
        self._transport = Transport(policy, timeout, max_redirects=max_redirects, user_agent=user_agent,
                                    ca_bundle=ca_bundle, transport=transport)
        self._auth = RegistryAuth(self.credentials, self._transport, transfer_deadline, clock)
        self._session = Session(self._transport, self._auth,
                                RetryPolicy(retries, backoff_base, backoff_cap, max_retry_after, sleep),
                                transfer_deadline=transfer_deadline, blob_min_rate=blob_min_rate, clock=clock)
        self._blobs = Blobs(self._session, BlobUrlCache(blob_url_ttl, clock))
        self._ranges = RangeReader(self._blobs, range_fallback_limit)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RegistryClient(credentials={self.credentials!r}, insecure={sorted(self.insecure_registries)!r})"

    @property
    def session(self) -> Session:
        """The one request path (policy, auth, retries, deadlines), also used by ``cvmfs_snap.oci.push``."""
        return self._session

    def base_url(self, ref: ImageReference) -> str:
        """``scheme://api_host`` for ``ref``: plain HTTP only for loopback and configured-insecure registries;
        InvalidInputError for an ``http://`` reference to any other host."""
        return self._session.base_url(ref)

    # ------------------------------------------------------------------ manifests

    def get_manifest(self, ref: ImageReference) -> Manifest | Index:
        """Fetch and parse the manifest or index ``ref`` names; verified against ``ref.digest`` when present."""
        what = f"manifest of {ref}"
        deadline = self._session.deadline(ref, what)
        resp = self._session.request(ref, "GET", self._session.url(ref, f"manifests/{ref.reference}"), what,
                                     headers={"Accept": ", ".join(ACCEPT_MANIFESTS)}, deadline=deadline)
        ctype = resp.headers.get("content-type", "")
        header_digest = resp.headers.get("docker-content-digest", "")
        raw = read_limited(resp, MAX_MANIFEST_SIZE, what, deadline)
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
        return self._blobs.open_blob(ref, digest, size)

    def get_blob(self, ref: ImageReference, digest: str, size: int, max_size: int = DEFAULT_MAX_BLOB_BYTES) -> bytes:
        """A small blob (config, TOC) in memory, verified against ``digest`` and its descriptor's ``size``."""
        return self._blobs.get_blob(ref, digest, size, max_size)

    # ------------------------------------------------------------------ ranges

    def range_support(self, ref: ImageReference) -> RangeSupport:
        """What is known about Range support of ``ref``'s registry host (a copy)."""
        return self._ranges.range_support(ref)

    def read_range(self, ref: ImageReference, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of a blob from ``offset`` (fewer only if the blob ends first)."""
        return self._ranges.read_range(ref, digest, offset, length)

    def read_ranges(self, ref: ImageReference, digest: str, ranges: Sequence[tuple[int, int]], *,
                    whole_blob: bool = True) -> list[bytes]:
        """Several (offset, length) ranges of one blob, in the order asked (see :mod:`cvmfs_snap.oci.ranges`;
        ``whole_blob=False``: RangeIgnoredError where the registry ignores Range, instead of downloading)."""
        return self._ranges.read_ranges(ref, digest, ranges, whole_blob=whole_blob)

    def stream_range(self, ref: ImageReference, digest: str, pieces: Sequence[tuple[int, int]],
                     deliver: Deliver) -> None:
        """One range request, each (offset, length) piece handed to ``deliver(i, data)`` as it arrives (see
        :meth:`cvmfs_snap.oci.ranges.RangeReader.stream_range`)."""
        self._ranges.stream_range(ref, digest, pieces, deliver)

    # ------------------------------------------------------------------ tags

    def list_tags(self, ref: ImageReference, page_size: int | None = None) -> list[str]:
        """All tags of ``ref``'s repository, following ``Link: <...>; rel="next"`` pagination."""
        what = f"tag list of {ref.name}"
        url: httpx.URL | None = httpx.URL(self._session.url(ref, "tags/list"))
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
            deadline = self._session.deadline(ref, what)
            resp = self._session.request(ref, "GET", url, what, headers={"Accept": "application/json"},
                                         deadline=deadline)
            link = resp.headers.get("link", "")
            base = resp.url
            body = read_limited(resp, 16 * 1024 * 1024, what, deadline)
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
                m = re.fullmatch(r'\s*<([^>]*)>\s*;(.*)', part, re.DOTALL)
                if m and re.search(r'rel\s*=\s*"?next"?', m.group(2)):
                    url = base.join(m.group(1))
                    break
        return tags
