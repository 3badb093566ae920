"""How many heavy units of work run at once, and which goes first.

A publisher with ``concurrency`` N unpacks up to N layers in worker processes and applies layers to flat trees in
its own threads. Left to the kernel, those share the cores evenly: with 2 cores, two layer workers and a flat
build each got two thirds of a core, and the flat, which can only apply layer k after layer k is published and is
therefore the last thing an image waits for, ran slowest exactly when it mattered. So every unit of heavy work
(unpacking one layer, applying one layer to a flat) holds one of N :class:`WorkSlots` while it runs:

- a flat that waits for layer k says so first (:meth:`WorkSlots.after`); the unit publishing layer k then hands its
  slot straight to that flat as it ends, before the layer's thread can take it for the next layer;
- otherwise a waiting flat application gets the next free slot before any waiting layer, and layers get theirs in
  the order they were submitted (the lower layers, which the flat needs first).

A flat waits for its layer *before* it holds a slot and a layer never waits for a flat, so no holder of a slot ever
waits for another holder.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
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
        #: key -> how many :meth:`after` callers wait for the unit of that key / slots handed to them, not taken yet
        self._wanted: Counter[str] = Counter()
        self._handed: Counter[str] = Counter()
        #: most slots held at once, and slots handed from a unit to a waiting :meth:`after` (for tests)
        self.peak = 0
        self.handovers = 0

    def ticket(self) -> int:
        """An order number: earlier tickets go first among equal priorities."""
        return next(self._tickets)

    @contextmanager
    def hold(self, priority: int, order: int | None = None, key: str | None = None) -> Iterator[None]:
        """Hold a slot; ``key`` names the unit (a layer digest) for :meth:`after`."""
        with self._cond:
            self._acquire(priority, order)
        try:
            yield
        finally:
            with self._cond:
                if key is not None and self._wanted[key] > self._handed[key]:
                    self._handed[key] += 1  # the slot stays taken: it is the waiting flat's now
                    self.handovers += 1
                else:
                    self._free += 1
                self._cond.notify_all()

    @contextmanager
    def after(self, key: str, ready: Callable[[], object], priority: int = FLAT) -> Iterator[None]:
        """Hold a slot for work that can start once ``ready()`` returns (it waits for the unit ``key``): the unit
        hands its slot over as it ends, else the slot is waited for with ``priority``. ``ready`` raising ends it
        holding nothing."""
        with self._cond:
            self._wanted[key] += 1
        try:
            ready()
        except BaseException:
            with self._cond:
                self._drop_wanted(key)
            raise
        with self._cond:
            self._wanted[key] -= 1
            if self._handed[key] > 0:
                self._handed[key] -= 1
                self._clean(key)
            else:
                self._clean(key)
                self._acquire(priority, None)
        try:
            yield
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()

    # -- under the lock -----------------------------------------------------------------------------------------
    def _acquire(self, priority: int, order: int | None) -> None:
        unique = self.ticket()
        key = (priority, unique if order is None else order, unique)
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
        self.peak = max(self.peak, self.n - self._free)
        if self._free:
            self._cond.notify_all()  # the next waiter may go too

    def _drop_wanted(self, key: str) -> None:
        self._wanted[key] -= 1
        if self._handed[key] > self._wanted[key]:  # a slot handed over that nobody will take now
            self._handed[key] -= 1
            self._free += 1
            self._cond.notify_all()
        self._clean(key)

    def _clean(self, key: str) -> None:
        if self._wanted[key] <= 0:
            del self._wanted[key]
        if self._handed[key] <= 0:
            del self._handed[key]
