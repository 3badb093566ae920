"""The files of the lazy chunk cache: written complete or not at all, read with their pages dropped, and packs.

:class:`~cvmfs_snap.lazyfs.cache.ChunkCache` keeps the index (LRU order, bound, references); this module does the
I/O of its files: :func:`write_new` (a new file in ``tmp/``, renamed into place by the cache), :func:`read_whole`
(a chunk file, its pages dropped after the read), :func:`drop_pages`, and the pack format.

**Packs**: many small chunks in one file, so reading them costs one disk I/O.

A container's ``find`` + ``cat`` of many small files reads one small chunk per file; as one cache file each,
every read after ``drop_caches`` (or once the cache file's pages were dropped, as the cache always does) is a disk
I/O of its own, about 30 us of kernel CPU and 70 us of latency on a VM disk. Chunks of at most
:data:`PACK_CHUNK_MAX` bytes that are stored together (the chunks a fetch brought, in blob order) go into one
pack of up to :data:`PACK_MAX` bytes instead, and the reader's readahead then reads a run of them with one
``pread``.

Format (nothing but this module reads or writes it)::

    chunk bytes, concatenated
    index: per chunk its raw 32-byte sha256 (the key), offset and length (>32sII)
    trailer: MAGIC, number of chunks, crc32 of the index (>8sII)

A pack is written to the cache's ``tmp/`` and renamed into place complete, as chunk files are, so a crash leaves
no half pack. The index is checked (crc32, bounds) when the cache starts; the chunks' contents are checked by the
reader against their digests, as for chunk files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: chunks up to this many bytes are stored in packs
PACK_CHUNK_MAX = 32 * 1024
#: bytes of chunk data one pack holds at most
PACK_MAX = 1024 * 1024
#: reads of chunks of one pack at most this far apart are one ``pread``
READ_GAP = 64 * 1024
SUFFIX = ".pack"
MAGIC = b"CSNPACK1"
_ENTRY = struct.Struct(">32sII")
_TRAILER = struct.Struct(">8sII")

#: (key, offset, length) of one chunk in a pack
Slot = tuple[str, int, int]


def encode(items: Sequence[tuple[str, bytes]]) -> tuple[list[bytes], list[Slot]]:
    """The pieces of a pack file holding ``items`` (key, bytes), and where each chunk lies in it."""
    pieces: list[bytes] = []
    slots: list[Slot] = []
    off = 0
    for key, data in items:
        pieces.append(data)
        slots.append((key, off, len(data)))
        off += len(data)
    index = b"".join(_ENTRY.pack(bytes.fromhex(k), o, n) for k, o, n in slots)
    pieces.append(index)
    pieces.append(_TRAILER.pack(MAGIC, len(slots), zlib.crc32(index)))
    return pieces, slots


# ---------------------------------------------------------------------- the cache's index of packs
@dataclass(slots=True)
class Pack:
    """A pack file as the cache's index knows it."""

    path: Path
    size: int  # bytes of the file (all of them count in the bound)
    #: its chunks' keys as stored (a key released or stored again elsewhere since is not the pack's any more:
    #: ``ChunkCache._live``); ``live`` counts those still its own
    keys: list[str] = field(default_factory=list)
    live: int = 0
    used: bool = False  # one of its chunks was used since eviction last looked at it (its second chance)


#: the index's value of a chunk in a pack: ``-1 - (pack << 56 | offset << 24 | length)`` (a chunk file's value is
#: its size, >= 0): one int per chunk, whatever the number of chunks cached
OFF_BITS, LEN_BITS = 32, 24


def packed_value(num: int, off: int, n: int) -> int:
    """The index value of chunk ``(off, n)`` of pack ``num``."""
    return -1 - (num << (OFF_BITS + LEN_BITS) | off << LEN_BITS | n)


def slot_of(v: int) -> tuple[int, int, int]:
    """(pack, offset, length) of a packed chunk's index value."""
    c = -1 - v
    return c >> (OFF_BITS + LEN_BITS), (c >> LEN_BITS) & ((1 << OFF_BITS) - 1), c & ((1 << LEN_BITS) - 1)


