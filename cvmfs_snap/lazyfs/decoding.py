"""Chunks of one lazy layer from the registry to verified bytes, decoded as they arrive (trio).

:func:`stream_decoded` is the pipeline behind every fetch of :class:`~cvmfs_snap.lazyfs.reader.LayerReader`: the
chunks' compressed ranges come through :meth:`BlobFetcher.stream` (one streamed range request per span), and each
chunk is decoded and checked against its ``chunkDigest`` (``EStargz.decode_chunk``) on a worker thread as soon as
its last byte has arrived, so decoding overlaps the transfer of the chunks after it. Inflating and hashing release
the GIL, so up to :data:`DECODE_THREADS` chunks decode at once; what arrived while the threads were busy is decoded
in groups of up to :data:`DECODE_GROUP` compressed bytes (one thread hop per group).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import IntegrityError
from cvmfs_snap.estargz import ChunkRef, EStargz
from cvmfs_snap.lazyfs.remote import BlobFetcher

#: chunks decoded at once, each on a worker thread
DECODE_THREADS = max(2, min(8, os.cpu_count() or 2))
#: chunks that arrived together are decoded in groups of up to this many compressed bytes
DECODE_GROUP = 1024 * 1024


async def stream_decoded(fetcher: BlobFetcher, stargz: EStargz, refs: list[ChunkRef], limiter: trio.CapacityLimiter,
                         *, in_thread: Callable[[ChunkRef, bytes], None],
                         ready: Callable[[list[tuple[ChunkRef, bytes]]], None], last: bool) -> list[ChunkRef]:
    """Fetch ``refs`` and decode, verify each as it arrives (on threads of ``limiter``). ``in_thread(ref, plain)``
    runs on the worker thread right after a chunk verified; ``ready(chunks)`` in the event loop once a group has.
    Returns the chunks that did not verify; with ``last``, IntegrityError (the first one) instead. Transfer errors
    (UnavailableError) are raised as the fetcher raises them; chunks that verified before were handed on."""
    bad: list[ChunkRef] = []
    errors: list[IntegrityError] = []

    def decode(group: list[tuple[ChunkRef, bytes]]) -> list[tuple[ChunkRef, bytes]]:
        res: list[tuple[ChunkRef, bytes]] = []
        for r, data in group:
            try:
                plain = stargz.decode_chunk(r, data)
            except IntegrityError as e:
                if last:
                    errors.append(e)
                else:
                    bad.append(r)
                continue
            in_thread(r, plain)
            res.append((r, plain))
        return res

    async def one(group: list[tuple[ChunkRef, bytes]]) -> None:
        res = await trio.to_thread.run_sync(decode, group, limiter=limiter)
        if res:
            ready(res)

    send, recv = trio.open_memory_channel(math.inf)

    def arrived(i: int, data: bytes) -> None:
        send.send_nowait((refs[i], data))

    async def transfer() -> None:
        async with send:  # closed when the transfer ends, however it ends: the loop below ends too
            await fetcher.stream([r.blob_range for r in refs], arrived)

    async with trio.open_nursery() as n:
        n.start_soon(transfer)
        group: list[tuple[ChunkRef, bytes]] = []
        size = 0
        async with recv:
            async for pair in recv:
                group.append(pair)
                size += len(pair[1])
                if size >= DECODE_GROUP or not recv.statistics().current_buffer_used:
                    n.start_soon(one, group)
                    group, size = [], 0
        if group:
            n.start_soon(one, group)
    if errors:
        raise errors[0]
    return bad
