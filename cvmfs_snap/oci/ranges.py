"""Range reads of blobs: single and multi-range requests, with per-host memory of what the registry supports.

:meth:`RangeReader.read_ranges` merges overlapping and adjacent ranges, sends multi-range requests (at most
``MAX_RANGES_PER_REQUEST`` ranges each) where the registry serves ``multipart/byteranges``, single ranges where it
refuses them (400/416, or 200 with the whole blob), and when it ignores ``Range`` altogether downloads the blob
once from its start (verified when it is small enough) and slices it. Every range GET goes through
:meth:`cvmfs_snap.oci.blobs.Blobs.get`, so a registry that redirects to blob storage costs one round trip per range
once the storage URL is cached.

:meth:`RangeReader.stream_range` is the streaming variant for long sequential spans (the lazy filesystem's
readahead): one single-range request whose pieces (chunks) are handed on as soon as their last byte has arrived,
so decoding the first ones overlaps the transfer of the rest.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import httpx

from cvmfs_snap.errors import IntegrityError, InvalidInputError, UnavailableError
from cvmfs_snap.oci.blobs import Blobs, BlobStream
from cvmfs_snap.oci.reference import ImageReference, validate_digest
from cvmfs_snap.oci.transport import ERROR_BODY_LIMIT, Deadline, drain, read_limited

#: ``deliver(i, data)``: piece ``i`` of a streamed range has arrived, ``data`` its bytes
Deliver = Callable[[int, bytes], None]

log = logging.getLogger(__name__)

#: a registry that ignores Range: blobs up to this size are downloaded whole (and verified) and sliced locally
DEFAULT_RANGE_FALLBACK_LIMIT = 16 * 1024 * 1024
#: at most this many ranges in one multi-range request (keeps the Range header reasonable)
MAX_RANGES_PER_REQUEST = 32


class RangeIgnoredError(UnavailableError):
    """The registry ignores ``Range`` (answers 200 with the whole blob) and the caller asked for no whole-blob
    fallback here (``read_ranges(..., whole_blob=False)``): it downloads the blob its own way (the lazy filesystem
    streams it to disk once instead of holding it in memory)."""


@dataclass
class RangeSupport:
    """What a registry host did with Range requests so far (None = not tried yet)."""

    single: bool | None = None
    multi: bool | None = None


_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", re.IGNORECASE)


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    m = _CONTENT_RANGE.fullmatch(value or "")
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
        cr = parse_content_range(headers.get("content-range"))
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


def merge_ranges(ranges: Iterable[tuple[int, int]], gap: int = 0, max_span: int | None = None
                 ) -> list[tuple[int, int]]:
    """Sorted, coalesced [start, end) spans covering all (offset, length) ranges: overlapping or adjacent ones
    always merge, ranges at most ``gap`` bytes apart too unless the merged span would exceed ``max_span`` bytes (a
    single range longer than that stays whole).

    Servers (Go's http.ServeContent, so docker-registry) answer 200 with the whole blob when requested ranges
    overlap, so overlapping ranges are never sent as such.
    """
    spans: list[tuple[int, int]] = []
    for off, length in sorted((o, n) for o, n in ranges if n > 0):
        end = off + length
        if spans and off <= spans[-1][1] + gap and (off <= spans[-1][1] or max_span is None
                                                    or max(end, spans[-1][1]) - spans[-1][0] <= max_span):
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((off, end))
    return spans


def cut_ranges(ranges: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]],
               got: Mapping[tuple[int, int], bytes]) -> list[bytes]:
    """The bytes of each (offset, length) range, in the order asked, cut from the fetched ``spans``
    (:func:`merge_ranges` of them) whose data ``got`` holds."""
    out: list[bytes] = []
    for off, length in ranges:
        if length == 0:
            out.append(b"")
            continue
        span = next(s for s in spans if s[0] <= off < s[1])
        out.append(got[span][off - span[0]:off - span[0] + length])
    return out


def _take(held: list[bytes | memoryview], pos: int, piece: tuple[int, int]
          ) -> tuple[bytes, list[bytes | memoryview], int]:
    """The bytes of ``piece`` (offset, length) out of ``held`` (blocks received back to back from blob offset
    ``pos``, covering the piece), copied once; and what is left of ``held`` after the piece, and its offset.
    Bytes before the piece (a gap between merged pieces) are dropped."""
    lo, hi = piece[0], piece[0] + piece[1]
    take: list[bytes | memoryview] = []
    rest: list[bytes | memoryview] = []
    p = pos
    for b in held:
        b_end = p + len(b)
        if b_end > lo and p < hi:
            s, e = max(lo, p) - p, min(hi, b_end) - p
            take.append(b if s == 0 and e == len(b) else memoryview(b)[s:e])
        if b_end > hi:
            rest.append(b if p >= hi else memoryview(b)[hi - p:])
        p = b_end
    data = take[0] if len(take) == 1 and isinstance(take[0], bytes) else b"".join(take)
    return data, rest, max(hi, pos)


class RangeReader:
    """Range reads of one client (thread-safe)."""

    def __init__(self, blobs: Blobs, fallback_limit: int = DEFAULT_RANGE_FALLBACK_LIMIT) -> None:
        self.blobs = blobs
        self.fallback_limit = fallback_limit
        self._lock = threading.Lock()
        self._ranges: dict[str, RangeSupport] = {}

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

    def _get(self, ref: ImageReference, digest: str, what: str, headers: dict[str, str], ok: Sequence[int],
             deadline: Deadline) -> httpx.Response:
        return self.blobs.get(ref, digest, what, headers, ok, deadline)

    def _deadline(self, ref: ImageReference, what: str, size: int) -> Deadline:
        return self.blobs.session.deadline(ref, what, size)

    def read_range(self, ref: ImageReference, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of a blob from ``offset`` (fewer only if the blob ends first)."""
        return self.read_ranges(ref, digest, [(offset, length)])[0]

    def read_ranges(self, ref: ImageReference, digest: str, ranges: Sequence[tuple[int, int]], *,
                    whole_blob: bool = True) -> list[bytes]:
        """Several (offset, length) ranges of one blob, in the order asked; multi-range requests where the
        registry supports them, single ranges otherwise, whole-blob download as the last resort (with
        ``whole_blob=False``: :class:`RangeIgnoredError` instead, the response closed unread)."""
        validate_digest(digest)
        for off, length in ranges:
            if not isinstance(off, int) or not isinstance(length, int) or off < 0 or length < 0:
                raise InvalidInputError(f"invalid range ({off!r}, {length!r}) for blob {digest} of {ref.name}")
        spans = merge_ranges(ranges)
        got: dict[tuple[int, int], bytes] = {}
        if spans:
            rs = self.range_support(ref)
            if rs.single is False:
                if not whole_blob:
                    raise self._ignored(ref, digest)
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
                        got.update(self._single_range(ref, digest, span, todo, whole_blob))
        return cut_ranges(ranges, spans, got)

    def stream_range(self, ref: ImageReference, digest: str, pieces: Sequence[tuple[int, int]],
                     deliver: Deliver) -> None:
        """One single-range request from the first piece's start to the last one's end; ``deliver(i, data)`` (in
        this thread) as soon as each (offset, length) piece, sorted and not overlapping, has arrived. A piece is
        delivered whole or not at all: after an error, the pieces delivered so far are good and the others are
        the caller's to ask for again. RangeIgnoredError where the registry ignores Range (response closed
        unread); IntegrityError for a body that is short, long or not the range asked for; UnavailableError for
        a transfer that fails."""
        validate_digest(digest)
        pos = -1
        for off, n in pieces:
            if not isinstance(off, int) or not isinstance(n, int) or n <= 0 or off < pos:
                raise InvalidInputError(f"stream of blob {digest} of {ref.name}: pieces must be sorted, not "
                                        f"overlapping and not empty, got ({off!r}, {n!r})")
            pos = off + n
        if not pieces:
            return
        what = self._range_what(ref, digest)
        start, end = pieces[0][0], pieces[-1][0] + pieces[-1][1]
        label = f"bytes {start}-{end - 1} of {what}"
        if self.range_support(ref).single is False:
            raise self._ignored(ref, digest)
        dl = self._deadline(ref, label, end - start)
        resp = self._get(ref, digest, label, {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"},
                         (200, 206, 416), dl)
        if resp.status_code == 416:
            drain(resp)
            cr = resp.headers.get("content-range", "")
            raise InvalidInputError(f"range {start}-{end - 1} is beyond the end of {what} ({cr or 'size unknown'})")
        if resp.status_code == 200:
            resp.close()
            self._set_ranges(ref.api_host, single=False, multi=False)
            raise self._ignored(ref, digest)
        self._set_ranges(ref.api_host, single=True)
        cr = parse_content_range(resp.headers.get("content-range"))
        if cr is None or cr[0] != start or cr[1] != end - 1:
            resp.close()
            raise IntegrityError(f"registry {ref.api_host} answered a request for {label} with "
                                 f"{resp.headers.get('content-range') or 'no valid Content-Range'}")
        total = end - start
        got = 0
        i = 0
        #: what arrived since the last piece was delivered (views of the received blocks), from blob offset ``pos``
        held: list[bytes | memoryview] = []
        pos = start
        try:
            for chunk in resp.iter_bytes():
                n = len(chunk)
                if got + n > total:
                    raise IntegrityError(f"registry {ref.api_host} sent more than the {total} bytes of {label}")
                got += n
                held.append(chunk)
                while i < len(pieces) and pieces[i][0] + pieces[i][1] <= start + got:
                    data, held, pos = _take(held, pos, pieces[i])
                    deliver(i, data)
                    i += 1
                if dl.expired():
                    raise dl.error(f"{got} bytes received")
        except httpx.RemoteProtocolError as e:
            raise IntegrityError(f"{label} is truncated: the server closed the connection after {got} bytes ({e}); "
                                 "retry") from None
        except httpx.TransportError as e:
            raise UnavailableError(f"reading {label} failed after {got} bytes: {type(e).__name__}: {e}; "
                                   "retry later") from None
        finally:
            resp.close()
        if got != total:
            raise IntegrityError(f"{label} is truncated: {got} of {total} bytes; retry")

    def _range_what(self, ref: ImageReference, digest: str) -> str:
        return f"blob {digest} of {ref.name}"

    def _ignored(self, ref: ImageReference, digest: str) -> RangeIgnoredError:
        return RangeIgnoredError(f"registry {ref.api_host} ignores HTTP Range requests for "
                                 f"{self._range_what(ref, digest)}")

    def _single_range(self, ref: ImageReference, digest: str, span: tuple[int, int],
                      all_spans: list[tuple[int, int]], whole_blob: bool = True) -> dict[tuple[int, int], bytes]:
        what = self._range_what(ref, digest)
        start, end = span
        dl = self._deadline(ref, f"bytes {start}-{end - 1} of {what}", end - start)
        resp = self._get(ref, digest, f"bytes {start}-{end - 1} of {what}",
                         {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}, (200, 206, 416), dl)
        if resp.status_code == 416:
            drain(resp)
            cr = resp.headers.get("content-range", "")
            raise InvalidInputError(f"range {start}-{end - 1} is beyond the end of {what} ({cr or 'size unknown'})")
        if resp.status_code == 200:
            self._set_ranges(ref.api_host, single=False, multi=False)
            if not whole_blob:
                resp.close()
                raise self._ignored(ref, digest)
            return self._whole_blob_spans(ref, digest, all_spans, resp)
        self._set_ranges(ref.api_host, single=True)
        ctype = resp.headers.get("content-type", "")
        body = read_limited(resp, (end - start) * 2 + ERROR_BODY_LIMIT, f"range of {what}", dl)
        if ctype.lower().startswith("multipart/byteranges"):
            parts = self._parse_parts(body, ctype, what)
        else:
            cr = parse_content_range(resp.headers.get("content-range"))
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
        dl = self._deadline(ref, f"{len(spans)} ranges of {what}", spans[-1][1] - spans[0][0])
        resp = self._get(ref, digest, f"{len(spans)} ranges of {what}",
                         {"Range": header, "Accept-Encoding": "identity"}, (200, 206, 400, 416), dl)
        if resp.status_code in (200, 400, 416):
            # 200: server ignored (or gave up on) the ranges; 400/416: refused multi-range. Try single ranges.
            resp.close()
            self._set_ranges(ref.api_host, multi=False)
            return {}
        ctype = resp.headers.get("content-type", "")
        # a server may coalesce ranges (RFC 9110 14.3), but never needs more than first..last byte asked for
        limit = max(sum(e - s for s, e in spans) * 2, spans[-1][1] - spans[0][0]) + ERROR_BODY_LIMIT
        body = read_limited(resp, limit, f"ranges of {what}", dl)
        self._set_ranges(ref.api_host, single=True)
        if ctype.lower().startswith("multipart/byteranges"):
            parts = self._parse_parts(body, ctype, what)
            self._set_ranges(ref.api_host, multi=True)
        else:
            cr = parse_content_range(resp.headers.get("content-range"))
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

        Blobs up to ``fallback_limit`` are read whole and verified before slicing; for larger ones the
        download stops after the last byte needed (unverified, as any range read) and a warning says how much
        was downloaded for how little.
        """
        what = self._range_what(ref, digest)
        need_end = max(e for _, e in spans)
        if resp is None:
            resp = self._get(ref, digest, what, {"Accept-Encoding": "identity"}, (200,),
                             self._deadline(ref, f"the download of {what}", need_end))
        cl = resp.headers.get("content-length")
        total = int(cl) if cl and cl.isdigit() else None
        dl = self._deadline(ref, f"the download of {what}", total or need_end)
        verify = total is not None and total <= self.fallback_limit
        stream = BlobStream(resp, ref.name, digest, total, dl)
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
