"""Read a stream on a background thread, a bounded number of blocks ahead of its consumer.

A layer stream costs CPU to produce (download, sha256 of the blob, inflate, sha256 of the tar), and its consumer
(the eStargz writer's tar parsing) costs CPU too; both run in C for the most part, releasing the GIL. Producing on
its own thread lets the two overlap on two cores instead of taking turns on one. Memory stays bounded: at most
``depth`` blocks wait in the queue.

Errors raised while producing (a corrupt blob, a limit, a failed download) are raised again by the consumer's next
``read``, as if it had read the stream itself. Use it as a context manager: leaving the block stops the thread (and
waits for it) whatever happened, so nobody touches the source stream after its owner closed it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from types import TracebackType

from cvmfs_snap.layer.digesting import HashingReader, Readable

log = logging.getLogger(__name__)

BLOCK = 1 << 20
DEPTH = 8


class ReadAhead:
    """``read(n)`` over ``src``, which a thread reads ``block`` bytes at a time, at most ``depth`` blocks ahead.

    Like :class:`HashingReader`, it has a ``diff_id`` (the sha256 of what it yields, once read to EOF): ``src``'s
    own when it has one (a ``LayerStream``: nothing is hashed twice), else computed on the producing thread.
    """

    def __init__(self, src: Readable, name: str = "stream", block: int = BLOCK, depth: int = DEPTH) -> None:
        self._src = HashingReader(src)
        self._block = block
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._produce, name=f"readahead {name}"[:60], daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._src.read(self._block)
                if not self._put(data) or not data:
                    return
        except BaseException as e:  # handed to the consumer, raised by its next read
            self._put(e)

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            parts = []
            while data := self.read(self._block):
                parts.append(data)
            return b"".join(parts)
        if n == 0:
            return b""
        if self._pos >= len(self._buf):
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._error = item
                raise item
            if not item:
                self._eof = True
                self._thread.join()
                return b""
            self._buf, self._pos = item, 0
        if self._pos == 0 and n >= len(self._buf):
            data, self._buf = self._buf, b""
            return data
        data = self._buf[self._pos : self._pos + n]
        self._pos += len(data)
        return data

    def drain(self) -> int:
        """Read and discard the rest; afterwards the producing thread has ended."""
        n = 0
        while data := self.read(self._block):
            n += len(data)
        return n

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def diff_id(self) -> str | None:
        """``sha256:<hex>`` of everything yielded, None before EOF."""
        return self._src.diff_id if self._eof and not self._thread.is_alive() else None

    def close(self) -> None:
        """Stop the producing thread and wait for it (it finishes the ``read`` it is in)."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.2)
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
