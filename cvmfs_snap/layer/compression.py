"""Open a layer blob as an uncompressed tar stream: media type picks the codec, magic bytes confirm it.

Registries serve what the manifest says, and manifests are sometimes wrong (a zstd blob labelled gzip, an
uncompressed tar labelled ``tar+gzip``). Decoding by media type alone would then produce garbage deep inside the
tar reader; decoding by magic alone would hide a broken manifest that other runtimes will refuse. So we require both
to agree and say clearly which one is wrong.

Every decoder is streaming with bounded output per ``read(n)``: a 4 GiB layer (or a small decompression bomb) never
sits in memory. Truncated and corrupt streams raise :class:`InvalidInputError`.
"""

from __future__ import annotations

import logging
from types import TracebackType

import zstandard

from cvmfs_snap.errors import InvalidInputError, UnsafeLayerError
from cvmfs_snap.layer.digesting import HashingReader, Readable
from cvmfs_snap.layer.gzipmember import GZIP_MAGIC, GzipStreamDecoder
from cvmfs_snap.layer.limits import RATIO_GRACE, Limits
from cvmfs_snap.mediatypes import LAYER_CODECS

log = logging.getLogger(__name__)

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

#: media type -> codec ("gzip", "zstd", "none"); includes Docker's and OCI's non-distributable ("foreign") variants
MEDIA_TYPES = LAYER_CODECS

_CHUNK = 256 * 1024

#: largest zstd decoding window accepted (libzstd's default limit, ``ZSTD_WINDOWLOG_LIMIT_DEFAULT`` = 27: 128 MiB, what
#: ``zstd -d`` accepts without ``--long=31`` / ``--memory``). Each layer being decoded holds one window in memory.
MAX_ZSTD_WINDOW = 1 << 27


def codec_for_media_type(media_type: str, name: str = "layer") -> str:
    """The codec a layer media type declares; InvalidInputError for anything that is not a layer we can read."""
    codec = MEDIA_TYPES.get(media_type.strip().lower())
    if codec is None:
        raise InvalidInputError(
            f"{name}: unsupported layer media type {media_type!r}; supported: {', '.join(sorted(MEDIA_TYPES))}. "
            "Rebuild or convert the image with a standard layer format (tar, tar+gzip or tar+zstd)"
        )
    return codec


def sniff_codec(head: bytes) -> str | None:
    """The codec the first bytes of a blob show ("gzip", "zstd", "none" for a tar), None if unrecognisable.

    ``head`` should be the first 512 bytes (fewer only if the blob is shorter).
    """
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if not head:
        return "none"  # an empty blob is an empty tar to Go's archive/tar, which containerd uses
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "none"
    if len(head) == 512 and head.count(0) == 512:
        return "none"  # an empty archive: end-of-archive blocks only
    return None


def _read_full(raw: Readable, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        data = raw.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class _Prefixed:
    """Replays the bytes already peeked, then the rest of the raw stream."""

    def __init__(self, head: bytes, raw: Readable) -> None:
        self._head = head
        self._raw = raw

    def read(self, n: int = -1, /) -> bytes:
        if self._head:
            if n < 0 or n >= len(self._head):
                data, self._head = self._head, b""
            else:
                data, self._head = self._head[:n], self._head[n:]
            return data
        return self._raw.read(n)


#: compressed bytes handed to libzstd per call. A zstd block decodes to at most 128 KiB and takes at least 4 bytes (an
#: RLE block: a 3-byte header and the byte), so one call yields at most ``(feed / 4 + 1) * 128 KiB`` however the blob
#: was made. The feed starts small (2.1 MiB out at most) and grows while the data expands like ordinary data (at most
#: ``_ZSTD_CALM``-fold: fewer calls, near the stream reader's speed); the first piece that expands more drops it back.
#: So a 658 KB blob of 20 GiB of zeros is decoded 2 MiB at a time, and one call never yields more than 64 MiB (half
#: the decoding window a frame may ask libzstd to hold anyway, :data:`MAX_ZSTD_WINDOW`)
_ZSTD_FEED_MIN = 64
_ZSTD_FEED_MAX = 2048
_ZSTD_CALM = 32
#: bytes of a zstd frame header at most (magic, descriptor, window, dictionary id, content size)
_ZSTD_HEADER_MAX = 18


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n} bytes"


