"""Process-wide memory settings of the node's long-running processes (the snapshotter daemon, the lazyfs process).

Both are Python processes whose resident memory is mostly interpreter and library state (bench/README.md, issue 9's
RSS goal); what the C allocator keeps after bursts of work in threads is the part set here.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

#: glibc's mallopt parameters
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def limit_malloc_arenas(n: int = 2, mmap_threshold: int | None = 256 << 10) -> None:
    """Keep the process's RSS down after bursts of work in threads (glibc): few malloc arenas (each worker thread --
    the lazyfs process's chunk decoders, the daemon's gRPC handlers -- would get one, up to 8 per core, and keep
    its freed memory), and a fixed mmap threshold, so chunk-sized buffers are mapped and unmapped instead of
    fragmenting the heap (glibc otherwise raises the threshold up to 32 MiB after the first such buffers are
    freed; ``None`` keeps glibc's dynamic threshold: a fixed one costs page faults for every big buffer, ~2 CPU s
    per GiB converted by ``cvmfs-snap convert``). Must run before threads start; the same as ``MALLOC_ARENA_MAX=2``
    in the environment."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc's (no ldconfig run to find it)
        libc.mallopt(_M_ARENA_MAX, n)
        if mmap_threshold is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    except (OSError, AttributeError) as e:  # not glibc
        log.debug("mallopt: %s", e)


def release_free_heap() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim(0)``, which also releases whole free
    pages inside the heap, not only at its top). After bursts of reads the heap is left with holes where decoded
    chunks were (objects of a few KB: below the mmap threshold); a process that then sits idle need not keep
    them resident. A few milliseconds for a heap of 100 MiB. False where there is no glibc."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
