"""The node-local chunk cache of lazy layers: bounded, LRU, shared by all layers, crash-safe.

Layout under ``directory`` (one lazyfs process owns it)::

    chunks/<2 hex>/<64 hex>   one decoded chunk, named by its sha256 (its eStargz ``chunkDigest``)
    packs/<name>.pack         small chunks stored together (``lazyfs/cachefiles.py``: one disk read for many)
    layers/<64 hex>.refs      the chunk keys a layer uses, one a line (append-only; ``lazyfs/refs.py``)
    tmp/                      chunks and packs being written (emptied at start)

- **Content-addressed**: a chunk is stored once whatever the number of layers (or files) holding it, so nothing
  is ever duplicated, also not by a crash: a chunk or pack file appears only by ``rename`` of a complete
  temporary file.
- **Size bound** (``max_bytes``, default 4 GiB) over everything the lazy path keeps on disk: the chunks, and the
  space :meth:`reserve` d for the other files (a whole blob spooled from a registry that ignores ``Range``, the
  node-local unpacked copy of a completely fetched layer). Past it, least recently used chunks are evicted; a
  reservation that cannot fit even then is refused (the caller goes without: no spool means EIO for that layer's
  reads, no unpacked copy means the layer stays on FUSE). A chunk larger than what the reservations leave is not
  stored at all.
- **References**: ``put(key, data, layer)`` and ``get(key, layer)`` record that ``layer`` uses ``key`` (the refs
  line is written *before* the chunk file, so a crash leaves at worst a line without a chunk, never a chunk no
  layer owns). ``release_layer`` deletes the chunks only that layer used.
- **Packs**: chunks of at most ``PACK_CHUNK_MAX`` bytes stored together (:meth:`put_many`, :meth:`get_many`)
  share one pack file, so the reads of many small files cost one disk I/O instead of one each. A pack is evicted
  (or discarded when one of its chunks does not verify) as a whole: its chunks were fetched together and are
  mostly read together. Its place in the LRU order is about that of its most recently used chunk (when eviction
  reaches a chunk of a pack used since, the pack's chunks all move to the recent end once: a second chance).
  A released chunk leaves its pack's index; the pack file goes with its last chunk (until then its bytes still
  count in the bound).
- **Restart**: the index (sizes, LRU order, references) is rebuilt from the directory; LRU order is then the
  chunk and pack files' modification order. Leftover temporary files, damaged packs and chunks no layer
  references are removed: no hand cleaning after a crash.
- **Page cache**: the kernel already caches the FUSE files' pages; the cache files' own pages are dropped after
  every read (``posix_fadvise(POSIX_FADV_DONTNEED)``). A written chunk's pages are still dirty when it is renamed
  into place (DONTNEED only starts their writeback), so they are dropped a second time about a second later, once
  clean; ``sync=True`` instead ``fdatasync`` s each chunk before dropping its pages (slower, and not needed for
  safety: a chunk torn by a power cut fails its digest check and is fetched again).

The cache does not verify content: the reader checks every chunk it gets against its digest (and
:meth:`discard` s a bad one), so a chunk damaged on disk costs a re-fetch, never wrong bytes.

- **Hot chunks** (``memory_bytes``, default 16 MiB for all layers together): the last chunks the reader verified
  are also kept in memory (:meth:`get_hot` / :meth:`put_hot`), so the 32 FUSE reads of 128 KiB that a 4 MiB chunk
  takes cost one disk read and one hash, not 32. Chunks not used for ``HOT_IDLE_SECONDS`` leave it
  (:meth:`trim_hot`, called by the lazyfs process now and then): an idle node does not keep 16 MiB of chunks
  that the kernel's page cache holds anyway (a background pass and an unpacked copy read whole layers through it).

Thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from cvmfs_snap.digests import SHA256_HEX
from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.lazyfs import cachefiles
from cvmfs_snap.lazyfs.hot import HotChunks
from cvmfs_snap.lazyfs.metrics import DEFAULT_METRICS, LazyMetrics
from cvmfs_snap.lazyfs.refs import LayerRefs

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 4 * 1024 ** 3
DEFAULT_MEMORY_BYTES = 16 * 1024 * 1024
#: hot chunks unused this long are dropped by :meth:`ChunkCache.trim_hot`
HOT_IDLE_SECONDS = 10.0
#: a written chunk's pages are dropped again this long after the write (its writeback is done by then)
SETTLE_SECONDS = 1.0


def cache_key(digest: str) -> str:
    """``sha256:<hex>`` or ``<hex>`` -> ``<hex>``; InvalidInputError for anything else."""
    hexpart = digest[len("sha256:"):] if digest.startswith("sha256:") else digest
    if not SHA256_HEX.fullmatch(hexpart):
        raise InvalidInputError(f"not a sha256 digest usable as a cache key: {digest[:80]!r}")
    return hexpart


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    bytes: int  # chunks
    entries: int
    reserved: int = 0  # spool files and unpacked copies (:meth:`ChunkCache.reserve`)


class ChunkCache:
    """See module docstring."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_CACHE_BYTES, *,
                 metrics: LazyMetrics | None = None, sync: bool = False,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if max_bytes <= 0:
            raise InvalidInputError(f"chunk cache size must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.metrics = metrics or DEFAULT_METRICS
        self.sync = sync
        #: (time written, path) of chunks whose pages may still be dirty: dropped again once clean
        self._settling: deque[tuple[float, Path]] = deque()
        self._lock = threading.Lock()
        #: key -> size (a chunk file) or place in a pack (< 0, :func:`cachefiles.slot_of`), least recently used first
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._refs = LayerRefs(self.directory / "layers")
        self._bytes = 0
        #: the packs by number (their chunks' values in ``_lru`` say which pack, where: :func:`cachefiles.slot_of`)
        self._packs: dict[int, cachefiles.Pack] = {}
        self._pack_seq = 0
        #: name -> bytes of the files counted in the bound that are not chunks (spool files, unpacked copies)
        self._reserved: dict[str, int] = {}
        self._reserved_bytes = 0
        self.memory_bytes = max(0, memory_bytes)
        self._hot = HotChunks(self.memory_bytes)
        self.hits = self.misses = self.evictions = 0
        self._tmp_seq = 0
        for sub in ("chunks", "packs", "layers", "tmp"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._load()

    # ------------------------------------------------------------------ start-up
    def _load(self) -> None:
        for e in os.scandir(self.directory / "tmp"):
            os.unlink(e.path)
        self._refs.load()
        found: list[tuple[float, str, int]] = []
        slots: dict[int, list[cachefiles.Slot]] = {}
        for e in os.scandir(self.directory / "packs"):
            num = self._load_pack(e.path, slots)
            if num is not None:
                found.append((os.stat(e.path).st_mtime, e.path, -num))
        for d in os.scandir(self.directory / "chunks"):
            if not d.is_dir(follow_symlinks=False):
                continue
            for e in os.scandir(d.path):
                key = e.name
                st = e.stat(follow_symlinks=False)
                if not SHA256_HEX.fullmatch(key) or key[:2] != d.name or key not in self._refs:
                    os.unlink(e.path)  # not ours, or no layer owns it (it was being released)
                    continue
                found.append((st.st_mtime, key, st.st_size))
        for _, key, size in sorted(found):
            if size >= 0:
                if key in self._lru:  # in a pack already (stored twice): the file goes
                    os.unlink(self._path(key))
                    continue
                self._lru[key] = size
                self._bytes += size
                continue
            pack = self._packs[-size]
            for k, off, n in slots[-size]:
                if k not in self._lru:  # else stored twice (a crash between two writes): the first one stays
                    self._lru[k] = cachefiles.packed_value(-size, off, n)
                    pack.keys.append(k)
                    pack.live += 1
            if pack.live:
                self._bytes += pack.size
            else:
                del self._packs[-size]
                os.unlink(pack.path)
        self._refs.keep_only(self._lru)
        with self._lock:
            self._evict_locked()
        self.metrics.cache_bytes.set(self._bytes)
        if found:
            log.info("chunk cache %s: %d chunks, %d bytes (bound %d)", self.directory, len(self._lru), self._bytes,
                     self.max_bytes)

    def _load_pack(self, path: str, slots: dict[int, list[cachefiles.Slot]]) -> int | None:
        """Number the pack at ``path`` and put its chunks that a layer references into ``slots`` (``_load``
        indexes them); None when it is not a pack of ours, damaged, or holds nothing referenced (deleted)."""
        index = cachefiles.load_index(Path(path))
        if index is None:
            return None
        size, found = index
        live = [(k, off, n) for k, off, n in found if k in self._refs]
        if not live or any(off >> cachefiles.OFF_BITS or n >> cachefiles.LEN_BITS for _, off, n in live):
            os.unlink(path)  # nothing referenced, or not written by this code (no such offsets or lengths)
            return None
        self._pack_seq += 1
        self._packs[self._pack_seq] = cachefiles.Pack(Path(path), size)
        slots[self._pack_seq] = live
        return self._pack_seq

    # ------------------------------------------------------------------ paths
    def _path(self, key: str) -> Path:
        return self.directory / "chunks" / key[:2] / key

    # ------------------------------------------------------------------ API
    def get_hot(self, key: str, layer: str | None = None) -> bytes | None:
        """A chunk verified recently (memory only; counted as a hit); ``layer`` as for :meth:`get`."""
        with self._lock:
            data = self._hot.get(key)
            if data is None:
                return None
            if key in self._lru:
                self._touch_locked(key)
                if layer is not None:
                    lay = self._refs.known(layer)  # a bare layer key already seen: no validation again
                    if lay is None or not self._refs.has(key, lay):
                        self._refs.add([key], cache_key(layer))
            self.hits += 1
        self.metrics.cache_hits.inc()
        return data

    def put_hot(self, key: str, data: bytes) -> None:
        """Keep ``data`` (verified by the caller against ``key``) in memory too."""
        with self._lock:
            self._hot.put(key, data)

    def states(self, keys: list[str]) -> list[int]:
        """For each of ``keys`` (bare hex): 0 not stored, 1 on disk, 2 in the memory tier too (one lock, no I/O)."""
        with self._lock:
            return [2 if k in self._hot else 1 if k in self._lru else 0 for k in keys]

    def trim_hot(self, idle: float = HOT_IDLE_SECONDS) -> int:
        """Drop the hot chunks not used for ``idle`` seconds; returns the bytes dropped."""
        with self._lock:
            return self._hot.trim(idle)

    @property
    def hot_bytes(self) -> int:
        with self._lock:
            return self._hot.bytes

    def contains(self, key: str) -> bool:
        with self._lock:
            return cache_key(key) in self._lru

    def absent(self, keys: list[str]) -> set[str]:
        """Those of ``keys`` not stored, each counted as a miss (no disk access: callable from an event loop)."""
        with self._lock:
            out = {k for k in keys if cache_key(k) not in self._lru}
            self.misses += len(out)
        if out:
            self.metrics.cache_misses.inc(len(out))
        return out

    def get(self, key: str, layer: str | None = None) -> bytes | None:
        """The chunk's bytes, or None (a miss). With ``layer``, that layer now references the chunk too."""
        key = cache_key(key)
        return self.get_many([key], layer).get(key)

    def get_many(self, keys: list[str], layer: str | None = None) -> dict[str, bytes]:
        """The bytes of those of ``keys`` (distinct) that are stored, by bare hex key (the others are misses);
        chunks of one pack are read together (see :func:`cachefiles.read_slots`). ``layer`` as for :meth:`get`."""
        ks = [cache_key(k) for k in keys]
        lay = cache_key(layer) if layer is not None else None
        loose: list[str] = []
        by_pack: dict[int, tuple[Path, list[cachefiles.Slot]]] = {}
        with self._lock:
            stored = [k for k in ks if k in self._lru]
            if lay is not None and stored:
                self._refs.add(stored, lay)
            for k in stored:
                self._touch_locked(k)
                v = self._lru[k]
                if v >= 0:
                    loose.append(k)
                else:
                    num, off, n = cachefiles.slot_of(v)
                    by_pack.setdefault(num, (self._packs[num].path, []))[1].append((k, off, n))
            settled = self._take_settled_locked(time.monotonic() - SETTLE_SECONDS) if self._settling else []
        cachefiles.drop_pages(settled)
        out: dict[str, bytes] = {}
        for k in loose:
            data = cachefiles.read_whole(self._path(k))
            if data is not None:
                out[k] = data
        for path, slots in by_pack.values():
            out.update(cachefiles.read_pack(path, slots))
        hits, misses = len(out), len(ks) - len(out)
        with self._lock:
            self.hits += hits
            self.misses += misses
        if hits:
            self.metrics.cache_hits.inc(hits)
        if misses:
            self.metrics.cache_misses.inc(misses)
        return out

    def put_many(self, items: list[tuple[str, bytes]], layer: str) -> None:
        """Store chunks (verified by the caller) for ``layer``: those of at most ``cachefiles.PACK_CHUNK_MAX`` bytes
        together in packs of up to ``cachefiles.PACK_MAX`` bytes, larger ones as :meth:`put` does."""
        lay = cache_key(layer)
        small: list[tuple[str, bytes]] = []
        for key, data in items:
            if len(data) > cachefiles.PACK_CHUNK_MAX:
                self.put(key, data, layer)
            else:
                small.append((cache_key(key), data))
        if not small:
            return
        with self._lock:
            self._refs.add([k for k, _ in small], lay)
            todo: dict[str, bytes] = {}
            for k, data in small:
                if k in self._lru:
                    self._touch_locked(k)
                else:
                    todo.setdefault(k, data)
        group: list[tuple[str, bytes]] = []
        size = 0
        for k, data in todo.items():
            if group and size + len(data) > cachefiles.PACK_MAX:
                self._write_pack(group, lay)
                group, size = [], 0
            group.append((k, data))
            size += len(data)
        if group:
            self._write_pack(group, lay)

    def _write_pack(self, items: list[tuple[str, bytes]], layer: str) -> None:
        pieces, slots = cachefiles.encode(items)
        size = sum(map(len, pieces))
        if len(items) == 1 or size > self.max_bytes - self._reserved_bytes:
            for k, data in items:  # a pack of one chunk is a chunk file; one too large for a tiny bound, chunks
                self.put(k, data, layer)
            return
        name = f"{time.time_ns():x}-{os.getpid()}-{self._next_tmp()}{cachefiles.SUFFIX}"
        tmp = self._write_tmp(name, pieces)
        path = self.directory / "packs" / name
        with self._lock:
            live = [(k, off, n) for k, off, n in slots if k not in self._lru and k in self._refs]
            if not live:  # raced with other puts, or released meanwhile
                os.unlink(tmp)
                return
            os.replace(tmp, path)
            self._pack_seq += 1
            self._packs[self._pack_seq] = cachefiles.Pack(path, size, [k for k, _, _ in live], len(live))
            for k, off, n in live:
                self._lru[k] = cachefiles.packed_value(self._pack_seq, off, n)
            settled = self._stored_locked(path, size)
        cachefiles.drop_pages(settled)

    def put(self, key: str, data: bytes, layer: str) -> None:
        """Store a chunk (already verified by the caller) for ``layer``; evicts LRU chunks past the bound."""
        key = cache_key(key)
        lay = cache_key(layer)
        if len(data) > self.max_bytes - self._reserved_bytes:
            return
        with self._lock:
            self._refs.add([key], lay)
            if key in self._lru:
                self._touch_locked(key)
                return
        tmp = self._write_tmp(f"{key}.{os.getpid()}.{self._next_tmp()}", [data])
        path = self._path(key)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        with self._lock:
            if key in self._lru or key not in self._refs:  # raced with another put, or released meanwhile
                os.unlink(tmp)
                return
            os.replace(tmp, path)
            self._lru[key] = len(data)
            settled = self._stored_locked(path, len(data))
        cachefiles.drop_pages(settled)

    def _stored_locked(self, path: Path, size: int) -> list[Path]:
        """A file of ``size`` bytes is in place at ``path``: counted, the bound kept; the files whose pages may be
        dropped now (their writes have settled)."""
        self._bytes += size
        self._evict_locked()
        self.metrics.cache_bytes.set(self._bytes)
        now = time.monotonic()
        if not self.sync:
            self._settling.append((now, path))
        return self._take_settled_locked(now - SETTLE_SECONDS)

    def _next_tmp(self) -> int:
        with self._lock:
            self._tmp_seq += 1
            return self._tmp_seq

    def _write_tmp(self, name: str, pieces: list[bytes]) -> Path:
        tmp = self.directory / "tmp" / name
        cachefiles.write_new(tmp, pieces, sync=self.sync)
        return tmp

    def reserve(self, name: str, nbytes: int, *, keep_layer: str | None = None, force: bool = False) -> bool:
        """Count ``nbytes`` of a file that is not a chunk (a spool file, an unpacked copy) in the bound under
        ``name``, evicting least recently used chunks to make room; the chunks ``keep_layer`` uses are not evicted
        for it. False (nothing changed) when it cannot fit; ``force`` counts it anyway (a file that exists already,
        found at start) and evicts what it can. Reserving a name again replaces its size."""
        nbytes = max(0, int(nbytes))
        keep = cache_key(keep_layer) if keep_layer is not None else None
        with self._lock:
            others = self._reserved_bytes - self._reserved.get(name, 0)
            kept = sum(cachefiles.value_size(v) for k, v in self._lru.items() if self._refs.has(k, keep)) if keep else 0
            if not force and others + nbytes + kept > self.max_bytes:
                return False
            self._reserved_bytes = others + nbytes
            self._reserved[name] = nbytes
            self._evict_locked(keep)
            self.metrics.cache_bytes.set(self._bytes)
        log.debug("cache bound: %d bytes reserved for %s (%d reserved, %d in chunks, bound %d)", nbytes, name,
                  self._reserved_bytes, self._bytes, self.max_bytes)
        return True

    def unreserve(self, name: str) -> None:
        """The file reserved under ``name`` is gone: its bytes no longer count."""
        with self._lock:
            self._reserved_bytes -= self._reserved.pop(name, 0)

    def reserved(self, name: str) -> int | None:
        with self._lock:
            return self._reserved.get(name)

    def settle(self) -> None:
        """Drop the pages of every chunk written so far (once their writeback is done; at shutdown, in tests)."""
        with self._lock:
            paths = self._take_settled_locked(float("inf"))
        cachefiles.drop_pages(paths, sync=True)

    def _take_settled_locked(self, before: float) -> list[Path]:
        out: list[Path] = []
        while self._settling and self._settling[0][0] <= before:
            out.append(self._settling.popleft()[1])
        return out

    def discard(self, key: str) -> None:
        """Forget a chunk (its bytes did not verify)."""
        key = cache_key(key)
        with self._lock:
            self._drop_locked(key)
            self.metrics.cache_bytes.set(self._bytes)

    def release_layer(self, layer: str) -> None:
        """``layer`` is gone: delete the chunks no other layer references, and its reference list."""
        lay = cache_key(layer)
        with self._lock:
            freed = 0
            for key in self._refs.release(lay):
                freed += cachefiles.value_size(self._lru.get(key, 0))
                self._forget_locked(key)
            self._refs.forget_layer(lay)
            self.metrics.cache_bytes.set(self._bytes)
        log.debug("chunk cache: released layer %s, freed %d bytes", lay, freed)

    def layer_keys(self, layer: str) -> set[str]:
        """The cached chunks ``layer`` references."""
        lay = cache_key(layer)
        with self._lock:
            return {k for k in self._refs if k in self._lru and self._refs.has(k, lay)}

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.hits, self.misses, self.evictions, self._bytes, len(self._lru),
                              self._reserved_bytes)

    # ------------------------------------------------------------------ internals
    def _pack_of(self, key: str) -> int | None:
        v = self._lru.get(key)
        return cachefiles.slot_of(v)[0] if v is not None and v < 0 else None

    def _live(self, num: int) -> list[str]:
        """The keys of pack ``num`` that are still its own."""
        return [k for k in self._packs[num].keys if self._pack_of(k) == num]

    def _drop_locked(self, key: str) -> None:
        """Delete a chunk (evicted, damaged): a packed one with its whole pack."""
        num = self._pack_of(key)
        if num is not None:
            for k in self._live(num):
                self._hot.drop(k)
                del self._lru[k]
            pack = self._packs.pop(num)
            self._bytes -= pack.size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pack.path)
            return
        self._hot.drop(key)
        size = self._lru.pop(key, None)
        if size is None:
            return
        self._bytes -= size
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def _forget_locked(self, key: str) -> None:
        """Delete a chunk no layer references: a packed one leaves its pack's index (the file goes with the
        pack's last chunk)."""
        num = self._pack_of(key)
        if num is None:
            self._drop_locked(key)
            return
        self._hot.drop(key)
        del self._lru[key]
        pack = self._packs[num]
        pack.live -= 1
        if not pack.live:
            del self._packs[num]
            self._bytes -= pack.size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pack.path)

    def _evict_locked(self, keep: str | None = None) -> None:
        """Evict LRU chunks until chunks + reservations fit the bound (the chunks ``keep`` uses last of all, and
        not at all when ``keep`` is given and the others suffice)."""
        room = self.max_bytes - self._reserved_bytes
        if self._bytes <= room:
            return
        if keep is not None:
            for key in [k for k in self._lru if not self._refs.has(k, keep)]:
                if self._bytes <= room:
                    return
                num = self._pack_of(key)
                if key not in self._lru or (num is not None and any(
                        self._refs.has(k, keep) for k in self._live(num))):
                    continue  # gone with its pack already, or its pack holds chunks of ``keep``
                self._evict_one_locked(key)
        while self._bytes > room and self._lru:
            key = next(iter(self._lru))
            num = self._pack_of(key)
            if num is not None and self._packs[num].used:  # a chunk of its pack was used since: the pack's
                self._packs[num].used = False  # chunks all move to the recent end (each pack once per use)
                for k in self._live(num):
                    self._lru.move_to_end(k)
                continue
            self._evict_one_locked(key)

    def _touch_locked(self, key: str) -> None:
        """``key`` (stored) was used: most recently used now, and its pack, if any, gets a second chance."""
        self._lru.move_to_end(key)
        num = self._pack_of(key)
        if num is not None:
            self._packs[num].used = True

    def _evict_one_locked(self, key: str) -> None:
        num = self._pack_of(key)
        n = self._packs[num].live if num is not None else 1
        self._drop_locked(key)
        self.evictions += n
        self.metrics.cache_evictions.inc(n)

