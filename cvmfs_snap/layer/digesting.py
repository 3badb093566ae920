"""A reader that hashes every byte that passes through it.

The OCI diffID of a layer is the sha256 of its *uncompressed* tar, the layer digest the sha256 of the compressed
blob. Both are computed on the fly while the layer streams through, so that no layer is ever read twice or held in
memory to be hashed.

Each byte is hashed once. A stream that already knows the digest of what it yields says so with a ``diff_id``
attribute (``LayerStream``, ``HashingReader`` itself, pass-through wrappers that forward it); a
:class:`HashingReader` on top of such a stream counts bytes and forwards that digest instead of hashing again, and
``TarReader`` does the same. Every hash object comes from ``hash_factory``, so a test can count what
is hashed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol

from cvmfs_snap.errors import IntegrityError


class Readable(Protocol):
    """Anything with ``read(n) -> bytes`` (files, HTTP streams, our own decoders)."""

    def read(self, n: int = -1, /) -> bytes: ...


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


#: makes every sha256 of a layer stream (tests replace it to count the bytes hashed)
hash_factory: Callable[[], Hasher] = hashlib.sha256


class HashingReader:
    """Pass-through reader that keeps a sha256 and a byte count of what was read.

    ``digest`` is only meaningful once the underlying stream reported EOF (``eof`` is then True): a digest of a
    prefix would silently verify nothing. When ``stream`` has a ``diff_id`` of its own (it hashes what it yields
    already), nothing is hashed again: ``digest`` is that stream's ``diff_id``. ``hash=False``: count only.
    """

    def __init__(self, stream: Readable, hash: bool = True) -> None:
        self._stream = stream
        self._upstream = hash and hasattr(stream, "diff_id")
        self._hashing = hash and not self._upstream
        self._hash: Hasher | None = hash_factory() if self._hashing else None
        self.size = 0
        self.eof = False

    def read(self, n: int = -1, /) -> bytes:
        data = self._stream.read(n)
        if data:
            if self._hash is not None:
                self._hash.update(data)
            self.size += len(data)
        elif n != 0:
            self.eof = True
        return data

    def drain(self, chunk: int = 1 << 20) -> int:
        """Read to EOF (hashing), return how many bytes that took."""
        n = 0
        while True:
            data = self.read(chunk)
            if not data:
                return n
            n += len(data)

    @property
    def digest(self) -> str | None:
        """``sha256:<hex>`` of everything read, or None before EOF (or when not hashing)."""
        if not self.eof:
            return None
        if self._upstream:
            d = getattr(self._stream, "diff_id", None)
            return d if isinstance(d, str) else None
        return "sha256:" + self._hash.hexdigest() if self._hash is not None else None

    @property
    def diff_id(self) -> str | None:
        """The same as :attr:`digest`; lets a tar reader on top of this stream skip hashing it a second time."""
        return self.digest

    def verify(self, expected: str, what: str) -> None:
        """Raise IntegrityError unless the stream ended and its digest is ``expected``."""
        got = self.digest
        if got is None:
            raise IntegrityError(f"{what}: cannot verify {expected} before the stream is read to its end")
        if got != expected:
            raise IntegrityError(
                f"{what}: content has digest {got}, expected {expected}; the blob is corrupt or was tampered "
                "with: remove it from the cache/registry and publish again"
            )
