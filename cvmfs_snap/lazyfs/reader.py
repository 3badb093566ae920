"""Verified file reads of one lazy eStargz layer (trio): cache -> fetch -> decode + verify -> cache.

:class:`LayerReader` is what the FUSE layer (``lazyfs/fs.py``) calls for file contents (model: stargz-snapshotter's
``fs/reader``):

- ``read(path, offset, size)`` maps the byte range to the file's chunks (``EStargz.chunks_for``); chunks in the
  :class:`~cvmfs_snap.lazyfs.cache.ChunkCache` are checked against their digest (a damaged one is discarded and
  fetched again), the missing ones are fetched together (one streamed :meth:`BlobFetcher.stream`, so neighbours
  merge), each decoded and verified by ``EStargz.decode_chunk`` as soon as it has arrived (``lazyfs/decoding.py``)
  and stored: the reads waiting for it go on first, a task of its own writes it to the disk cache
  (``lazyfs/writeback.py``: at most ``UNWRITTEN_MAX`` bytes wait so; past that, fetches wait for the writes;
  small chunks go into packs, one disk read for many when read again). A chunk whose bytes do not verify
  is fetched once more; if it fails again the read raises :class:`IntegrityError` (EIO to the caller): **never
  wrong bytes**. A registry that stays unreachable gives :class:`UnavailableError` (EIO as well). Not a regular
  file: :class:`InvalidInputError`.
- **Readahead**: reads that go through the layer in blob order (the rest of a file, then the file stored after
  it) start fetching the chunks ahead of them (or reading them from the disk cache into the memory tier, up to
  half its size: a ``find`` + ``cat`` of many small files costs one thread hop per window, not one per file)
  in a task of their own, with a window that doubles up to
  ``readahead_bytes``, so fetching overlaps decoding and the next reads find their chunks ready; a read that
  jumps elsewhere resets the window, and reads ahead go past the end of a file only once reads have moved on to
  the next file in blob order, so a container reading a few files fetches about what it reads. Chunks being
  loaded by one task are waited for by the others (never fetched or decoded twice).
- ``prefetch(bound_bytes)`` fetches the landmark set (entries before ``.prefetch.landmark``) up to ``bound_bytes``
  of compressed data, so the container starts without waiting for more.
- ``start_background(nursery)`` fetches every other chunk, one batch at a time (so it holds at most one of the
  fetcher's threads), pausing while real reads are waiting (reads of every layer sharing its
  :class:`ReadActivity`); one pass, so a cache smaller than the layer is not thrashed.

Blocking work (cache file I/O, gzip decoding, hashing) runs in worker threads, never in the event loop.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import IntegrityError, InvalidInputError, UnavailableError
from cvmfs_snap.estargz import FOOTER_READ_SIZE, ChunkRef, EStargz, TocEntry, parse_footer
from cvmfs_snap.lazyfs.cache import ChunkCache, cache_key
from cvmfs_snap.lazyfs.cachefiles import PACK_CHUNK_MAX, PACK_MAX
from cvmfs_snap.lazyfs.decoding import DECODE_THREADS, stream_decoded
from cvmfs_snap.lazyfs.metrics import DEFAULT_METRICS, LazyMetrics
from cvmfs_snap.lazyfs.remote import BlobFetcher
from cvmfs_snap.lazyfs.writeback import ChunkWriteback

log = logging.getLogger(__name__)

#: compressed bytes one background (or prefetch) batch fetches at most
BATCH_BYTES = 4 * 1024 * 1024
#: prefetch batches in flight at once
PREFETCH_PARALLEL = 2
#: sequential reads fetch ahead up to this many compressed bytes (the window starts at 1/8 of it)
DEFAULT_READAHEAD = 8 * 1024 * 1024
#: bytes read from a blob's end at open: its footer and a TOC of up to about this size in one request (below
#: stargz-snapshotter's 50,000-byte chunk, which it reads for the footer)
TAIL_READ = 32 * 1024
#: compressed TOCs up to this size (some hundred entries) are parsed without a thread hop
INLINE_TOC = 16 * 1024
#: files whose chunk lists the reader keeps at hand (FUSE reads a file in many pieces)
FILE_MEMO = 64


def _entry_key(e: TocEntry) -> str:
    d = e.chunk_digest  # "sha256:" + 64 hex digits, checked when the TOC was parsed
    return d[7:] if len(d) == 71 else cache_key(d)


def _key(ref: ChunkRef) -> str:
    return _entry_key(ref.entry)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ref(c: TocEntry) -> ChunkRef:
    return ChunkRef(c, c.chunk_offset, c.chunk_size, c.offset, c.next_offset)


class ReadActivity:
    """Reads waiting for data, counted over every layer that shares this object: background fetches pause while
    any read waits (pass one to all readers of a process; each reader makes its own otherwise)."""

    def __init__(self) -> None:
        self.waiting = 0
        self._idle: trio.Event | None = None  # made only while something waits for it (not one per read)

    def begin(self) -> None:
        self.waiting += 1

    def end(self) -> None:
        self.waiting -= 1
        if self.waiting == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Return once no read waits."""
        if self.waiting:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()


