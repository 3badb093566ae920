"""The memory tier of the lazy chunk cache: the chunks verified last, bounded in bytes, dropped when idle.

:class:`~cvmfs_snap.lazyfs.cache.ChunkCache` keeps one for all layers (``memory_bytes``) and calls it under its
lock (not thread-safe itself); see the cache's docstring for why it exists.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class HotChunks:
    """Chunk bytes by key, least recently used first, at most ``max_bytes`` of them."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._used: dict[str, float] = {}  # key -> monotonic time of its last use
        self.bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str) -> bytes | None:
        data = self._data.get(key)
        if data is not None:
            self._data.move_to_end(key)
            self._used[key] = time.monotonic()
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        self._used[key] = time.monotonic()
        if key in self._data:
            self._data.move_to_end(key)
            return
        self._data[key] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            old_key, old = self._data.popitem(last=False)
            self._used.pop(old_key, None)
            self.bytes -= len(old)

    def drop(self, key: str) -> None:
        old = self._data.pop(key, None)
        self._used.pop(key, None)
        if old is not None:
            self.bytes -= len(old)

    def trim(self, idle: float) -> int:
        """Drop the chunks not used for ``idle`` seconds; the bytes dropped."""
        before = time.monotonic() - idle
        dropped = 0
        while self._data:
            key = next(iter(self._data))
            if self._used.get(key, 0.0) > before:
                break  # the rest were used later (LRU order)
            dropped += len(self._data.pop(key))
            self._used.pop(key, None)
        self.bytes -= dropped
        return dropped
