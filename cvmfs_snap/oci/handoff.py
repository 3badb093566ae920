"""Range reads for trio code (the FUSE process) without blocking its event loop.

A FUSE handler must never wait on the network in the event loop thread: one slow range would stall every other
read of the mount. :class:`RangeHandoff` hands each read to a worker thread (``trio.to_thread.run_sync``) bounded by
a ``trio.CapacityLimiter``, and runs it on the ordinary :class:`~cvmfs_snap.oci.client.RegistryClient`, so the same
transport policy, auth flow, token cache, retry policy, deadlines and blob-URL cache apply. At most ``max_threads``
reads are in flight; more wait for a slot in the event loop (they do not block it).

This is the only module of :mod:`cvmfs_snap.oci` that imports trio; nothing else imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.oci.client import RegistryClient
from cvmfs_snap.oci.reference import ImageReference

DEFAULT_MAX_THREADS = 8


class RangeHandoff:
    """Async range reads on a bounded pool of threads (see module docstring)."""

    def __init__(self, client: RegistryClient, max_threads: int = DEFAULT_MAX_THREADS) -> None:
        if max_threads < 1:
            raise InvalidInputError(f"the range fetch thread limit must be at least 1, got {max_threads}")
        self.client = client
        self.limiter = trio.CapacityLimiter(max_threads)

    async def read_ranges(self, ref: ImageReference, digest: str, ranges: Sequence[tuple[int, int]], *,
                          whole_blob: bool = True) -> list[bytes]:
        """:meth:`RegistryClient.read_ranges` in a worker thread; errors are raised here as they are there."""
        return await trio.to_thread.run_sync(
            functools.partial(self.client.read_ranges, ref, digest, list(ranges), whole_blob=whole_blob),
            limiter=self.limiter)

    async def stream_range(self, ref: ImageReference, digest: str, pieces: Sequence[tuple[int, int]],
                           deliver: Callable[[int, bytes], None]) -> None:
        """:meth:`RegistryClient.stream_range` in a worker thread; ``deliver(i, data)`` runs in the event loop
        (queued without blocking the transfer, and all of them before this returns)."""
        token = trio.lowlevel.current_trio_token()

        def hand_over(i: int, data: bytes) -> None:
            token.run_sync_soon(deliver, i, data)  # FIFO, like the thread's own report of its end

        await trio.to_thread.run_sync(
            functools.partial(self.client.stream_range, ref, digest, list(pieces), hand_over), limiter=self.limiter)

    async def read_range(self, ref: ImageReference, digest: str, offset: int, length: int) -> bytes:
        return (await self.read_ranges(ref, digest, [(offset, length)]))[0]

    @property
    def in_flight(self) -> int:
        """Reads running in worker threads now."""
        return int(self.limiter.borrowed_tokens)
