"""The daemon's one work queue: images to publish, each at most once, never two workers on the same image.

Everything the daemon publishes goes through it: full passes over the recipe, registry webhooks and publish-on-miss
reports (see :mod:`publisher.daemon`). A request may carry a delay (webhooks wait ``daemon.debounce`` seconds so
that a burst of pushes is published once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from cvmfs_snap.oci.reference import ImageReference
from publisher import metrics

log = logging.getLogger(__name__)


@dataclass
class QueueItem:
    key: str
    ref: ImageReference
    source: str
    not_before: float = 0.0


class WorkQueue:
    """Images to publish, each at most once, never two workers on the same image.

    ``put`` of an image already waiting keeps one entry, due at the *latest* of the due times asked for: each push
    of a burst moves the publish back by ``debounce``, so the burst is published once, after it has been quiet.
    ``put`` of an image being published sets it to run once more after the current run, because the new request
    may describe a newer manifest than the one the running publish read.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: OrderedDict[str, QueueItem] = OrderedDict()
        self._running: set[str] = set()
        self._again: dict[str, QueueItem] = {}
        self._closed = False

    def request(self, ref: ImageReference, source: str, delay: float = 0.0) -> str:
        """Queue ``ref`` (keyed by its string form) due in ``delay`` seconds; returns what :meth:`put` returns."""
        key = str(ref)
        result = self.put(QueueItem(key, ref, source, time.monotonic() + delay))
        if result == "queued":
            log.info("queued %s (%s)", key, source)
        return result

    def put(self, item: QueueItem) -> str:
        """Queue an image; returns "queued", "already-queued", "after-current-run" or "closing"."""
        with self._cond:
            if self._closed:
                return "closing"
            if item.key in self._running:
                again = self._again.get(item.key)
                if again is not None:
                    again.not_before = max(again.not_before, item.not_before)
                else:
                    self._again[item.key] = item
                return "after-current-run"
            old = self._waiting.get(item.key)
            if old is not None:
                old.not_before = max(old.not_before, item.not_before)
                self._cond.notify_all()
                return "already-queued"
            self._waiting[item.key] = item
            self._update_gauge()
            self._cond.notify_all()
            return "queued"

    def get(self) -> QueueItem | None:
        """The next due image (blocking); None once the queue is closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                now = time.monotonic()
                due = next((it for it in self._waiting.values() if it.not_before <= now), None)
                if due is not None:
                    del self._waiting[due.key]
                    self._running.add(due.key)
                    self._update_gauge()
                    return due
                wait = min((it.not_before - now for it in self._waiting.values()), default=None)
                self._cond.wait(timeout=wait)

    def done(self, key: str) -> None:
        with self._cond:
            self._running.discard(key)
            again = self._again.pop(key, None)
            if again is not None and not self._closed:
                self._waiting.setdefault(key, again)
                self._update_gauge()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def contains(self, key: str) -> bool:
        with self._cond:
            return key in self._waiting or key in self._running

    def due(self, key: str) -> float | None:
        """When a waiting image becomes due (``time.monotonic()`` clock); None when it is not waiting."""
        with self._cond:
            item = self._waiting.get(key)
            return None if item is None else item.not_before

    def snapshot(self) -> dict[str, list[str]]:
        with self._cond:
            return {"waiting": list(self._waiting), "running": sorted(self._running)}

    def wait_idle(self, timeout: float) -> bool:
        """True when nothing is running within ``timeout`` seconds (used at shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=left)
            return True

    def _update_gauge(self) -> None:
        metrics.QUEUE_DEPTH.set(len(self._waiting))
