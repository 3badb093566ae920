"""Compressed byte ranges of one layer blob, fetched from its registry for the lazy filesystem (trio).

:class:`BlobFetcher` is the only way lazy reads reach the network (model: stargz-snapshotter's ``fs/remote``):

- **Merging**: requested ranges are sorted and merged where the gap between them is at most ``merge_gap`` bytes
  (fetching a few unneeded bytes is cheaper than another round trip), up to ``max_span`` bytes per merged span.
- **Single-flight**: a span already being fetched by another task (the same or a larger span) is waited for, not
  fetched again: identical concurrent reads of a cold chunk cost one request.
- **Multi / single / whole blob**: spans go out as one multi-range request through
  :meth:`RegistryClient.read_ranges` (which falls back to single ranges where the registry answers 400 or ignores
  multi-range); ``force_single_range`` sends one request per span, concurrently, for registries that answer a
  multi-range request with the whole blob. Where the registry ignores ``Range`` altogether (GitLab's registry, some
  proxies) the blob is downloaded **once**, streamed to a spool file (``spool_dir``, never held in memory),
  digest-verified, and every later range is a local ``pread``. With ``space`` (the chunk cache) the spool file
  counts in the cache bound: room is reserved before the download (chunks are evicted for it), a blob that cannot
  fit is refused with a clear error (reads get EIO, an attach falls back to a normal pull), and the reservation
  goes with the file at :meth:`close` (the reader calls it on close, and once the layer is completely cached).
- **Retries**: transient failures (connection dropped mid-body, truncated bodies, 5xx after the client's own
  retries) are retried ``retries`` times with exponential back-off; then :class:`UnavailableError`. A refused
  authorisation or a blob gone from the registry is not retried, and is an UnavailableError too (with the
  client's message, which names the host and what to fix, never a credential).

Network calls run in worker threads through :class:`cvmfs_snap.oci.handoff.RangeHandoff`, so a slow range never
stalls the event loop (pass one ``handoff`` to the fetchers of all layers to bound the threads of the process; each
fetcher makes its own otherwise); the client's blob-URL cache makes a redirected blob cost one round trip per range.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import (
    AuthError,
    CvmfsSnapError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from cvmfs_snap.lazyfs.cache import ChunkCache
from cvmfs_snap.lazyfs.metrics import DEFAULT_METRICS, LazyMetrics
from cvmfs_snap.oci.client import RegistryClient
from cvmfs_snap.oci.handoff import RangeHandoff
from cvmfs_snap.oci.ranges import RangeIgnoredError, cut_ranges, merge_ranges
from cvmfs_snap.oci.reference import ImageReference, validate_digest

log = logging.getLogger(__name__)

DEFAULT_MERGE_GAP = 64 * 1024
DEFAULT_MAX_SPAN = 32 * 1024 * 1024
SPOOL_READ = 1024 * 1024

T = TypeVar("T")


def _pieces(ranges: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[list[tuple[int, int, int]]]]:
    """Sorted (offset, length) ranges -> non-overlapping pieces that cover them, and for each piece the ranges it
    completes: (index into ``ranges``, start, end within the piece's bytes). Ranges that overlap share a piece."""
    pieces: list[tuple[int, int]] = []
    owner: list[list[tuple[int, int, int]]] = []
    for k, (off, n) in enumerate(ranges):
        if pieces and off < pieces[-1][0] + pieces[-1][1]:
            p0, pn = pieces[-1]
            pieces[-1] = (p0, max(pn, off + n - p0))
            owner[-1].append((k, off - p0, off - p0 + n))
        else:
            pieces.append((off, n))
            owner.append([(k, 0, n)])
    return pieces, owner


class _Flight:
    """One span being fetched: waiters block on ``done`` and read ``data`` or ``error``."""

    def __init__(self, span: tuple[int, int]) -> None:
        self.span = span
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class SpoolTooLargeError(UnavailableError):
    """The registry ignores ``Range`` and the whole blob does not fit in the cache bound (not retried)."""


class BlobFetcher:
    """Ranges of one blob (see module docstring). One per attached layer; use from one trio run."""

    def __init__(self, client: RegistryClient, ref: ImageReference, digest: str, size: int, *,
                 merge_gap: int = DEFAULT_MERGE_GAP, force_single_range: bool = False, retries: int = 3,
                 backoff: float = 0.2, max_span: int = DEFAULT_MAX_SPAN, spool_dir: Path | None = None,
                 handoff: RangeHandoff | None = None, metrics: LazyMetrics | None = None,
                 space: ChunkCache | None = None) -> None:
        validate_digest(digest)
        if size <= 0 or merge_gap < 0 or retries < 0 or max_span <= 0:
            raise InvalidInputError(f"blob fetcher for {digest}: size {size}, merge gap {merge_gap}, retries "
                                    f"{retries} and max span {max_span} must be positive")
        self.client = client
        self.ref = ref
        self.digest = digest
        self.size = size
        self.merge_gap = merge_gap
        self.force_single_range = force_single_range
        self.retries = retries
        self.backoff = backoff
        self.max_span = max_span
        self.spool_dir = spool_dir
        #: the cache whose bound the spool file counts in (None: not counted)
        self.space = space
        self.handoff = handoff or RangeHandoff(client)
        self.metrics = metrics or DEFAULT_METRICS
        #: requests sent (span fetches, whole-blob downloads counted once): for tests and `list`
        self.requests = 0
        self.bytes_fetched = 0
        self._flights: dict[tuple[int, int], _Flight] = {}
        self._spool: Path | None = None
        self._spool_lock = trio.Lock()
        self._spooled = False

    def __repr__(self) -> str:  # no client repr: it holds credentials
        return f"BlobFetcher({self.ref.name!r}, {self.digest!r}, size={self.size})"

    # ------------------------------------------------------------------ public
    async def fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, length) range, in the order asked. UnavailableError when the registry cannot
        deliver after retries; InvalidInputError for ranges outside the blob."""
        for off, n in ranges:
            if off < 0 or n < 0 or off + n > self.size:
                raise InvalidInputError(f"range ({off}, {n}) is outside blob {self.digest} of {self.size} bytes")
        spans = merge_ranges(ranges, self.merge_gap, self.max_span)
        got: dict[tuple[int, int], bytes] = {}
        mine: list[_Flight] = []
        waits: list[tuple[tuple[int, int], _Flight]] = []
        for span in spans:
            other = self._covering(span)
            if other is not None:
                waits.append((span, other))
            else:
                fl = _Flight(span)
                self._flights[span] = fl
                mine.append(fl)
        if mine:
            try:
                await self._run(mine)
            finally:
                for fl in mine:
                    self._flights.pop(fl.span, None)
                    fl.done.set()
            for fl in mine:
                if fl.error is not None:
                    raise fl.error
                assert fl.data is not None
                got[fl.span] = fl.data
        for span, fl in waits:
            await fl.done.wait()
            if fl.error is not None:
                raise fl.error
            assert fl.data is not None
            lo = span[0] - fl.span[0]
            got[span] = fl.data[lo:lo + span[1] - span[0]]
        return cut_ranges(ranges, spans, got)

    async def stream(self, ranges: Sequence[tuple[int, int]], deliver: Callable[[int, bytes], None]) -> None:
        """Like :meth:`fetch`, but each range's bytes are handed to ``deliver(i, data)`` (in the event loop) as
        soon as they have arrived, in blob order: the ranges merged into one span come in one request, and the
        caller can decode the first while the rest is on the wire. After a transient failure only the ranges not
        delivered yet are asked for again. Not single-flighted against other fetches (the reader is, per chunk)."""
        for off, n in ranges:
            if off < 0 or n < 0 or off + n > self.size:
                raise InvalidInputError(f"range ({off}, {n}) is outside blob {self.digest} of {self.size} bytes")
        todo = sorted((i for i, (_, n) in enumerate(ranges) if n > 0), key=lambda i: ranges[i])
        for i, (_, n) in enumerate(ranges):
            if n == 0:
                deliver(i, b"")
        left = set(todo)

        def got(i: int, data: bytes, fetched: bool = False) -> None:
            if i in left:  # each range once, whatever retries happen
                left.discard(i)
                if fetched:  # not when read from the spool file (its download was counted)
                    self._count(0, len(data))
                deliver(i, data)

        async def once() -> None:
            rest = [i for i in todo if i in left]
            if self._spooled:
                for i, data in zip(rest, await self._from_spool([(ranges[i][0], ranges[i][0] + ranges[i][1])
                                                                 for i in rest]), strict=True):
                    got(i, data)
                return
            errors: list[CvmfsSnapError] = []

            async def span_of(mine: list[int]) -> None:
                pieces, owner = _pieces([ranges[i] for i in mine])

                def arrived(j: int, data: bytes) -> None:
                    for k, a, b in owner[j]:
                        got(mine[k], data if a == 0 and b == len(data) else data[a:b], True)

                self._count(1, 0)
                try:
                    await self.handoff.stream_range(self.ref, self.digest, pieces, arrived)
                except CvmfsSnapError as e:  # raised below, one of them, not as an exception group
                    errors.append(e)

            spans = merge_ranges([ranges[i] for i in rest], self.merge_gap, self.max_span)
            groups = [[i for i in rest if s <= ranges[i][0] < e] for s, e in spans]
            if len(groups) == 1:
                await span_of(groups[0])
            else:  # spans far apart (what a background batch leaves between chunks already read): at once
                async with trio.open_nursery() as n:
                    for g in groups:
                        n.start_soon(span_of, g)
            if errors:  # a Range-ignoring registry first: that one means "read the spool file" to the caller
                raise next((e for e in errors if isinstance(e, RangeIgnoredError)), errors[0])

        t0 = time.monotonic()
        try:
            if todo:
                await self._retrying(len(todo), once)
        finally:
            self.metrics.fetch_seconds.observe(time.monotonic() - t0)

    def close(self) -> None:
        """Remove the whole-blob spool file, if one was made (a later fetch downloads the blob again)."""
        spool, self._spool = self._spool, None
        if spool is not None:
            for p in (spool, spool.with_suffix(".part")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        if self.space is not None:
            self.space.unreserve(self._spool_name)

    @property
    def _spool_name(self) -> str:
        return "spool:" + self.digest.split(":", 1)[1]

    # ------------------------------------------------------------------ internals
    def _covering(self, span: tuple[int, int]) -> _Flight | None:
        for fl in self._flights.values():
            if fl.span[0] <= span[0] and span[1] <= fl.span[1]:
                return fl
        return None

    async def _run(self, flights: list[_Flight]) -> None:
        t0 = time.monotonic()
        try:
            if self.force_single_range and len(flights) > 1:
                async with trio.open_nursery() as n:
                    for fl in flights:
                        n.start_soon(self._fetch_group, [fl])
            else:
                await self._fetch_group(flights)
        finally:
            self.metrics.fetch_seconds.observe(time.monotonic() - t0)

    async def _fetch_group(self, flights: list[_Flight]) -> None:
        spans = [fl.span for fl in flights]
        try:
            datas = await self._with_retries(spans)
        except (UnavailableError, IntegrityError, InvalidInputError) as e:
            for fl in flights:
                fl.error = e
            return
        except BaseException:  # cancelled (or a bug): waiters of these spans get a clean error, this propagates
            for fl in flights:
                fl.error = UnavailableError(f"the fetch of range {fl.span[0]}-{fl.span[1] - 1} of layer "
                                            f"{self.digest} was cancelled; retry")
            raise
        for fl, data in zip(flights, datas, strict=True):
            fl.data = data

    async def _with_retries(self, spans: list[tuple[int, int]]) -> list[bytes]:
        return await self._retrying(len(spans), lambda: self._once(spans))

    async def _retrying(self, count: int, once: Callable[[], Awaitable[T]]) -> T:
        """``once()`` until it succeeds: retried with back-off on transient errors, through the spool file once
        the registry is found to ignore Range; ``count`` ranges are asked for (for messages)."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return await once()
            except RangeIgnoredError:
                if self.spool_dir is None:
                    raise UnavailableError(f"registry {self.ref.api_host} ignores HTTP Range requests and no spool "
                                           f"directory is configured for layer {self.digest}") from None
                self._spooled = True
                continue  # not a failure: the next attempt reads the spool file
            except SpoolTooLargeError:
                raise
            except (AuthError, NotFoundError) as e:  # not transient: no retry; for a read both mean EIO
                raise UnavailableError(f"layer {self.digest}: {e}") from None
            except (UnavailableError, IntegrityError) as e:
                last = e
            if attempt < self.retries:
                delay = self.backoff * (2 ** attempt) * (0.5 + random.random() / 2)  # jitter: no herds
                log.warning("fetching %d range(s) of %s failed (%s); retry %d/%d in %.1fs", count,
                            self.digest, last, attempt + 1, self.retries, delay)
                await trio.sleep(delay)
        raise UnavailableError(f"could not fetch {count} range(s) of layer {self.digest} from registry "
                               f"{self.ref.api_host} after {self.retries + 1} attempts: {last}")

    async def _once(self, spans: list[tuple[int, int]]) -> list[bytes]:
        if self._spooled:
            return await self._from_spool(spans)
        datas = await self.handoff.read_ranges(self.ref, self.digest, [(s, e - s) for s, e in spans],
                                               whole_blob=False)
        for (s, e), d in zip(spans, datas, strict=True):
            if len(d) != e - s:
                raise IntegrityError(f"registry {self.ref.api_host} returned {len(d)} bytes for range {s}-{e - 1} "
                                     f"of {self.digest}")
        self._count(len(spans), sum(len(d) for d in datas))
        return datas

    def _count(self, requests: int, nbytes: int) -> None:
        self.requests += requests
        self.bytes_fetched += nbytes
        self.metrics.fetched_bytes.labels(layer=self.digest).inc(nbytes)

    # ------------------------------------------------------------------ whole-blob fallback
    def _spool_path(self) -> Path:
        base = self.spool_dir
        assert base is not None  # checked when the registry was found to ignore Range
        base.mkdir(parents=True, exist_ok=True)
        return base / (self.digest.split(":", 1)[1] + ".blob")

    async def _from_spool(self, spans: list[tuple[int, int]]) -> list[bytes]:
        async with self._spool_lock:
            if self._spool is None:
                path = self._spool_path()
                if self.space is not None and not self.space.reserve(self._spool_name, self.size):
                    raise SpoolTooLargeError(
                        f"registry {self.ref.api_host} ignores HTTP Range requests and layer {self.digest} "
                        f"({self.size} bytes) does not fit whole in the lazy cache bound ({self.space.max_bytes} "
                        "bytes, spool files and unpacked copies included): raise [cvmfs-snap.lazy] cache-size, "
                        "or use a registry (or mirror) that serves ranges")
                if not (path.exists() and path.stat().st_size == self.size):
                    try:
                        await trio.to_thread.run_sync(self._download, path, limiter=self.handoff.limiter)
                    except BaseException:
                        if self.space is not None:  # the .part file is gone: so is its room
                            self.space.unreserve(self._spool_name)
                        raise
                self._spool = path
        spool = self._spool

        def read() -> list[bytes]:
            fd = os.open(spool, os.O_RDONLY | os.O_CLOEXEC)
            try:
                out = [os.pread(fd, e - s, s) for s, e in spans]
                for s, e in spans:
                    os.posix_fadvise(fd, s, e - s, os.POSIX_FADV_DONTNEED)
                return out
            finally:
                os.close(fd)

        return await trio.to_thread.run_sync(read)

    def _download(self, path: Path) -> None:
        """The whole blob into ``path`` (``.part`` then rename once its digest verified)."""
        part = path.with_suffix(".part")
        log.warning("registry %s ignores HTTP Range: downloading layer %s (%d bytes) once to %s",
                    self.ref.api_host, self.digest, self.size, path)
        n = 0
        stream = self.client.open_blob(self.ref, self.digest, self.size)
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                while True:
                    buf = stream.read(SPOOL_READ)
                    if not buf:  # b"" = complete and digest-verified (BlobStream raises otherwise)
                        break
                    os.write(fd, buf)
                    n += len(buf)
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise
        finally:
            stream.close()
        os.replace(part, path)
        self._count(1, n)