def _batches(refs: Iterable[ChunkRef], limit: int = BATCH_BYTES) -> list[list[ChunkRef]]:
    out: list[list[ChunkRef]] = []
    cur: list[ChunkRef] = []
    size = 0
    for r in refs:
        n = r.blob_end - r.blob_offset
        if cur and size + n > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += n
    if cur:
        out.append(cur)
    return out



def _assemble(refs: list[ChunkRef], got: dict[str, bytes], offset: int, size: int) -> bytes | memoryview:
    """Bytes ``[offset, offset+size)`` of a file from its chunks ``refs`` (their bytes in ``got``): a view of the
    one chunk (no copy) or the pieces joined."""
    end = offset + size
    parts: list[memoryview] = []
    for r in refs:
        data = got[_key(r)]
        lo = max(offset - r.file_offset, 0)
        hi = min(end - r.file_offset, r.size)
        if len(refs) == 1:
            return data if lo == 0 and hi == len(data) else memoryview(data)[lo:hi]
        parts.append(memoryview(data)[lo:hi])
    return b"".join(parts)

class LayerReader:
    """Verified reads of one layer (see module docstring)."""

    def __init__(self, fetcher: BlobFetcher, cache: ChunkCache, stargz: EStargz, *, digest: str,
                 metrics: LazyMetrics | None = None, readahead_bytes: int = DEFAULT_READAHEAD,
                 activity: ReadActivity | None = None) -> None:
        self.fetcher = fetcher
        self.cache = cache
        self.stargz = stargz
        self.digest = digest
        self._layer_key = cache_key(digest)
        #: the trio run reads happen in (read_ready starts readahead there), known from the first read on
        self._token: trio.lowlevel.TrioToken | None = None
        self.metrics = metrics or DEFAULT_METRICS
        self.activity = activity or ReadActivity()
        self._closed = False
        #: chunk key -> set when the task loading it is done (single-flight across reads, readahead, background)
        self._pending: dict[str, trio.Event] = {}
        #: every chunk (duplicates included) in blob order, and their blob offsets (for readahead); TocEntry
        #: objects of the TOC itself and an array of ints: a layer with 100,000 chunks adds about 1.6 MB
        self._seq: list[TocEntry] = sorted((c for cs in stargz.toc.chunks.values() for c in cs),
                                           key=lambda c: (c.offset, c.inner_offset))
        self._offsets = array("q", (c.offset for c in self._seq))
        #: compressed bytes of the chunks before each position of ``_seq`` (readahead windows by bisection)
        self._cum = array("q", [0])
        #: and their decoded bytes (what readahead from the disk cache puts into the memory tier)
        self._ucum = array("q", [0])
        for c in self._seq:
            self._cum.append(self._cum[-1] + c.next_offset - c.offset)
            self._ucum.append(self._ucum[-1] + c.chunk_size)
        #: path -> the file's chunks and their file offsets, for the last FILE_MEMO files read
        self._memo: OrderedDict[str, tuple[list[ChunkRef], list[int]]] = OrderedDict()
        self._decoders = trio.CapacityLimiter(DECODE_THREADS)
        self.readahead_bytes = max(0, readahead_bytes)
        self._ra_window = 0
        self._last_pos = -2
        self._last_name = ""
        self._ra_cross = False
        self._ra_until = -1  # highest position readahead has been started for
        self._ra_scopes: set[trio.CancelScope] = set()  # readahead tasks (close() cancels them)
        self._tasks = 0  # readahead and cache-write tasks running (settle() waits for them)
        self._idle = trio.Event()  # set whenever the last of them ends
        #: chunks read and verified whose cache write is still under way (reads take them from there)
        self.writes = ChunkWriteback(cache, digest, self._task_started, self._task_ended)
        #: background pass state: "idle", "running", "done", "failed", "off"
        self.background_state = "idle"

    def __repr__(self) -> str:
        return f"LayerReader({self.digest!r})"

    # ------------------------------------------------------------------ reads
    async def read(self, path: str, offset: int, size: int) -> bytes | memoryview:
        """Bytes ``[offset, offset+size)`` of regular file ``path`` (fewer at its end), verified. A read within
        one chunk is a view of the chunk's bytes (no copy; FUSE and ``os.pwrite`` take any buffer)."""
        if offset < 0 or size < 0:
            raise InvalidInputError(f"invalid read of {size} bytes at {offset} in {path!r}")
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        refs = self._chunks(path, offset, size)
        if not refs:
            return b""
        self._readahead(refs)
        if len(refs) == 1:  # most reads: a chunk verified recently, no task, no wait
            data = self._from_memory(refs, offset, size)
            if data is not None:
                return data
        self.activity.begin()
        try:
            got = await self._load(refs)
        finally:
            self.activity.end()
        return _assemble(refs, got, offset, size)

    def read_ready(self, path: str, offset: int, size: int) -> bytes | memoryview | None:
        """What :meth:`read` would answer when every chunk it needs is in memory already (verified), else None:
        no I/O, no waiting, callable from any thread (the FUSE thread answers such reads itself, without a trip
        through the trio loop); the readahead the read continues is started in the trio loop when it has chunks to
        fetch."""
        token = self._token
        if token is None or self._closed or offset < 0 or size < 0:
            return None
        try:
            refs = self._chunks(path, offset, size)
        except Exception:  # not a file (read() says so), or the memo changed under us: the slow path decides
            return None
        if not refs:
            return b""
        data = self._from_memory(refs, offset, size)
        if data is not None:
            todo = self._readahead_plan(refs)
            if todo:
                try:
                    token.run_sync_soon(self._start_readahead, todo)
                except trio.RunFinishedError:
                    return None
        return data

    def _from_memory(self, refs: list[ChunkRef], offset: int, size: int) -> bytes | memoryview | None:
        """The bytes of a read from chunks in the memory tier or on their way to the disk, or None."""
        got: dict[str, bytes] = {}
        for r in refs:
            k = _key(r)
            data = self._in_memory(k)
            if data is None:
                return None
            got[k] = data
        return _assemble(refs, got, offset, size)

    def _in_memory(self, key: str) -> bytes | None:
        """Chunk ``key`` from the memory tier (counted as a hit) or on its way to the disk cache, else None."""
        data = self.cache.get_hot(key, self._layer_key)
        return data if data is not None else self.writes.get(key)

    def _chunks(self, path: str, offset: int, size: int) -> list[ChunkRef]:
        """``EStargz.chunks_for(path, offset, size)``, from the chunk lists of the files read last."""
        memo = self._memo.get(path)
        if memo is None:
            own = self.stargz.toc.chunks.get(path)  # a regular file's TOC name (what the FUSE layer passes)
            # else: normalised, hardlinks resolved; InvalidInputError for what is not a regular file
            refs = [_ref(c) for c in own] if own is not None else self.stargz.chunks_for(path)
            memo = (refs, [r.file_offset for r in refs])
            self._memo[path] = memo
            if len(self._memo) > FILE_MEMO:
                self._memo.popitem(last=False)
        else:
            self._memo.move_to_end(path)
        refs, starts = memo
        if size == 0 or not refs:
            return []
        if len(refs) == 1:  # a small file: its one chunk
            return refs if refs[0].file_offset + refs[0].size > offset else []
        lo = max(bisect.bisect_right(starts, offset) - 1, 0)
        hi = bisect.bisect_left(starts, offset + size, lo)
        return [r for r in refs[lo:hi] if r.file_offset + r.size > offset]

    async def _load(self, refs: list[ChunkRef], hot: bool = True) -> dict[str, bytes]:
        """The verified bytes of each chunk, by key: from the cache, else fetched (and then cached). ``hot``:
        keep them in the cache's memory tier too (reads; not the background pass, which would flush it).
        A chunk another task is loading is waited for, not looked up or fetched again."""
        got: dict[str, bytes] = {}
        mine: list[ChunkRef] = []
        theirs: list[tuple[ChunkRef, trio.Event]] = []
        for k, r in {_key(r): r for r in refs}.items():
            data = self._in_memory(k)
            if data is not None:
                got[k] = data
            elif k in self._pending:
                theirs.append((r, self._pending[k]))
            else:
                mine.append(r)
        if mine:
            for r in mine:
                self._pending[_key(r)] = trio.Event()

            def done(k: str) -> None:  # waiters of this chunk go on as soon as it is decoded
                ev = self._pending.pop(k, None)
                if ev is not None:
                    ev.set()

            try:
                keys = [_key(r) for r in mine]
                absent = self.cache.absent(keys)  # counted as misses here; the others are read in a thread
                stored = [k for k in keys if k not in absent]
                found = await trio.to_thread.run_sync(self._from_disk, stored, hot) if stored else {}
                got.update(found)
                missing = [r for r in mine if _key(r) not in found]
                if missing:
                    got.update(await self._fetch(missing, hot, done if hot else None))
            finally:
                for r in mine:
                    done(_key(r))
        for r, ev in theirs:
            await ev.wait()
            got.update(await self._load([r], hot))  # now in the cache, or (that task failed) ours to fetch
        return got

    def _from_disk(self, keys: list[str], hot: bool) -> dict[str, bytes]:
        """Chunks of the disk cache that verify (a damaged one is discarded). In a worker thread."""
        out: dict[str, bytes] = {}
        for k, data in self.cache.get_many(keys, self._layer_key).items():
            if _sha(data) == k:
                out[k] = data
                if hot:
                    self.cache.put_hot(k, data)
            else:
                log.warning("chunk cache: chunk %s of layer %s is damaged on disk; fetching it again", k,
                            self.digest)
                self.cache.discard(k)
        return out

    # ------------------------------------------------------------------ readahead
    def _readahead(self, refs: list[ChunkRef]) -> None:
        """Start fetching ahead when this read continues the previous one in blob order (see module docstring)."""
        todo = self._readahead_plan(refs)
        if todo:
            self._start_readahead(todo)

    def _readahead_plan(self, refs: list[ChunkRef]) -> list[ChunkRef]:
        """What to fetch ahead after the read of ``refs``, the read sequence's state updated; no task started (the
        FUSE thread calls this for the reads it answers, and the trio loop starts the readahead only when there
        is something to fetch: most reads in order find it under way already)."""
        if not self.readahead_bytes or self._closed:
            return []
        first = bisect.bisect_left(self._offsets, refs[0].blob_offset)
        last = bisect.bisect_right(self._offsets, refs[-1].blob_offset) - 1
        prev_pos, prev_name = self._last_pos, self._last_name
        self._last_pos, self._last_name = last, refs[-1].entry.name
        if first not in (prev_pos, prev_pos + 1):
            self._ra_window = 0
            self._ra_cross = False
            self._ra_until = last
            return []
        if refs[0].entry.name != prev_name and refs[0].file_offset == 0:
            self._ra_cross = True  # went on to the file stored next: reading the layer in order
        grow = self._ra_window * 2 if self._ra_window else self.readahead_bytes // 8
        self._ra_window = min(self.readahead_bytes, max(grow, 1))
        start = last + 1  # the window counts from this read on: readahead never runs further ahead than it
        stop = min(bisect.bisect_left(self._cum, self._cum[start] + self._ra_window, start), len(self._seq))
        if not self._ra_cross:  # ahead within this file only, until reads move on to the next file in blob order
            own = self.stargz.toc.chunks.get(refs[-1].entry.name)
            if own:
                stop = min(stop, bisect.bisect_right(self._offsets, own[-1].offset))
        todo: list[ChunkRef] = []
        hot_cap = self._ucum[start] + self.cache.memory_bytes // 2  # ahead from the disk cache: half the memory tier
        i = i0 = max(start, self._ra_until + 1)
        if i0 > start and self._cum[i0] - self._cum[start] >= self._ra_window // 2:
            return []  # more than half the window is still on its way: top it up later, in one larger request
        keys = [_entry_key(self._seq[j]) for j in range(i0, stop)]
        for k, state in zip(keys, self.cache.states(keys), strict=True):
            if state < 2 and k not in self._pending:
                if state == 1 and self._ucum[i + 1] > hot_cap:
                    break  # would push the chunks about to be read out of the memory tier: a later read goes on
                todo.append(_ref(self._seq[i]))
            i += 1
        self._ra_until = max(self._ra_until, i - 1)
        return todo

    def _start_readahead(self, todo: list[ChunkRef]) -> None:
        if self._closed:
            return
        scope = trio.CancelScope()
        self._ra_scopes.add(scope)
        self._task_started()  # counted from now on, before the task first runs (see settle)
        trio.lowlevel.spawn_system_task(self._readahead_task, todo, scope)

    def _task_started(self) -> None:
        if self._tasks == 0:
            self._idle = trio.Event()
        self._tasks += 1

    def _task_ended(self) -> None:
        self._tasks -= 1
        if self._tasks == 0:
            self._idle.set()

    async def _readahead_task(self, refs: list[ChunkRef], scope: trio.CancelScope) -> None:
        # a system task: nothing may escape it (that would end the process's trio run), and close() cancels it
        with scope:
            try:
                await self._load(refs)
            except Exception as e:  # readahead is an optimisation: the read itself reports errors
                log.debug("readahead of layer %s: %s (the read itself will retry)", self.digest, e)
            finally:
                self._ra_scopes.discard(scope)
                self._task_ended()

    async def settle(self) -> None:
        """Wait until the readahead and cache-write tasks started so far have ended: their chunks are in the
        cache (or were dropped) and no worker thread of theirs still writes to it. ``close`` then ``settle``
        before the layer's chunks are released."""
        while self._tasks:
            if self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    async def _fetch(self, refs: list[ChunkRef], hot: bool, done: Callable[[str], None] | None = None
                     ) -> dict[str, bytes]:
        """Fetch, decode and verify ``refs`` (once more for chunks that do not verify), store them; ``done(key)``
        as each chunk is ready."""
        out: dict[str, bytes] = {}
        bad = await self._fetch_decode(refs, hot, out, done, last=False)
        if bad:
            log.warning("layer %s: %d chunk(s) did not verify; fetching them once more", self.digest, len(bad))
            await self._fetch_decode(bad, hot, out, done, last=True)
        return out

    async def _fetch_decode(self, refs: list[ChunkRef], hot: bool, out: dict[str, bytes],
                            done: Callable[[str], None] | None, *, last: bool) -> list[ChunkRef]:
        """Stream, decode and verify ``refs`` (``decoding.stream_decoded``); the chunks that did not verify."""
        if hot:
            await self.writes.room()  # a cache disk slower than the registry: fetch no faster than it writes

        packing: list[tuple[str, bytes]] = []  # small chunks of prefetch, background: stored in packs
        lock = threading.Lock()
        packed = [0]

        def in_thread(r: ChunkRef, plain: bytes) -> None:
            if hot:
                self.cache.put_hot(_key(r), plain)
                return
            # prefetch, background: on disk before the load returns (they are not kept in memory)
            if len(plain) > PACK_CHUNK_MAX:
                self.writes.store([(_key(r), plain)])
                return
            with lock:
                packing.append((_key(r), plain))
                packed[0] += len(plain)
                if packed[0] < PACK_MAX:
                    return
                items = packing[:]
                packing.clear()
                packed[0] = 0
            self.writes.store(items)

        def ready(chunks: list[tuple[ChunkRef, bytes]]) -> None:
            res = [(_key(r), plain) for r, plain in chunks]
            if hot:
                self.writes.later(res)  # the reads waiting for these chunks do not wait for the disk
            for k, plain in res:
                out[k] = plain
                if done is not None:
                    done(k)

        try:
            return await stream_decoded(self.fetcher, self.stargz, refs, self._decoders, in_thread=in_thread,
                                        ready=ready, last=last)
        finally:
            if packing:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.writes.store, packing)

    # ------------------------------------------------------------------ prefetch, background
    def prefetch_set(self, bound_bytes: int) -> list[ChunkRef]:
        """The chunks of the landmark set, in layer order, up to ``bound_bytes`` of compressed data."""
        out: list[ChunkRef] = []
        total = 0
        seen: set[str] = set()
        for name in self.stargz.prefetch:
            for c in self.stargz.toc.chunks.get(name, []):
                ref = ChunkRef(c, c.chunk_offset, c.chunk_size, c.offset, c.next_offset)
                n = ref.blob_end - ref.blob_offset
                if total + n > bound_bytes:
                    return out
                if _key(ref) not in seen:
                    seen.add(_key(ref))
                    out.append(ref)
                    total += n
        return out

    async def prefetch(self, bound_bytes: int) -> None:
        """Fetch the landmark set, stopping at ``bound_bytes`` of compressed data."""
        todo = [r for r in self.prefetch_set(bound_bytes) if not self.cache.contains(_key(r))]
        limit = trio.CapacityLimiter(PREFETCH_PARALLEL)
        errors: list[Exception] = []

        async def one(batch: list[ChunkRef]) -> None:
            async with limit:
                if errors:
                    return
                try:
                    await self._load(batch, hot=False)
                except (UnavailableError, IntegrityError) as e:  # raised below as is, not in an exception group
                    errors.append(e)

        async with trio.open_nursery() as n:  # two batches at a time: one downloads while the other decodes
            for batch in _batches(todo):
                n.start_soon(one, batch)
        self._update_gauge()
        if errors:
            raise errors[0]

    def start_background(self, nursery: trio.Nursery) -> None:
        """Fetch everything not yet cached in ``nursery``, at low priority (see module docstring)."""
        if self.background_state == "running":
            return
        self.background_state = "running"
        nursery.start_soon(self._background)

    async def _background(self) -> None:
        todo = [r for r in self._distinct() if not self.cache.contains(_key(r))]
        try:
            for batch in _batches(todo):
                while self.activity.waiting and not self._closed:
                    with trio.move_on_after(0.5):  # wake up now and then to notice close()
                        await self.activity.wait_idle()
                if self._closed:
                    self.background_state = "off"
                    return
                batch = [r for r in batch if not self.cache.contains(_key(r))]
                if batch:
                    await self._load(batch, hot=False)
                self._update_gauge()
                await trio.sleep(0)
        except (UnavailableError, IntegrityError) as e:
            self.background_state = "failed"
            log.warning("background fetch of layer %s stopped: %s (reads still fetch what they need)",
                        self.digest, e)
            return
        self.background_state = "done"
        if self.is_complete():
            self.fetcher.close()  # a spooled whole blob is not needed any more
        await trio.to_thread.run_sync(self.cache.settle)  # the last chunks' pages: writes may stop here for long
        log.info("background fetch of layer %s done: %.0f%% cached", self.digest, 100 * self.fetched_fraction())

    def _update_gauge(self) -> None:
        self.metrics.background_fraction.labels(layer=self.digest).set(self.fetched_fraction())

    # ------------------------------------------------------------------ state
    def _distinct(self) -> Iterator[ChunkRef]:
        """Every distinct chunk (by content digest), in blob order."""
        seen: set[str] = set()
        for c in self._seq:
            r = _ref(c)
            k = _key(r)
            if k not in seen:
                seen.add(k)
                yield r

    def fetched_fraction(self) -> float:
        """The part of the layer's chunk data (compressed bytes) fetched: in the cache or on its way there (a read
        returns before its chunks' cache write), 0.0 to 1.0."""
        have = total = 0
        for r in self._distinct():
            n = r.blob_end - r.blob_offset
            total += n
            k = _key(r)
            if k in self.writes or self.cache.contains(k):
                have += n
        return min(1.0, have / total) if total else 1.0

    def is_complete(self) -> bool:
        """Every chunk of the layer is in the cache."""
        return all(self.cache.contains(_key(r)) for r in self._distinct())

    @property
    def bytes_fetched(self) -> int:
        return self.fetcher.bytes_fetched

    def close(self) -> None:
        """Stop the background pass and drop the fetcher's spool file. Cached chunks stay (``cache.release_layer``
        frees them when the layer is released, not merely unmounted)."""
        self._closed = True
        for scope in list(self._ra_scopes):
            scope.cancel()
        self.fetcher.close()
        self.metrics.forget_layer(self.digest)