def value_size(v: int) -> int:
    """The bytes of a chunk, from its index value (a chunk file's or a packed one's)."""
    return v if v >= 0 else (-1 - v) & ((1 << LEN_BITS) - 1)


def write_new(path: Path, pieces: Sequence[bytes], *, sync: bool) -> None:
    """A new file ``path`` (refused if it exists) holding ``pieces``, its pages on their way out of the page cache
    (``sync``: on disk first, then dropped). Removed again when the write fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for p in pieces:
            view = memoryview(p)
            while view:
                view = view[os.write(fd, view):]
        if sync:
            os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def read_whole(path: Path) -> bytes | None:
    """The bytes of file ``path`` (None if it is gone), its pages dropped after the read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # evicted or released meanwhile
        return None
    try:
        size = os.fstat(fd).st_size
        parts: list[bytes] = []
        got = 0
        while got < size:
            b = os.pread(fd, size - got, got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return b"".join(parts)


def drop_pages(paths: Iterable[Path], *, sync: bool = False) -> None:
    """Drop the page cache pages of ``paths`` (``sync``: written back first); files gone meanwhile are skipped."""
    for p in paths:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if sync:
                    os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def load_index(path: Path) -> tuple[int, list[Slot]] | None:
    """Size and chunks of the pack at ``path``; None, and the file removed, when it is no sound pack of ours."""
    try:
        if path.suffix != SUFFIX:
            raise ValueError("not a pack")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return read_index(fd)
        finally:
            os.close(fd)
    except (OSError, ValueError) as e:
        log.warning("chunk cache: removing %s (%s)", path, e)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return None


def read_pack(path: Path, slots: Sequence[Slot]) -> dict[str, bytes]:
    """:func:`read_slots` of the pack at ``path`` (nothing if it is gone), its pages dropped after the read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # evicted meanwhile
        return {}
    try:
        out = read_slots(fd, slots)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return out


def read_index(fd: int) -> tuple[int, list[Slot]]:
    """The size of the pack open at ``fd`` and its chunks; ValueError when it is not a sound pack."""
    size = os.fstat(fd).st_size
    if size < _TRAILER.size:
        raise ValueError("shorter than its trailer")
    magic, count, crc = _TRAILER.unpack(os.pread(fd, _TRAILER.size, size - _TRAILER.size))
    data_end = size - _TRAILER.size - count * _ENTRY.size
    if magic != MAGIC or data_end < 0:
        raise ValueError("no pack trailer")
    index = os.pread(fd, count * _ENTRY.size, data_end)
    if len(index) != count * _ENTRY.size or zlib.crc32(index) != crc:
        raise ValueError("damaged index")
    slots: list[Slot] = []
    for raw, off, n in _ENTRY.iter_unpack(index):
        if off + n > data_end:
            raise ValueError("index points past the chunk data")
        slots.append((raw.hex(), off, n))
    return size, slots


def read_slots(fd: int, slots: Sequence[Slot]) -> dict[str, bytes]:
    """The bytes of ``slots`` of the pack open at ``fd``: neighbours (at most :data:`READ_GAP` apart) in one
    ``pread``. A chunk cut short (a damaged file) is left out."""
    out: dict[str, bytes] = {}
    todo = sorted(slots, key=lambda s: s[1])
    i = 0
    while i < len(todo):
        j = i + 1
        end = todo[i][1] + todo[i][2]
        while j < len(todo) and todo[j][1] - end <= READ_GAP and todo[j][1] + todo[j][2] - todo[i][1] <= PACK_MAX:
            end = max(end, todo[j][1] + todo[j][2])
            j += 1
        start = todo[i][1]
        buf = os.pread(fd, end - start, start)
        for key, off, n in todo[i:j]:
            piece = buf[off - start:off - start + n]
            if len(piece) == n:
                out[key] = piece
        i = j
    return out
