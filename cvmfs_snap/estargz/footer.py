"""eStargz footers: where the TOC is, read from the last bytes of a blob (no I/O here: bytes in, facts out).

Three footers exist (containerd/stargz-snapshotter ``estargz`` and its ``zstdchunked`` package):

* eStargz (51 bytes): an empty gzip member whose header extra field holds subfield ``SG`` with
  ``%016x`` of the TOC offset followed by ``STARGZ``;
* legacy stargz (47 bytes): the same without the ``SG`` subfield header (the extra field is the 22 bytes alone);
* zstd:chunked (48 bytes): a zstd skippable frame (magic ``0x184D2A50``, size 40) holding the TOC offset, the
  compressed and uncompressed TOC sizes (little-endian uint64), the manifest type (1 = TOC JSON) and the magic
  ``GnUlInUx``. There the TOC is a zstd frame inside a skippable frame that starts 8 bytes before the offset.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from cvmfs_snap.errors import InvalidInputError

GZIP_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
ZSTD_FOOTER_SIZE = 48
#: read this many bytes from a blob's end to find any of the footers
FOOTER_READ_SIZE = max(GZIP_FOOTER_SIZE, LEGACY_FOOTER_SIZE, ZSTD_FOOTER_SIZE)

SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
_MANIFEST_TYPE_TOC = 1


@dataclass(frozen=True)
class Footer:
    """Where a blob's TOC lies. ``kind`` is ``estargz``, ``legacy`` or ``zstd``; sizes in bytes of the blob."""

    kind: str
    toc_offset: int
    #: compressed size of the TOC (for gzip: everything between the TOC offset and the footer)
    toc_size: int
    footer_size: int
    #: uncompressed TOC JSON size when the footer states it (zstd), else 0
    toc_json_size: int = 0

    @property
    def compression(self) -> str:
        return "zstd" if self.kind == "zstd" else "gzip"


def gzip_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer for a TOC at ``toc_offset``, byte-identical to the Go library's."""
    sub = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(sub)) + sub
    # gzip header: magic, CM=8, FLG=FEXTRA, MTIME=0, XFL=0, OS=255 (Go's compress/gzip), XLEN, extra
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\x00\xff" + struct.pack("<H", len(extra)) + extra
    # an empty stored deflate block (final), then CRC32 and ISIZE of nothing
    body = b"\x01\x00\x00\xff\xff" + struct.pack("<II", zlib.crc32(b""), 0)
    out = header + body
    assert len(out) == GZIP_FOOTER_SIZE
    return out


def zstd_footer(toc_offset: int, toc_compressed: int, toc_json: int) -> bytes:
    """The 48-byte zstd:chunked footer (skippable frame) for a TOC zstd frame at ``toc_offset``."""
    payload = struct.pack("<QQQQ", toc_offset, toc_compressed, toc_json, _MANIFEST_TYPE_TOC) + ZSTD_CHUNKED_MAGIC
    return SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


def _gzip_extra(member: bytes) -> bytes | None:
    """The FEXTRA field of a gzip header, None if there is none (or the bytes are no gzip header)."""
    if len(member) < 12 or member[:3] != b"\x1f\x8b\x08" or not member[3] & 0x04:
        return None
    (xlen,) = struct.unpack("<H", member[10:12])
    if 12 + xlen > len(member):
        return None
    return member[12 : 12 + xlen]


def _empty_member(member: bytes) -> bool:
    try:
        d = zlib.decompressobj(wbits=31)
        out = d.decompress(member, 1)
    except zlib.error:
        return False
    return d.eof and not out and not d.unused_data


def _toc_offset(hexpart: bytes, name: str) -> int:
    try:
        text = hexpart.decode("ascii")
        if len(text) != 16 or text.strip() != text or text.startswith(("+", "-")):
            raise ValueError
        return int(text, 16)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInputError(f"{name}: eStargz footer holds a malformed TOC offset {hexpart!r}") from None


def parse_footer(tail: bytes, blob_size: int, name: str = "layer") -> Footer:
    """The footer at the end of a ``blob_size``-byte blob, from its last bytes ``tail`` (>= FOOTER_READ_SIZE, or
    the whole blob if shorter). InvalidInputError if there is none or it points outside the blob."""
    tail = tail[-FOOTER_READ_SIZE:]
    found: Footer | None = None
    reasons: list[str] = []
    if len(tail) >= GZIP_FOOTER_SIZE:
        m = tail[-GZIP_FOOTER_SIZE:]
        extra = _gzip_extra(m)
        if extra is not None and len(extra) == 26 and extra[:2] == b"SG" and extra[-6:] == b"STARGZ":
            if struct.unpack("<H", extra[2:4])[0] != 22 or not _empty_member(m):
                reasons.append("eStargz footer with a bad subfield length or a non-empty member")
            else:
                off = _toc_offset(extra[4:20], name)
                found = Footer("estargz", off, blob_size - GZIP_FOOTER_SIZE - off, GZIP_FOOTER_SIZE)
    if found is None and len(tail) >= LEGACY_FOOTER_SIZE:
        m = tail[-LEGACY_FOOTER_SIZE:]
        extra = _gzip_extra(m)
        if extra is not None and len(extra) == 22 and extra[-6:] == b"STARGZ" and _empty_member(m):
            off = _toc_offset(extra[:16], name)
            found = Footer("legacy", off, blob_size - LEGACY_FOOTER_SIZE - off, LEGACY_FOOTER_SIZE)
    if found is None and len(tail) >= ZSTD_FOOTER_SIZE:
        m = tail[-ZSTD_FOOTER_SIZE:]
        if m[:4] == SKIPPABLE_MAGIC and m[-8:] == ZSTD_CHUNKED_MAGIC:
            if struct.unpack("<I", m[4:8])[0] != 40:
                reasons.append("zstd:chunked footer frame of the wrong size")
            else:
                off, csize, jsize, mtype = struct.unpack("<QQQQ", m[8:40])
                if mtype != _MANIFEST_TYPE_TOC:
                    raise InvalidInputError(
                        f"{name}: zstd:chunked footer names manifest type {mtype}, not a TOC (1); only eStargz-style "
                        "TOCs are supported"
                    )
                found = Footer("zstd", off, csize, ZSTD_FOOTER_SIZE, jsize)
    if found is None:
        why = f" ({'; '.join(reasons)})" if reasons else ""
        raise InvalidInputError(
            f"{name}: no eStargz footer at the end of the blob{why}: it is not an eStargz/stargz layer"
        )
    payload_end = blob_size - found.footer_size
    if (found.toc_offset <= 0 or found.toc_offset >= payload_end or found.toc_size <= 0
            or found.toc_offset + found.toc_size > payload_end):
        raise InvalidInputError(
            f"{name}: {found.kind} footer puts the TOC at offset {found.toc_offset} (+{found.toc_size} bytes), "
            f"outside the {blob_size}-byte blob; the layer is corrupt or hostile"
        )
    return found