# ---------------------------------------------------------------------- opening
_TOC_HEADER = struct.Struct(">Q")


async def open_layer_reader(fetcher: BlobFetcher, cache: ChunkCache, *, digest: str, size: int, toc_digest: str,
                            metrics: LazyMetrics | None = None, activity: ReadActivity | None = None,
                            readahead_bytes: int = DEFAULT_READAHEAD) -> LayerReader:
    """Open layer ``digest`` (``size`` bytes): footer and TOC from the cache (stored under the TOC digest) or from
    the registry (one range read of the blob's last :data:`TAIL_READ` bytes; a second one only for a larger
    TOC), the TOC checked against ``toc_digest`` (the layer's
    ``containerd.io/snapshot/stargz/toc.digest`` annotation). IntegrityError when it does not match."""
    if size != fetcher.size or digest != fetcher.digest:
        raise InvalidInputError(f"layer {digest} ({size} bytes) opened with a fetcher for {fetcher.digest} "
                                f"({fetcher.size} bytes)")
    tkey = cache_key(toc_digest)

    def parse(tail: bytes, toc: bytes) -> EStargz:
        footer = parse_footer(tail, size, digest)
        return EStargz.from_parts(digest, size, footer, toc, toc_digest=toc_digest)

    def cached() -> EStargz | None:
        blob = cache.get(tkey, digest)
        if blob is None or len(blob) < _TOC_HEADER.size:
            return None
        (n,) = _TOC_HEADER.unpack_from(blob)
        try:
            return parse(blob[8:8 + n], blob[8 + n:])
        except (InvalidInputError, IntegrityError) as e:
            log.warning("cached TOC of layer %s is damaged (%s); fetching it again", digest, e)
            cache.discard(tkey)
            return None

    # a TOC not in the cache is known without a thread hop (the cache's index is in memory)
    es = None if cache.absent([tkey]) else await trio.to_thread.run_sync(cached)
    if es is None:
        tail_off = max(0, size - TAIL_READ)  # footer and (mostly) the whole TOC in one request
        (tail,) = await fetcher.fetch([(tail_off, size - tail_off)])
        footer = parse_footer(tail, size, digest)  # its last bytes only: microseconds, no thread hop
        if footer.toc_size > size - footer.toc_offset:
            raise InvalidInputError(f"{digest}: footer points outside the blob")
        if footer.toc_offset < tail_off:  # a TOC larger than the tail read: one more request for its start
            (head,) = await fetcher.fetch([(footer.toc_offset, tail_off - footer.toc_offset)])
            tail, tail_off = head + tail, footer.toc_offset
        toc = tail[footer.toc_offset - tail_off:footer.toc_offset - tail_off + footer.toc_size]
        tail = tail[-FOOTER_READ_SIZE:]
        # a small TOC is parsed in the event loop: in a worker thread it would hold the GIL all the same, and
        # cost two thread hops on the Prepare path
        es = parse(tail, toc) if len(toc) <= INLINE_TOC else await trio.to_thread.run_sync(parse, tail, toc)
        record = _TOC_HEADER.pack(len(tail)) + tail + toc
        await trio.to_thread.run_sync(cache.put, tkey, record, digest)
    return LayerReader(fetcher, cache, es, digest=digest, metrics=metrics, activity=activity,
                       readahead_bytes=readahead_bytes)
