"""Write eStargz: a layer tar (gzip, zstd or plain) in, an eStargz blob out, chunks compressed in parallel.

The uncompressed stream is cut into *units*, each compressed as its own gzip member: a unit starts at every chunk
of a regular file (so a chunk can be fetched and decoded alone, at its TOC ``offset``) and goes on with the tar
padding and the headers that follow, up to the next chunk. Units are compressed with zlib-ng (zlib's format, 1.3-2.5x
faster at the same level and no larger at level 9) on a bounded pool of threads (it releases the GIL), handed over in
batches of at least ``BATCH_BYTES`` (a layer of small files makes thousands of tiny units: a batch is joined into one
buffer, hashed for the diffID with one call and landed with one write, since a GIL round trip per small file kept two
cores from being used), and written in order by one landing thread (blob sha256 and ``out.write``, e.g. the upload,
beside the tar parsing); since each unit is compressed on its own, the output is byte-identical whatever the number
of workers. Memory stays bounded: a few batches (about ``chunk_size`` each) are in flight. The ordered parallel
compression is :mod:`cvmfs_snap.estargz.emitter`; this module cuts the stream into units and writes the TOC.

Tar headers are copied as they are stored; only sparse members are rewritten as regular files (the TOC describes
file bytes, which a sparse member does not hold). Prioritised files (and their parent directories and hardlink
targets) go first, followed by ``.prefetch.landmark``; without them, ``.no.prefetch.landmark`` comes first, as
the Go library does. Prioritising needs the whole tar, so it is spooled to a temporary file first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import zstandard
from zlib_ng import zlib_ng

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.estargz.emitter import Emitter, Unit, Writable
from cvmfs_snap.estargz.footer import SKIPPABLE_MAGIC, gzip_footer, zstd_footer
from cvmfs_snap.estargz.toc import (
    LANDMARK_CONTENTS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    TocEntry,
    format_modtime,
    toc_json_parts,
)
from cvmfs_snap.layer.digesting import Hasher, Readable
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.paths import normalize_path
from cvmfs_snap.layer.tarstream import BLOCK, TarEntry, TarReader

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_COMPRESSION_LEVEL = 6
_TYPES = {"file": "reg", "dir": "dir", "symlink": "symlink", "hardlink": "hardlink", "char": "char",
          "block": "block", "fifo": "fifo"}


@dataclass(frozen=True)
class BuildOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    #: paths to place first, behind ``.prefetch.landmark`` (missing ones are reported, not fatal)
    prioritized: Sequence[str] = ()
    #: compression threads; output is the same for any value
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: directory for the spool file that prioritising needs (default: the system temp dir)
    spool_dir: str | None = None
    #: "gzip" (eStargz) or "zstd" (zstd:chunked members with the eStargz TOC, as Go's ``zstdchunked``)
    compression: str = "gzip"

    def check(self) -> None:
        if self.chunk_size < 1 or self.chunk_size > 1 << 30:
            raise InvalidInputError(f"chunk size must be between 1 byte and 1 GiB, got {self.chunk_size}")
        if self.compression not in ("gzip", "zstd"):
            raise InvalidInputError(f"compression must be gzip or zstd, got {self.compression!r}")
        low, top = (0, 9) if self.compression == "gzip" else (1, 22)
        if not low <= self.compression_level <= top:
            raise InvalidInputError(
                f"{self.compression} compression level must be {low}..{top}, got {self.compression_level}"
            )
        if self.workers < 1:
            raise InvalidInputError(f"workers must be at least 1, got {self.workers}")


@dataclass
class BuildResult:
    toc_digest: str
    #: sha256 of the uncompressed eStargz stream (the config's diffID)
    diff_id: str
    #: bytes of the uncompressed stream (the ``io.containers.estargz.uncompressed-size`` annotation)
    uncompressed_size: int
    #: sha256 and size of the blob written
    digest: str
    size: int
    #: TOC entries other than chunk continuations (the landmark included)
    entries: int
    missing_prioritized: list[str]


@dataclass
class _Item:
    """One member to write: its header bytes and a way to read its (file) data."""

    entry: TarEntry
    header: bytes
    read: Callable[[int], bytes]


def _sparse_header(e: TarEntry) -> bytes:
    ti = tarfile.TarInfo(e.raw_name)
    ti.type = tarfile.REGTYPE
    ti.size = e.size
    ti.mode = e.mode
    ti.uid, ti.gid = e.uid, e.gid
    ti.mtime = e.mtime_ns // 1_000_000_000
    ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in e.xattrs.items()}
    secs, ns = divmod(e.mtime_ns, 1_000_000_000)
    if ns:
        ti.pax_headers["mtime"] = f"{secs}.{ns:09d}"
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _expand_sparse(e: TarEntry, read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """A reader of a sparse member's full contents (holes as zeros) from its stored segments."""
    assert e.sparse is not None
    segments = deque(e.sparse)
    state = {"pos": 0, "left": 0}

    def rd(n: int) -> bytes:
        pos = state["pos"]
        if pos >= e.size:
            return b""
        if state["left"] == 0 and segments and segments[0][0] <= pos:
            _, length = segments.popleft()
            state["left"] = length
        if state["left"]:
            data = read(min(n, state["left"]))
            if not data:
                raise InvalidInputError(f"sparse entry {e.display} is truncated")
            state["left"] -= len(data)
        else:
            nxt = segments[0][0] if segments else e.size
            data = bytes(min(n, nxt - pos))
        state["pos"] = pos + len(data)
        return data

    return rd


