"""The one gzip decoder: a multi-member stream, or single members at known offsets.

Inflating uses the fastest implementation installed (:data:`INFLATER`): ISA-L (``isal``, the node extra: 2-2.5x
zlib's speed), else zlib-ng (a core dependency: ~1.7x), else the standard ``zlib``; all three produce the same bytes
and release the GIL while they work, so chunks can be decoded on several threads at once.

A layer blob is a concatenation of gzip members (eStargz writes one per chunk). :class:`GzipStreamDecoder` reads
such a stream from any member boundary with bounded output per ``read(n)``; :func:`decode_member` decodes the one
member that starts at a given offset of a byte string, as an eStargz reader does with a TOC offset, and says where it
ended. Corrupt and truncated input raises :class:`InvalidInputError` naming the blob offset.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layer.digesting import Readable

GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 256 * 1024


class Inflater(Protocol):
    """A gzip decompressor object (``zlib.decompressobj(wbits=31)`` and its drop-in replacements)."""

    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    @property
    def unconsumed_tail(self) -> bytes: ...
    def decompress(self, data: bytes | memoryview, max_length: int = 0, /) -> bytes: ...


def _exc(cls: object) -> type[Exception]:
    """An error class (the isal and zlib-ng stubs type theirs as an instance)."""
    assert isinstance(cls, type) and issubclass(cls, Exception)
    return cls


#: inflater name -> (factory of a gzip decompressor, the error class its corrupt input raises), fastest first
BACKENDS: dict[str, tuple[Callable[[], Inflater], type[Exception]]] = {}
try:
    from isal import isal_zlib
except ImportError:  # the node extra is not installed: zlib-ng below
    pass
else:
    BACKENDS["isal"] = (lambda: isal_zlib.decompressobj(wbits=31), _exc(isal_zlib.error))
try:
    from zlib_ng import zlib_ng
except ImportError:
    pass
else:
    BACKENDS["zlib-ng"] = (lambda: zlib_ng.decompressobj(wbits=31), _exc(zlib_ng.error))
BACKENDS["zlib"] = (lambda: zlib.decompressobj(wbits=31), zlib.error)

#: the inflater in use: the first of :data:`BACKENDS`
INFLATER = next(iter(BACKENDS))
_new, _error = BACKENDS[INFLATER]


def use_inflater(name: str) -> None:
    """Decode with inflater ``name`` of :data:`BACKENDS` from now on (tests and benchmarks compare them)."""
    global INFLATER, _new, _error
    if name not in BACKENDS:
        raise InvalidInputError(f"gzip inflater {name!r} is not installed (available: {', '.join(BACKENDS)})")
    INFLATER = name
    _new, _error = BACKENDS[name]


class GzipStreamDecoder:
    """Multi-member gzip (as eStargz writes it), with bounded output per read and truncation detection.

    ``raw`` must be positioned at the start of a member; ``start_offset`` is where that is in the blob (an eStargz
    reader starts at a TOC offset), so that messages name blob offsets.
    """

    def __init__(self, raw: Readable, name: str, start_offset: int = 0) -> None:
        self._raw = raw
        self._name = name
        self._d = _new()
        self._pending = b""  # compressed input not yet fed
        self._member_started = False
        self._members = 0
        self._offset = start_offset  # blob offset of the compressed bytes fed so far
        self._done = False

    def _new_member(self) -> None:
        self._d = _new()
        self._member_started = False

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        if n == 0:
            return b""
        while not self._done:
            if self._d.unconsumed_tail:
                src = self._d.unconsumed_tail
            elif self._pending:
                src, self._pending = self._pending, b""
            else:
                src = self._raw.read(CHUNK)
                if not src:
                    if self._member_started:
                        raise InvalidInputError(
                            f"{self._name}: gzip stream is truncated (ends inside member {self._members + 1} "
                            f"after {self._offset} compressed bytes); the download was cut short or the blob is "
                            "corrupt: fetch it again"
                        )
                    if self._members == 0:
                        raise InvalidInputError(f"{self._name}: gzip stream is empty at offset {self._offset}")
                    self._done = True
                    break
                self._offset += len(src)
            if not self._member_started and not self._d.unconsumed_tail:
                if src[:1] != b"\x1f" or (len(src) > 1 and src[1:2] != b"\x8b"):
                    raise InvalidInputError(
                        f"{self._name}: unexpected data after the end of the gzip stream (compressed offset "
                        f"{self._offset - len(src)}): the blob is not valid gzip; fetch it again or re-push it"
                    )
                self._member_started = True
            try:
                out = self._d.decompress(src, n)
            except _error as e:
                raise InvalidInputError(
                    f"{self._name}: corrupt gzip data near compressed offset {self._offset}: {e}; the blob is "
                    "damaged: fetch it again or re-push the image"
                ) from None
            if self._d.eof:
                self._members += 1
                self._pending = self._d.unused_data
                self._new_member()
            if out:
                return out
        return b""


def decode_member(
    data: bytes, *, offset: int = 0, name: str = "layer", max_output: int = 1 << 30, start: int = 0
) -> tuple[bytes, int]:
    """Decode the single gzip member at ``data[start:]``: (its uncompressed bytes, index in ``data`` where it ends).

    ``offset`` is the blob offset of ``data[0]`` (for messages). More than ``max_output`` bytes of output (a
    decompression bomb or a lying TOC) is refused before it is produced.
    """
    at = offset + start
    if data[start : start + 2] != GZIP_MAGIC:
        raise InvalidInputError(
            f"{name}: no gzip member at blob offset {at} (found {data[start:start + 4].hex() or 'end of data'})"
        )
    d = _new()
    try:
        out = d.decompress(memoryview(data)[start:], max_output + 1)
    except _error as e:
        raise InvalidInputError(f"{name}: corrupt gzip member at blob offset {at}: {e}") from None
    if len(out) > max_output:
        raise InvalidInputError(
            f"{name}: gzip member at blob offset {at} decodes to more than {max_output} bytes; refusing it"
        )
    if not d.eof:
        raise InvalidInputError(f"{name}: gzip member at blob offset {at} is truncated (ends after {len(data) - start} "
                                "bytes)")
    return out, len(data) - len(d.unused_data)


def decode_member_prefix(data: bytes, length: int, *, offset: int = 0, name: str = "layer") -> bytes:
    """The first ``length`` uncompressed bytes of the gzip member at ``data[0]`` (blob offset ``offset``).

    The member may hold more (an eStargz chunk's member goes on with the next tar headers); exactly ``length``
    bytes are produced, or InvalidInputError if the member ends (or ``data`` stops) before that.
    """
    if data[:2] != GZIP_MAGIC:
        raise InvalidInputError(f"{name}: no gzip member at blob offset {offset} (found {data[:4].hex() or 'nothing'})")
    d = _new()
    try:
        out = d.decompress(data, length)
    except _error as e:
        raise InvalidInputError(f"{name}: corrupt gzip member at blob offset {offset}: {e}") from None
    if len(out) < length:
        raise InvalidInputError(
            f"{name}: gzip member at blob offset {offset} holds {len(out)} bytes, fewer than the {length} expected"
        )
    return out
