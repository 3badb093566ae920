"""Keeping the unused halves of libraries out of a command's process, for its start-up time and resident memory.

httpcore imports trio and anyio for its async half (a conditional import, httpcore PR #692) and h2 for HTTP/2 (off
in our clients); httpx imports its own command line (click, rich, pygments) and the brotli content decoders (blobs
are fetched as identity). A ``None`` entry in ``sys.modules`` makes ``import X`` raise ImportError, the case both
libraries handle (as when the package is not installed). Only for a process that *is* the command (``main()``
called without argv), never inside a process that may use them. Each CLI says which command keeps what out.
"""

from __future__ import annotations

import sys

#: what a thread-based HTTP/1.1 client of httpx never uses (add ``zstandard`` where no zstd layer is decoded)
UNUSED_BY_HTTP_CLIENTS = ("trio", "anyio", "httpx._main", "h2", "brotli", "brotlicffi")


def skip_unused_imports(names: tuple[str, ...]) -> None:
    for name in names:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
