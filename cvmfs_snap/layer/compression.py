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
from typing import IO, cast

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


class _ZstdFrameChecker:
    """Walks zstd frame and block headers as the compressed bytes pass, to notice a truncated stream.

    python-zstandard's bounded-output reader returns a clean EOF when its input stops in the middle of a frame, so
    a cut download would look like a short but valid layer. Frames are self-delimiting (block headers carry sizes),
    so following them costs almost nothing and tells us whether the input ended on a frame boundary.
    """

    _MAGIC, _SKIP_SIZE, _FHD, _FH_REST, _BLOCK, _SKIP = range(6)

    def __init__(self, name: str) -> None:
        self._name = name
        self._state = self._MAGIC
        self._need = 4
        self._buf = b""
        self._skip = 0
        self._after_skip = self._MAGIC
        self._checksum = False
        self._single = False
        self._fcs_len = 0
        self.frames = 0
        self.offset = 0

    def _bad(self, what: str) -> InvalidInputError:
        return InvalidInputError(
            f"{self._name}: corrupt zstd stream ({what} at compressed offset {self.offset}); the blob is damaged: "
            "fetch it again or re-push the image"
        )

    def feed(self, data: bytes) -> None:
        i = 0
        n = len(data)
        while i < n:
            if self._state == self._SKIP:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                self.offset += step
                if self._skip == 0:
                    self._state = self._after_skip
                    self._need = 4 if self._state == self._MAGIC else 3
                continue
            take = min(self._need - len(self._buf), n - i)
            self._buf += data[i : i + take]
            i += take
            self.offset += take
            if len(self._buf) < self._need:
                continue
            buf, self._buf = self._buf, b""
            self._handle(buf)

    def _handle(self, buf: bytes) -> None:
        if self._state == self._MAGIC:
            magic = int.from_bytes(buf, "little")
            if magic == 0xFD2FB528:
                self._state, self._need = self._FHD, 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = self._SKIP_SIZE, 4
            else:
                raise self._bad("bad frame magic")
        elif self._state == self._SKIP_SIZE:
            self._skip = int.from_bytes(buf, "little")
            self._after_skip = self._MAGIC
            self.frames += 1
            self._state = self._SKIP if self._skip else self._MAGIC
            self._need = 4
        elif self._state == self._FHD:
            fhd = buf[0]
            fcs_flag, single, self._checksum, dict_flag = fhd >> 6, bool(fhd & 0x20), bool(fhd & 0x04), fhd & 3
            if fhd & 0x08:
                raise self._bad("reserved bit set in frame header")
            fcs = {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[fcs_flag]
            self._single, self._fcs_len = single, fcs
            rest = (0 if single else 1) + {0: 0, 1: 1, 2: 2, 3: 4}[dict_flag] + fcs
            if rest:
                self._state, self._need = self._FH_REST, rest
            else:
                self._state, self._need = self._BLOCK, 3
        elif self._state == self._FH_REST:
            self._check_window(buf)
            self._state, self._need = self._BLOCK, 3
        elif self._state == self._BLOCK:
            hdr = int.from_bytes(buf, "little")
            last, btype, bsize = hdr & 1, (hdr >> 1) & 3, hdr >> 3
            if btype == 3:
                raise self._bad("reserved block type")
            content = 1 if btype == 1 else bsize
            if last:
                content += 4 if self._checksum else 0
                self._after_skip = self._MAGIC
                self.frames += 1
            else:
                self._after_skip = self._BLOCK
            if content:
                self._state, self._skip = self._SKIP, content
            else:
                self._state = self._after_skip
                self._need = 4 if self._state == self._MAGIC else 3

    def _check_window(self, rest: bytes) -> None:
        """The frame's decoding window (window descriptor, or the content size of a single-segment frame) must fit
        :data:`MAX_ZSTD_WINDOW`; else say so plainly: such a blob is valid zstd, not damaged."""
        if self._single:
            window = int.from_bytes(rest[len(rest) - self._fcs_len:], "little") if self._fcs_len else 0
        else:
            exponent, mantissa = rest[0] >> 3, rest[0] & 7
            base = 1 << (10 + exponent)
            window = base + (base // 8) * mantissa
        if window > MAX_ZSTD_WINDOW:
            raise InvalidInputError(
                f"{self._name}: zstd frame at compressed offset {self.offset} needs a decoding window of "
                f"{_mib(window)}, more than the {_mib(MAX_ZSTD_WINDOW)} accepted (libzstd's default limit; "
                "`zstd -d` refuses it too without --long=31). The blob is not damaged, its compression settings "
                "are beyond what is decoded here: recompress the layer without --long (or with --long=27 at most)"
            )

    def finish(self) -> None:
        if self._state != self._MAGIC or self._buf or self.frames == 0:
            raise InvalidInputError(
                f"{self._name}: zstd stream is truncated (ends inside a frame after {self.offset} compressed "
                "bytes); the download was cut short or the blob is corrupt: fetch it again"
            )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n} bytes"


class _CheckedRaw:
    def __init__(self, raw: Readable, checker: _ZstdFrameChecker) -> None:
        self._raw = raw
        self._checker = checker

    def read(self, n: int = -1, /) -> bytes:
        data = self._raw.read(n)
        if data:
            self._checker.feed(data)
        elif n != 0:
            self._checker.finish()
        return data


class _ZstdDecoder:
    def __init__(self, raw: Readable, name: str) -> None:
        self._name = name
        self._checker = _ZstdFrameChecker(name)
        self._reader = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).stream_reader(
            cast(IO[bytes], _CheckedRaw(raw, self._checker)), read_size=_CHUNK, read_across_frames=True, closefd=False
        )

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            n = _CHUNK
        if n == 0:
            return b""
        try:
            data: bytes = self._reader.read(n)
        except zstandard.ZstdError as e:
            raise InvalidInputError(
                f"{self._name}: corrupt zstd data near compressed offset {self._checker.offset}: {e}; the blob is "
                "damaged: fetch it again or re-push the image"
            ) from None
        return data


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