def _landmark(name: str) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = len(LANDMARK_CONTENTS)
    ti.mode = 0o644
    return ti.tobuf(tarfile.USTAR_FORMAT) + LANDMARK_CONTENTS + bytes(BLOCK - len(LANDMARK_CONTENTS))


def _toc_header(size: int) -> bytes:
    ti = tarfile.TarInfo(TOC_TAR_NAME)
    ti.size = size
    ti.mode = 0o644
    return ti.tobuf(tarfile.USTAR_FORMAT)


def _read_into(unit: Unit, fh: Hasher | None, read: Callable[[int], bytes], n: int, what: str) -> None:
    """Add the next ``n`` bytes of ``read`` to ``unit`` as they come (joined once, when the unit is submitted)."""
    while n > 0:
        data = read(min(n, 1 << 20))
        if not data:
            raise InvalidInputError(f"{what}: data ends early")
        if fh is not None:
            fh.update(data)
        unit.add(data)
        n -= len(data)


def _modtime(mtime_ns: int, cache: dict[int, str]) -> str:
    """format_modtime, one string object per distinct second (layers share a few timestamps across many files)."""
    secs = (mtime_ns + 500_000_000) // 1_000_000_000
    text = cache.get(secs)
    if text is None:
        if len(cache) > 100_000:
            cache.clear()
        text = cache[secs] = format_modtime(mtime_ns)
    return text


def _toc_entry(e: TarEntry, modtimes: dict[int, str]) -> TocEntry:
    t = TocEntry(
        name=e.path or ".", type=_TYPES[e.kind], mode=e.mode, uid=e.uid, gid=e.gid,
        modtime=_modtime(e.mtime_ns, modtimes), devmajor=e.devmajor, devminor=e.devminor,
        xattrs=dict(e.xattrs) if e.xattrs else None,
    )
    if e.kind in ("symlink", "hardlink"):
        t.linkname = e.linkname
    if e.kind == "file":
        t.size = e.size
    return t


def _landmark_unit(lname: str, unit: Unit, em: Emitter, toc: list[TocEntry]) -> Unit:
    hdr = _landmark(lname)
    e = TocEntry(lname, "reg", size=1, mode=0o644, digest="sha256:" + hashlib.sha256(LANDMARK_CONTENTS).hexdigest())
    unit.add(hdr[:BLOCK])
    em.submit(unit)
    unit = Unit()
    unit.entries.append(e)
    unit.chunks.append((0, 1))
    unit.whole.append(False)  # its digest is known
    unit.add(hdr[BLOCK:])
    toc.append(e)
    return unit