class _ZstdDecoder:
    """A zstd blob decoded frame by frame with zstandard's ``decompressobj()``, fed a few hundred bytes at a time.

    ``eof`` says a frame (or a skippable frame) is complete and ``unused_data`` gives the bytes that start the next
    one, so: concatenated and skippable frames are read, a blob that ends inside a frame is *truncated* (the
    bounded ``stream_reader`` would return a clean EOF there, making a cut download look like a short layer), and
    bytes after the last frame that are not a frame are *corrupt*. Both digests still guard every byte.
    """

    def __init__(self, raw: Readable, name: str) -> None:
        self._raw = raw
        self._name = name
        self._dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
        self._frame: zstandard.ZstdDecompressionObj | None = None  # the frame being decoded; None between frames
        self._head = b""  # first bytes of that frame (its header: the window it asks for)
        self._input = memoryview(b"")  # compressed bytes read from ``raw``, fed up to ``_pos``
        self._pos = 0
        self._base = 0  # compressed offset of ``_input[0]``
        self._frames = 0
        self._feed = _ZSTD_FEED_MIN
        self._left = memoryview(b"")  # decoded bytes beyond what the last read(n) asked

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            n = _CHUNK
        if n == 0:
            return b""
        parts = [self._left[:n]] if self._left else []
        got = len(parts[0]) if parts else 0
        self._left = self._left[got:]
        frame, inp, pos, feed = self._frame, self._input, self._pos, self._feed
        while got < n:  # the hot loop: small pieces of ordinary data are joined up to n, a big one is sliced
            if pos >= len(inp):
                self._frame, self._pos = frame, pos
                if not self._refill():
                    break
                inp, pos = self._input, 0
            if frame is None:
                frame = self._frame = self._dctx.decompressobj()
                self._head = bytes(inp[pos : pos + _ZSTD_HEADER_MAX])
            piece = inp[pos : pos + feed]
            try:
                data: bytes = frame.decompress(piece)
            except zstandard.ZstdError as e:
                self._pos = pos
                raise self._error(e) from None
            pos += len(piece)
            feed = _ZSTD_FEED_MAX if len(data) <= _ZSTD_CALM * len(piece) else _ZSTD_FEED_MIN
            if frame.eof:  # a frame ends inside this piece: the rest of it starts the next one
                self._frames += 1
                pos -= len(frame.unused_data)
                frame = None
            if data:
                if len(data) > n - got:
                    self._left = memoryview(data)
                    parts.append(self._left[: n - got])
                    self._left = self._left[n - got :]
                    break
                parts.append(memoryview(data))
                got += len(data)
        self._frame, self._pos, self._feed = frame, pos, feed
        return b"".join(parts)

    def _refill(self) -> bool:
        """The next compressed bytes into ``_input``; False at the end of a blob that ended on a frame boundary."""
        self._base += len(self._input)
        self._input, self._pos = memoryview(self._raw.read(_CHUNK)), 0
        if not self._input:
            if self._frame is not None or self._frames == 0:
                raise InvalidInputError(
                    f"{self._name}: zstd stream is truncated (ends inside a frame after {self._base} compressed "
                    "bytes); the download was cut short or the blob is corrupt: fetch it again"
                )
            return False
        if self._frame is not None and len(self._head) < _ZSTD_HEADER_MAX:
            self._head += self._input[: _ZSTD_HEADER_MAX - len(self._head)]
        return True

    def _error(self, e: zstandard.ZstdError) -> InvalidInputError:
        if "too much memory" in str(e):
            try:
                window = _mib(zstandard.get_frame_parameters(self._head).window_size)
            except zstandard.ZstdError:
                window = f"more than {_mib(MAX_ZSTD_WINDOW)}"
            return InvalidInputError(
                f"{self._name}: zstd frame near compressed offset {self._base + self._pos} needs a decoding window of "
                f"{window}, more than the {_mib(MAX_ZSTD_WINDOW)} accepted (libzstd's default limit; "
                "`zstd -d` refuses it too without --long=31). The blob is not damaged, its compression settings "
                "are beyond what is decoded here: recompress the layer without --long (or with --long=27 at most)"
            )
        return InvalidInputError(
            f"{self._name}: corrupt zstd data near compressed offset {self._base + self._pos}: {e}; the blob is "
            "damaged: fetch it again or re-push the image"
        )


class _Buffered:
    """Serves small reads (512-byte tar headers) from one big decoded chunk.

    Asking zlib for 512 bytes at a time would copy the whole pending input (``unconsumed_tail``) on every call;
    decoding ``_CHUNK`` at a time and slicing keeps the cost linear.
    """

    def __init__(self, src: Readable) -> None:
        self._src = src
        self._buf = b""
        self._pos = 0

    def read(self, n: int = -1, /) -> bytes:
        if self._pos >= len(self._buf):
            self._buf = self._src.read(max(n, _CHUNK))
            self._pos = 0
            if not self._buf:
                return b""
        if self._pos == 0 and n >= len(self._buf):
            data = self._buf
            self._buf = b""
            return data
        data = self._buf[self._pos : self._pos + n]
        self._pos += len(data)
        return data


