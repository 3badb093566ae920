"""Read an eStargz blob: footer, TOC (validated, digest-checked), and chunks verified before a byte is returned.

No I/O happens in this module: callers hand in bytes or a range-reader callback ``read(offset, length) -> bytes``,
so the same code serves a local file, a registry (``RegistryClient.read_range``) and a cache. The lazy filesystem
drives it in two steps: :meth:`EStargz.chunks_for` answers "for entry E and byte range R, which compressed ranges of
the blob do I need", and :meth:`EStargz.decode_chunk` turns those bytes into verified file bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, cast

import zstandard

from cvmfs_snap.errors import IntegrityError, InvalidInputError
from cvmfs_snap.estargz.footer import FOOTER_READ_SIZE, Footer, parse_footer
from cvmfs_snap.estargz.toc import DEFAULT_MAX_TOC_SIZE, TOC_TAR_NAME, Toc, TocEntry, parse_toc
from cvmfs_snap.layer.gzipmember import decode_member, decode_member_prefix
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.paths import normalize_path, show
from cvmfs_snap.layer.tarstream import decode_entry

#: ``read(offset, length)`` returns ``length`` bytes of the blob from ``offset`` (fewer only at its end)
RangeReader = Callable[[int, int], bytes]


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a file and the compressed bytes of the blob it is decoded from."""

    entry: TocEntry
    #: where the chunk lies in the file
    file_offset: int
    size: int
    #: the compressed range to fetch: ``blob_offset`` up to ``blob_end`` (exclusive)
    blob_offset: int
    blob_end: int

    @property
    def blob_range(self) -> tuple[int, int]:
        """(offset, length) of the compressed bytes, as ``RegistryClient.read_ranges`` takes them."""
        return self.blob_offset, self.blob_end - self.blob_offset


def _zstd_frame(data: bytes, limit: int, name: str, offset: int, *, prefix: bool = False) -> bytes:
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], io.BytesIO(data)), read_across_frames=False, closefd=False
        )
        out: bytes = reader.read(limit + 1)
    except zstandard.ZstdError as e:
        raise InvalidInputError(f"{name}: corrupt zstd frame at blob offset {offset}: {e}") from None
    if prefix:
        return out[:limit]
    if len(out) > limit:
        raise InvalidInputError(f"{name}: zstd frame at blob offset {offset} decodes to more than {limit} bytes")
    return out


