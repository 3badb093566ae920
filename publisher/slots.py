"""How many heavy units of work run at once, and which goes first.

A publisher with ``concurrency`` N unpacks up to N layers in worker processes and applies layers to flat trees in
its own threads. Left to the kernel, those share the cores evenly: with 2 cores, two layer workers and a flat
build each get two thirds of a core, and the flat, which can only apply layer k after layer k is published and is
therefore the last thing an image waits for, runs slowest exactly when it matters. So every unit of heavy work
(unpacking one layer, applying one layer to a flat) holds one of N :class:`WorkSlots` while it runs, and a waiting
flat application gets the next free slot before any waiting layer; layers get theirs in the order they were
submitted (the lower layers, which the flat needs first). A flat application waits for its layer *before* it asks
for a slot and a layer never waits for a flat, so holding a slot never waits for another holder.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: priority of a flat tree's application of one layer (lower goes first)
FLAT = 0
#: priority of unpacking one layer
LAYER = 1


class WorkSlots:
    """``n`` slots; :meth:`hold` waits for one, lowest ``(priority, order)`` first. Thread-safe."""

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self._free = self.n
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int, int]] = []
        self._tickets = itertools.count()
        #: most slots held at once, and holders so far (for tests and metrics)
        self.peak = 0
        self.granted = 0

    def ticket(self) -> int:
        """An order number: earlier tickets go first among equal priorities."""
        return next(self._tickets)

    @contextmanager
    def hold(self, priority: int, order: int | None = None) -> Iterator[None]:
        unique = self.ticket()
        key = (priority, unique if order is None else order, unique)
        with self._cond:
            heapq.heappush(self._waiting, key)
            try:
                while not (self._free and self._waiting[0] == key):
                    self._cond.wait()
            except BaseException:
                self._waiting.remove(key)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
                raise
            heapq.heappop(self._waiting)
            self._free -= 1
            self.granted += 1
            self.peak = max(self.peak, self.n - self._free)
            if self._free:
                self._cond.notify_all()  # the next waiter may go too
        try:
            yield
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()