class LayerStream:
    """The uncompressed tar of a layer, read with ``read(n)``; digests are known once it is read to EOF.

    ``diff_id`` is the sha256 of the uncompressed tar (the image config's ``rootfs.diff_ids``), ``digest`` the
    sha256 of the blob as it came in (the manifest's layer digest).
    """

    def __init__(self, raw: Readable, media_type: str, name: str = "layer", limits: Limits | None = None) -> None:
        self.name = name
        #: ``max_expanded_size`` and ``max_expansion_ratio`` are checked on every read (UnsafeLayerError at once)
        self.limits = limits
        self.media_type = media_type
        self.compression = codec_for_media_type(media_type, name)
        self._raw = HashingReader(raw)
        head = _read_full(self._raw, 512)
        seen = sniff_codec(head)
        if seen != self.compression:
            what = {"gzip": "gzip", "zstd": "zstd", "none": "an uncompressed tar", None: "neither gzip, zstd nor tar"}
            raise InvalidInputError(
                f"{name}: media type {media_type!r} declares "
                f"{what[self.compression] if self.compression != 'none' else 'an uncompressed tar'}, but the data "
                f"is {what[seen]} (first bytes {head[:8].hex()}); the manifest's layer media type is wrong or the "
                "blob is corrupt: fix the image (re-push it with the right media type)"
            )
        src = _Prefixed(head, self._raw)
        self._decoder: Readable
        if self.compression == "gzip":
            self._decoder = GzipStreamDecoder(src, name)
        elif self.compression == "zstd":
            self._decoder = _ZstdDecoder(src, name)
        else:
            self._decoder = src
        self._out = HashingReader(_Buffered(self._decoder))

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            parts: list[bytes] = []
            while True:
                data = self.read(_CHUNK)
                if not data:
                    return b"".join(parts)
                parts.append(data)
        data = self._out.read(n)
        if self.limits is not None:
            self._check_expansion(self.limits)
        return data

    def _check_expansion(self, lim: Limits) -> None:
        size, packed = self._out.size, max(1, self._raw.size)
        if lim.max_expanded_size is not None and size > lim.max_expanded_size:
            raise UnsafeLayerError(
                f"{self.name}: layer expands to more than {lim.max_expanded_size} bytes of uncompressed tar "
                f"(Limits.max_expanded_size) from {packed} compressed bytes so far; refusing the layer. A site that "
                "really publishes such layers can raise limits.max_expanded_size in the publisher configuration"
            )
        ratio = lim.max_expansion_ratio
        if ratio is not None and size > RATIO_GRACE and size > ratio * packed:
            raise UnsafeLayerError(
                f"{self.name}: layer expands {size // packed}-fold ({size} bytes of uncompressed tar from {packed} "
                f"compressed bytes so far), more than Limits.max_expansion_ratio ({ratio}); a decompression bomb? "
                "Refusing the layer (a site can raise limits.max_expansion_ratio in the publisher configuration)"
            )

    def drain(self) -> int:
        """Read and discard the rest (so that the digests cover the whole blob)."""
        if self.limits is None:
            return self._out.drain()
        n = 0
        while True:
            data = self.read(_CHUNK)
            if not data:
                return n
            n += len(data)

    @property
    def eof(self) -> bool:
        return self._out.eof

    @property
    def diff_id(self) -> str | None:
        """sha256 of the uncompressed tar, None until read to EOF."""
        return self._out.digest

    @property
    def digest(self) -> str | None:
        """sha256 of the compressed blob, None until read to EOF."""
        return self._raw.digest if self._out.eof else None

    @property
    def size(self) -> int:
        """Uncompressed bytes read so far."""
        return self._out.size

    @property
    def compressed_size(self) -> int:
        return self._raw.size

    def verify_diff_id(self, expected: str) -> None:
        """IntegrityError unless the stream was read to EOF and its diffID is ``expected``."""
        self._out.verify(expected, f"{self.name} (uncompressed)")

    def verify_digest(self, expected: str) -> None:
        """IntegrityError unless the stream was read to EOF and the blob's digest is ``expected``."""
        if not self._out.eof:
            self._out.verify(expected, self.name)
        self._raw.verify(expected, self.name)

    def close(self) -> None:
        """Nothing to release: the raw stream belongs to the caller."""

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_layer(raw: Readable, media_type: str, *, name: str = "layer", limits: Limits | None = None) -> LayerStream:
    """Decode a layer blob by its media type, confirmed by magic bytes; use as ``with open_layer(...) as tar:``.

    ``name`` (e.g. the layer digest) goes into every error message; ``limits`` bound the uncompressed bytes
    (``max_expanded_size``, ``max_expansion_ratio``). The raw stream is not closed.
    """
    return LayerStream(raw, media_type, name, limits)