def _write_items(items: Iterable[_Item | bytes], em: Emitter, opts: BuildOptions, lead: bool,
                 name: str) -> list[TocEntry]:
    toc: list[TocEntry] = []
    modtimes: dict[int, str] = {}
    unit = Unit()
    if lead:
        unit = _landmark_unit(NO_PREFETCH_LANDMARK, unit, em, toc)
    for item in items:
        if isinstance(item, bytes):  # the landmark after prioritised files
            unit = _landmark_unit(PREFETCH_LANDMARK, unit, em, toc)
            continue
        te = item.entry
        if te.path in (TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            _skip(item)
            continue
        ent = _toc_entry(te, modtimes)
        toc.append(ent)
        unit.add(item.header)
        if te.kind != "file" or te.size == 0:
            if unit.size >= opts.chunk_size:
                em.submit(unit)
                unit = Unit()
            continue
        read = _expand_sparse(te, item.read) if te.sparse is not None else item.read
        whole = te.size <= opts.chunk_size  # one chunk: its digest is the file's (set when the chunk lands)
        fh = None if whole else hashlib.sha256()
        done = 0
        cur = ent
        while done < te.size:
            n = min(opts.chunk_size, te.size - done)
            em.submit(unit)
            unit = Unit()
            _read_into(unit, fh, read, n, f"{name}: entry {te.display}")
            if cur is not ent:
                toc.append(cur)
            cur.chunk_offset = done
            if te.size - done >= opts.chunk_size:
                cur.chunk_size = n  # as Go writes it: a short last chunk leaves chunkSize out ("the rest")
            unit.entries.append(cur)
            unit.chunks.append((0, n))
            unit.whole.append(whole)
            done += n
            cur = TocEntry(ent.name, "chunk")
        unit.add(bytes(-te.size % BLOCK))
        if fh is not None:
            ent.digest = "sha256:" + fh.hexdigest()
    if opts.compression == "zstd":
        unit.add(bytes(2 * BLOCK))  # zstd:chunked keeps the TOC out of the tar: end the archive here
    em.submit(unit)
    em.drain()
    return toc


def _skip(item: _Item) -> None:
    while item.read(1 << 20):
        pass


def _stream_items(reader: TarReader) -> Iterator[_Item]:
    for e in reader:
        header = _sparse_header(e) if e.sparse is not None else e.header_raw
        yield _Item(e, header, e.read)


def _spooled_items(tar: Readable, opts: BuildOptions, limits: Limits, name: str,
                   missing: list[str]) -> Iterator[_Item | bytes]:
    with tempfile.TemporaryFile(dir=opts.spool_dir, prefix="estargz-spool-") as spool:
        while True:
            data = tar.read(1 << 20)
            if not data:
                break
            spool.write(data)
        spool.flush()
        spool.seek(0)
        index: list[tuple[TarEntry, int]] = []  # entry and the spool offset of its stored data
        for e in TarReader(spool, limits, name, keep_raw=True):
            index.append((e, e.header_offset + len(e.header_raw)))
        by_name: dict[str, int] = {}
        for i, (e, _) in enumerate(index):
            by_name[e.path] = i
        order: list[int] = []
        taken: set[int] = set()

        def take(path: str, depth: int = 0) -> bool:
            if depth > 64:
                return True
            i = by_name.get(path)
            parts = path.split("/") if path else []
            for k in range(len(parts)):  # parents first (as far as the tar has them)
                pi = by_name.get("/".join(parts[:k]))
                if pi is not None and pi not in taken:
                    taken.add(pi)
                    order.append(pi)
            if i is None:
                return False
            if index[i][0].kind == "hardlink":
                take(index[i][0].linkname, depth + 1)
            if i not in taken:
                taken.add(i)
                order.append(i)
            return True

        for p in opts.prioritized:
            try:
                path = normalize_path(p, limits, f"{name}: prioritised file")
            except InvalidInputError:
                missing.append(p)
                continue
            if not take(path):
                missing.append(p)
        fd = spool.fileno()
        for i in [*order, -1, *(j for j in range(len(index)) if j not in taken)]:
            if i == -1:
                yield b"landmark"
                continue
            e, data_off = index[i]
            state = {"off": data_off, "left": e.size if e.sparse is None else sum(n for _, n in e.sparse)}
            if e.kind != "file":
                state["left"] = 0

            def rd(n: int, st: dict[str, int] = state) -> bytes:
                n = min(n, st["left"])
                if n <= 0:
                    return b""
                data = os.pread(fd, n, st["off"])
                st["off"] += len(data)
                st["left"] -= len(data)
                return data

            header = _sparse_header(e) if e.sparse is not None else e.header_raw
            yield _Item(e, header, rd)


#: a serialised TOC up to this size is kept from the pass that measures it for the pass that writes it
TOC_KEEP_BYTES = 4 << 20


def _toc_text(toc: list[TocEntry]) -> tuple[int, Callable[[], Iterable[bytes]]]:
    """The TOC's length (its tar header goes first) and its text in pieces. A small TOC is serialised once and
    kept; a larger one is serialised again for writing, so that a layer of a million files never holds it whole."""
    kept: list[bytes] | None = []
    size = 0
    for part in toc_json_parts(toc):
        size += len(part)
        if kept is not None:
            kept.append(part)
            if size > TOC_KEEP_BYTES:
                kept = None
    if kept is None:
        return size, lambda: toc_json_parts(toc)
    parts = kept
    return size, lambda: parts


def build(
    tar: Readable, out: Writable, options: BuildOptions | None = None, *, name: str = "layer",
    limits: Limits | None = None, progress: Callable[[int], None] | None = None,
) -> BuildResult:
    """Convert the uncompressed layer tar ``tar`` to eStargz written to ``out`` (use ``open_layer`` to decode a
    compressed one). Returns the TOC digest, diffID, uncompressed size and the blob's digest and size."""
    opts = options or BuildOptions()
    opts.check()
    lim = limits or Limits()
    em = Emitter(out, workers=opts.workers, level=opts.compression_level, codec=opts.compression,
                 progress=progress)
    missing: list[str] = []
    try:
        items: Iterable[_Item | bytes]
        if opts.prioritized:
            items = _spooled_items(tar, opts, lim, name, missing)
        else:
            items = _stream_items(TarReader(tar, lim, name, keep_raw=True))
        toc = _write_items(items, em, opts, not opts.prioritized, name)
        if missing:
            log.warning("%s: prioritised files not in the layer: %s", name, ", ".join(missing[:20]))
        body_len, toc_parts = _toc_text(toc)
        toc_hash = hashlib.sha256()
        if opts.compression == "zstd":
            z = zstandard.ZstdCompressor(level=opts.compression_level).compressobj(size=body_len)
            pieces = []
            for part in toc_parts():
                toc_hash.update(part)
                pieces.append(z.compress(part))
            pieces.append(z.flush())
            frame = b"".join(pieces)
            toc_offset = em.offset + 8
            em.write_raw(SKIPPABLE_MAGIC + struct.pack("<I", len(frame)) + frame)
            em.write_raw(zstd_footer(toc_offset, len(frame), body_len))
        else:
            c = zlib_ng.compressobj(opts.compression_level, zlib_ng.DEFLATED, 31)
            toc_offset = em.offset
            header = _toc_header(body_len)
            em.write_raw(c.compress(header), header)
            for part in toc_parts():
                toc_hash.update(part)
                em.write_raw(c.compress(part), part)
            tail = bytes(-body_len % BLOCK) + bytes(2 * BLOCK)
            em.write_raw(c.compress(tail) + c.flush(), tail)
            em.write_raw(gzip_footer(toc_offset))
    finally:
        em.close()
    return BuildResult(
        toc_digest="sha256:" + toc_hash.hexdigest(),
        diff_id="sha256:" + em.diff_hash.hexdigest(),
        uncompressed_size=em.usize,
        digest="sha256:" + em.blob_hash.hexdigest(),
        size=em.offset,
        entries=sum(1 for t in toc if t.type != "chunk"),
        missing_prioritized=missing,
    )
