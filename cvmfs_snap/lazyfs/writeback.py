"""Verified chunks of one lazy layer on their way to the disk cache (trio).

A read that fetched chunks does not wait for their write to the
:class:`~cvmfs_snap.lazyfs.cache.ChunkCache`: :meth:`ChunkWriteback.later` keeps them here (reads are served from
:meth:`ChunkWriteback.get` meanwhile) and one writer task at a time writes every chunk waiting, in a worker thread,
so the small chunks that arrived while it wrote go into one pack together. At most :data:`UNWRITTEN_MAX` bytes
wait so: past that, :meth:`ChunkWriteback.room` makes fetches wait for the writes (a cache disk slower than the
registry slows reads down instead of filling memory). A write is never cancelled, not even by the end of the trio
run: the chunks reach the disk, or a failure is logged (the reads were served anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio  # type: ignore[import-untyped]

from cvmfs_snap.lazyfs.cache import ChunkCache

log = logging.getLogger(__name__)

#: decoded bytes of chunks waiting for their cache write above which fetches wait for the writes
UNWRITTEN_MAX = 64 * 1024 * 1024


class ChunkWriteback:
    """Chunks of layer ``digest`` waiting for their write to ``cache``. ``started()`` / ``ended()`` bracket the
    writer task (the reader's ``settle`` waits for it)."""

    def __init__(self, cache: ChunkCache, digest: str, started: Callable[[], None],
                 ended: Callable[[], None]) -> None:
        self.cache = cache
        self.digest = digest
        self._started, self._ended = started, ended
        self._pending: dict[str, bytes] = {}  # key -> bytes, until written
        self.pending_bytes = 0
        self.max_bytes = UNWRITTEN_MAX
        self._queue: list[tuple[str, bytes]] = []  # what the writer task takes next
        self._writing = False
        self._written = trio.Event()

    def get(self, key: str) -> bytes | None:
        return self._pending.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._pending

    def later(self, items: list[tuple[str, bytes]]) -> None:
        """Write ``items`` (key, verified bytes) in the writer task; served from here until then."""
        for k, plain in items:
            self._pending[k] = plain
        self.pending_bytes += sum(len(p) for _, p in items)
        self._queue.extend(items)
        if not self._writing:
            self._writing = True
            self._started()
            trio.lowlevel.spawn_system_task(self._task)

    async def room(self) -> None:
        """Wait while more than ``max_bytes`` of chunks wait for their write."""
        while self.pending_bytes > self.max_bytes:
            if self._written.is_set():
                self._written = trio.Event()
            await self._written.wait()

    def store(self, items: list[tuple[str, bytes]]) -> None:
        """Store ``items`` now (small ones packed together; in a worker thread); a cache that cannot take them is
        logged."""
        try:
            self.cache.put_many(items, self.digest)
        except OSError as e:  # disk full, cache dir gone: the reads were served anyway
            log.warning("chunk cache %s: cannot store %d chunk(s) of layer %s: %s", self.cache.directory,
                        len(items), self.digest, e)

    async def _task(self) -> None:
        try:
            while self._queue:
                items, self._queue = self._queue, []
                try:
                    with trio.CancelScope(shield=True):  # not even the end of the trio run: chunks reach the disk
                        await trio.to_thread.run_sync(self.store, items)
                except Exception as e:  # a system task: nothing may escape it
                    log.warning("chunk cache %s: cannot store chunks of layer %s: %s", self.cache.directory,
                                self.digest, e)
                finally:
                    for k, plain in items:
                        self._pending.pop(k, None)
                        self.pending_bytes -= len(plain)
                    self._written.set()
        finally:
            self._writing = False
            self._ended()