class EStargz:
    """An opened eStargz blob: its footer, validated TOC and TOC digest. Use :meth:`open` or :meth:`from_parts`.

    ``toc_json`` (the TOC's raw JSON) is kept only when asked for (``keep_toc_json``): a process holding many
    layers' TOCs (the lazyfs process) would keep about 340 bytes per file for nothing."""

    def __init__(self, name: str, blob_size: int, footer: Footer, toc: Toc, toc_digest: str,
                 toc_json: bytes | None = None) -> None:
        self.name = name
        self.blob_size = blob_size
        self.footer = footer
        self.toc = toc
        self.toc_digest = toc_digest
        self.toc_json = toc_json

    # -- opening ---------------------------------------------------------------------------------------------
    @staticmethod
    def footer_range(blob_size: int) -> tuple[int, int]:
        """(offset, length) of the blob's tail that holds any footer."""
        n = min(blob_size, FOOTER_READ_SIZE)
        return blob_size - n, n

    @classmethod
    def from_parts(
        cls, name: str, blob_size: int, footer: Footer, toc_bytes: bytes, *, toc_digest: str | None = None,
        limits: Limits | None = None, max_toc_size: int = DEFAULT_MAX_TOC_SIZE, keep_toc_json: bool = False,
    ) -> EStargz:
        """From a parsed footer and the blob bytes ``[footer.toc_offset, +footer.toc_size)``.

        ``toc_digest`` (the layer's ``containerd.io/snapshot/stargz/toc.digest`` annotation) is checked when given.
        """
        if len(toc_bytes) < footer.toc_size:
            raise InvalidInputError(f"{name}: got {len(toc_bytes)} bytes of the TOC, the footer says {footer.toc_size}")
        toc_bytes = toc_bytes[: footer.toc_size]
        if footer.kind == "zstd":
            if footer.toc_json_size > max_toc_size:
                raise InvalidInputError(
                    f"{name}: the footer claims a TOC of {footer.toc_json_size} bytes, over the limit of "
                    f"{max_toc_size}; refusing the layer"
                )
            # the TOC zstd frame sits in a skippable frame whose 8-byte header precedes the offset
            toc_json = _zstd_frame(toc_bytes, max_toc_size, name, footer.toc_offset)
            if footer.toc_json_size and len(toc_json) != footer.toc_json_size:
                raise InvalidInputError(
                    f"{name}: TOC is {len(toc_json)} bytes, the footer says {footer.toc_json_size}; corrupt layer"
                )
        else:
            tar, end = decode_member(toc_bytes, offset=footer.toc_offset, name=name, max_output=max_toc_size + 4096)
            if end != len(toc_bytes):
                raise InvalidInputError(
                    f"{name}: {len(toc_bytes) - end} unexpected bytes between the TOC member and the footer"
                )
            entry = decode_entry(tar, limits, f"{name} (TOC)")
            if entry.path != TOC_TAR_NAME or entry.kind != "file":
                raise InvalidInputError(
                    f"{name}: the TOC member holds {show(entry.raw_name)}, not {TOC_TAR_NAME}; not an eStargz layer"
                )
            start = len(entry.header_raw)
            if entry.size > max_toc_size or start + entry.size > len(tar):
                raise InvalidInputError(
                    f"{name}: the TOC entry claims {entry.size} bytes but its member holds {len(tar) - start} "
                    f"(limit {max_toc_size}); the layer is corrupt or hostile"
                )
            toc_json = tar[start : start + entry.size]
        digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
        if toc_digest is not None and digest != toc_digest:
            raise IntegrityError(
                f"{name}: TOC digest is {digest}, but the layer's annotation says {toc_digest}; the blob or the "
                "manifest was tampered with or corrupted: do not use this layer"
            )
        toc = parse_toc(toc_json, toc_offset=footer.toc_offset, name=name, limits=limits, max_toc_size=max_toc_size)
        return cls(name, blob_size, footer, toc, digest, toc_json if keep_toc_json else None)

    @classmethod
    def open(
        cls, read: RangeReader, blob_size: int, *, name: str = "layer", toc_digest: str | None = None,
        limits: Limits | None = None, max_toc_size: int = DEFAULT_MAX_TOC_SIZE, keep_toc_json: bool = False,
    ) -> EStargz:
        """Open a blob of ``blob_size`` bytes through ``read``: two reads (footer, then TOC)."""
        off, n = cls.footer_range(blob_size)
        footer = parse_footer(read(off, n), blob_size, name)
        if footer.toc_size > max_toc_size + (1 << 20):
            raise InvalidInputError(
                f"{name}: compressed TOC of {footer.toc_size} bytes exceeds the limit of {max_toc_size}; refusing"
            )
        return cls.from_parts(name, blob_size, footer, read(footer.toc_offset, footer.toc_size),
                              toc_digest=toc_digest, limits=limits, max_toc_size=max_toc_size,
                              keep_toc_json=keep_toc_json)

    # -- lookups ---------------------------------------------------------------------------------------------
    def _file(self, path: str) -> tuple[str, TocEntry]:
        key = normalize_path(path, Limits(), f"{self.name}: lookup")
        entry = self.toc.lookup(key)
        if entry is None or entry.type != "reg":
            what = "no such entry" if entry is None else f"a {entry.type}, not a regular file"
            raise InvalidInputError(f"{self.name}: {show(path)} is {what} in the TOC")
        return self.toc.hardlinks.get(key, key), entry

    def chunks_for(self, path: str, offset: int = 0, length: int | None = None) -> list[ChunkRef]:
        """The chunks (and compressed blob ranges) that hold bytes ``[offset, offset+length)`` of file ``path``."""
        key, entry = self._file(path)
        end = entry.size if length is None else min(entry.size, offset + length)
        if offset < 0 or offset >= end:
            return []
        out: list[ChunkRef] = []
        for c in self.toc.chunks.get(key, []):
            if c.chunk_offset + c.chunk_size <= offset or c.chunk_offset >= end:
                continue
            out.append(ChunkRef(c, c.chunk_offset, c.chunk_size, c.offset, c.next_offset))
        return out

    # -- decoding --------------------------------------------------------------------------------------------
    def decode_chunk(self, chunk: ChunkRef, data: bytes) -> bytes:
        """The chunk's file bytes from ``data`` (the blob from ``chunk.blob_offset``, at least the member that
        holds it), checked against its ``chunkDigest``: IntegrityError naming layer, entry and offset otherwise."""
        e = chunk.entry
        want = e.inner_offset + chunk.size
        try:
            if self.footer.compression == "zstd":
                out = _zstd_frame(data, want, self.name, chunk.blob_offset, prefix=True)
            else:
                out = decode_member_prefix(data, want, offset=chunk.blob_offset, name=self.name)
        except InvalidInputError as err:
            raise IntegrityError(
                f"{self.name}: entry {show(e.name)}, chunk at file offset {chunk.file_offset} (blob offset "
                f"{chunk.blob_offset}) does not decode: {err}"
            ) from None
        piece = out[e.inner_offset : want]
        got = "sha256:" + hashlib.sha256(piece).hexdigest()
        if len(piece) != chunk.size or got != e.chunk_digest:
            raise IntegrityError(
                f"{self.name}: entry {show(e.name)}, chunk at file offset {chunk.file_offset} (blob offset "
                f"{chunk.blob_offset}): content has digest {got} ({len(piece)} bytes), the TOC says "
                f"{e.chunk_digest} ({chunk.size} bytes); the blob is corrupt or was tampered with"
            )
        return piece

    def read_file(self, read: RangeReader, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Verified bytes ``[offset, offset+length)`` of file ``path``, fetched through ``read``."""
        parts: list[bytes] = []
        _, entry = self._file(path)
        end = entry.size if length is None else min(entry.size, offset + length)
        for c in self.chunks_for(path, offset, length):
            off, n = c.blob_range
            data = self.decode_chunk(c, read(off, n))
            lo = max(offset - c.file_offset, 0)
            hi = min(end - c.file_offset, c.size)
            parts.append(data[lo:hi])
        return b"".join(parts)

    def verify_all(self, read: RangeReader) -> int:
        """Decode and verify every chunk of every file (and whole-file digests); returns the bytes checked."""
        total = 0
        for name, chunks in self.toc.chunks.items():
            h = hashlib.sha256()
            for c in chunks:
                ref = ChunkRef(c, c.chunk_offset, c.chunk_size, c.offset, c.next_offset)
                off, n = ref.blob_range
                data = self.decode_chunk(ref, read(off, n))
                h.update(data)
                total += len(data)
            reg = chunks[0]
            if reg.digest and "sha256:" + h.hexdigest() != reg.digest:
                raise IntegrityError(f"{self.name}: entry {show(name)}: file digest does not match the TOC")
        return total

    @property
    def prefetch(self) -> list[str]:
        """Entries placed before ``.prefetch.landmark`` (empty without that landmark)."""
        return self.toc.prefetch


def open_bytes(blob: bytes, *, name: str = "layer", toc_digest: str | None = None,
               limits: Limits | None = None, keep_toc_json: bool = False) -> EStargz:
    """Open a blob held in memory (tests, small layers)."""
    return EStargz.open(lambda off, n: blob[off : off + n], len(blob), name=name, toc_digest=toc_digest,
                        limits=limits, keep_toc_json=keep_toc_json)


def file_reader(f: IO[bytes]) -> RangeReader:
    """A range reader over an open binary file (positional reads, safe from several threads)."""
    fd = f.fileno()
    return lambda off, n: os.pread(fd, n, off)
