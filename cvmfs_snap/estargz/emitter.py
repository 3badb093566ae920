"""The writer's ordered, parallel compression: units of the uncompressed stream in, gzip (or zstd) members out in
blob order, with the TOC offsets and chunk digests filled in as members land (docs/ARCHITECTURE.md, "eStargz").

With one worker everything runs on the caller's thread; with more, units are compressed on a bounded pool in batches
of at least ``BATCH_BYTES`` and landed in order by one landing thread (see :class:`Emitter`). Each unit is compressed
on its own, so the output is byte-identical whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import zstandard
from zlib_ng import zlib_ng

from cvmfs_snap.estargz.toc import TocEntry


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


def compress_unit(unit: bytes | memoryview, level: int, digests: list[tuple[int, int]],
                  codec: str) -> tuple[bytes, list[str]]:
    if codec == "zstd":
        out = zstandard.ZstdCompressor(level=level).compress(unit)
    elif level >= 2:  # one call, one GIL round trip; the same bytes as compressobj at these levels
        out = zlib_ng.compress(unit, level, wbits=31)
    else:  # levels 0 and 1 make other blocks in one call than through compressobj: keep their output
        c = zlib_ng.compressobj(level, zlib_ng.DEFLATED, 31)
        out = c.compress(unit) + c.flush()
    mv = memoryview(unit)
    return out, ["sha256:" + hashlib.sha256(mv[a:b]).hexdigest() for a, b in digests]


class Unit:
    __slots__ = ("chunks", "entries", "parts", "size", "whole")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        #: TOC entries whose chunk starts this unit (offset = the unit's blob offset) and their data ranges
        self.entries: list[TocEntry] = []
        self.chunks: list[tuple[int, int]] = []
        #: per entry: the chunk is the whole file (its digest is the file's digest)
        self.whole: list[bool] = []

    def add(self, data: bytes) -> None:
        if data:
            self.parts.append(data)
            self.size += len(data)


#: units go to the pool in batches of at least this many bytes: thousands of small files make thousands of tiny
#: units, and a task each would cost more in thread hand-offs (and GIL round trips) than compressing them
BATCH_BYTES = 1 << 20

Member = tuple[bytes, list[str]]  # a compressed unit and its chunks' digests
Span = tuple[int, int, list[tuple[int, int]]]  # a unit's range in its batch's buffer and its chunks' ranges


def _compress_batch(buf: bytes, spans: list[Span], level: int, codec: str) -> list[Member]:
    with memoryview(buf) as mv:
        return [compress_unit(mv[a:b], level, chunks, codec) for a, b, chunks in spans]


class Emitter:
    """Units in, compressed members out in order; TOC offsets and chunk digests filled in as members land.

    With one worker everything happens on the caller's thread. With more, units are compressed on a pool, in
    batches, and *landed* (TOC entries completed, the member hashed and written to ``out``) in order by one landing
    thread, so that the caller's thread only parses the tar, cuts units and hashes them (the diffID): the blob's
    sha256 and the upload run beside it and beside the compression. Batches being compressed and batches not yet
    landed are bounded, so memory is too. ``drain`` waits until everything submitted has landed.
    """

    def __init__(self, out: Writable, *, workers: int, level: int, codec: str,
                 progress: Callable[[int], None] | None = None) -> None:
        self.out = out
        self.level, self.codec = level, codec
        self.progress = progress
        self.offset = 0
        self.blob_hash = hashlib.sha256()
        self.diff_hash = hashlib.sha256()
        self.usize = 0
        self._pool = ThreadPoolExecutor(workers, "estargz") if workers > 1 else None
        #: the batch being filled: its units, their parts (joined into one buffer at flush) and their spans in it
        self._batch: list[Unit] = []
        self._parts: list[bytes] = []
        self._spans: list[Span] = []
        self._batch_size = 0
        #: batches handed to the pool and not compressed yet: every worker busy, one more batch waiting each
        self._slots = threading.Semaphore(2 * workers)
        #: batches not landed yet (compressed ones wait for an earlier one to land: members go out in order)
        self._queue: queue.Queue[tuple[list[Unit], Future[list[Member]]] | None] = queue.Queue(
            maxsize=4 * workers)
        self._error: BaseException | None = None
        self._closing = False
        self._lander: threading.Thread | None = None
        if self._pool is not None:
            self._lander = threading.Thread(target=self._landing, name="estargz-land", daemon=True)
            self._lander.start()

    def submit(self, unit: Unit) -> None:
        if not unit.size:
            return
        if self._pool is None:
            data = unit.parts[0] if len(unit.parts) == 1 else b"".join(unit.parts)
            unit.parts = []
            self.diff_hash.update(data)
            self.usize += len(data)
            self._land(unit, compress_unit(data, self.level, unit.chunks, self.codec))
            return
        # with a pool, a batch's units are joined once and hashed once (not a GIL round trip per small file)
        start = self._batch_size
        self._batch.append(unit)
        self._parts += unit.parts
        unit.parts = []
        self._batch_size += unit.size
        self._spans.append((start, self._batch_size, unit.chunks))
        if self._batch_size >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._batch or self._pool is None:
            return
        self._check()
        units, spans, parts = self._batch, self._spans, self._parts
        self._batch, self._spans, self._parts, self._batch_size = [], [], [], 0
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        del parts
        self.diff_hash.update(buf)
        self.usize += len(buf)
        self._slots.acquire()
        fut = self._pool.submit(_compress_batch, buf, spans, self.level, self.codec)
        fut.add_done_callback(lambda _: self._slots.release())
        self._queue.put((units, fut))

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _landing(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None and not self._closing:  # else only empty the queue: no submitter blocks
                    units, fut = item
                    members = fut.result()
                    offset = self.offset
                    for unit, (comp, digests) in zip(units, members, strict=True):
                        self._place(unit, offset, digests)
                        offset += len(comp)
                    self._write(members[0][0] if len(members) == 1 else b"".join(m[0] for m in members))
            except BaseException as e:  # raised again on the submitting thread
                self._error = e
            finally:
                self._queue.task_done()

    @staticmethod
    def _place(unit: Unit, offset: int, digests: list[str]) -> None:
        for ent, dg, whole in zip(unit.entries, digests, unit.whole, strict=True):
            ent.offset = offset
            ent.chunk_digest = dg
            if whole:  # a one-chunk file; a longer file's digest is set by the tar thread after its last chunk
                ent.digest = dg

    def _land(self, unit: Unit, member: Member) -> None:
        comp, digests = member
        self._place(unit, self.offset, digests)
        self._write(comp)

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.blob_hash.update(data)
        self.offset += len(data)
        if self.progress:
            self.progress(len(data))

    def drain(self) -> None:
        """Wait until every unit submitted has landed (raising what landing raised)."""
        if self._pool is not None:
            self._flush()
            self._queue.join()
            self._check()

    def write_raw(self, data: bytes, uncompressed: bytes = b"") -> None:
        self.drain()
        if uncompressed:
            self.diff_hash.update(uncompressed)
            self.usize += len(uncompressed)
        if data:  # the TOC's compressor returns nothing for most entries: no empty write to the upload each
            self._write(data)

    def close(self) -> None:
        if self._lander is not None:
            self._closing = True  # after a failure: what is still queued is dropped, not written
            self._queue.put(None)
            self._lander.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
