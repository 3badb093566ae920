"""ReadAhead: a layer stream decoded on its own thread yields the same bytes and digests, raises the producer's errors
in the consumer, stays a bounded number of blocks ahead, and leaves no thread behind."""

from __future__ import annotations

import gzip
import hashlib
import io
import threading
import time

import pytest

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layer import open_layer
from cvmfs_snap.layer.readahead import ReadAhead
from cvmfs_snap.mediatypes import OCI_LAYER_GZIP


def _payload(n: int = 3 << 20) -> bytes:
    rnd = hashlib.sha256()
    out = bytearray()
    while len(out) < n:
        rnd.update(b"x")
        out += rnd.digest() * 7 + b"some text that compresses " * 3
    return bytes(out[:n])


class _CountingSource:
    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)
        self.reads = 0

    def read(self, n: int = -1, /) -> bytes:
        self.reads += 1
        return self._f.read(n)


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("readahead")}


@pytest.mark.parametrize("size", [1, 511, 4096, 1 << 20, 3 << 20])
def test_same_bytes_and_digests_as_the_stream_itself(size: int) -> None:
    data = _payload()
    blob = gzip.compress(data, 6)
    with open_layer(io.BytesIO(blob), OCI_LAYER_GZIP, name="l") as stream, \
            ReadAhead(stream, "l", block=300_000) as ahead:
        parts = []
        while piece := ahead.read(size):
            assert len(piece) <= size
            parts.append(piece)
        assert b"".join(parts) == data
        assert ahead.read(10) == b""
        # the stream hashed the tar on the producing thread; the wrapper forwards it (nothing hashed twice)
        assert ahead.diff_id == stream.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
        stream.verify_digest("sha256:" + hashlib.sha256(blob).hexdigest())
    assert not _threads()


def test_a_source_without_a_digest_is_hashed_on_the_producing_thread() -> None:
    data = _payload(1 << 20)
    with ReadAhead(io.BytesIO(data), "plain", block=1000) as ahead:
        assert ahead.diff_id is None
        assert ahead.drain() == len(data)
        assert ahead.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()


def test_the_producers_error_is_raised_by_the_consumer_and_again() -> None:
    blob = bytearray(gzip.compress(_payload(), 6))
    blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)  # corrupt in the middle
    with open_layer(io.BytesIO(bytes(blob)), OCI_LAYER_GZIP, name="layer sha256:bad") as stream, \
            ReadAhead(stream, "bad", block=65536) as ahead:
        got = 0
        with pytest.raises(InvalidInputError, match="layer sha256:bad: corrupt gzip data") as first:
            while piece := ahead.read(65536):
                got += len(piece)
        assert 0 < got < 3 << 20  # the good first part came through before the error
        with pytest.raises(InvalidInputError) as second:
            ahead.read(1)
        assert second.value is first.value
        assert ahead.diff_id is None
    assert not _threads()


def test_it_stays_a_bounded_number_of_blocks_ahead() -> None:
    src = _CountingSource(_payload(8 << 20))
    with ReadAhead(src, "bounded", block=4096, depth=3) as ahead:
        deadline = time.monotonic() + 30
        while not ahead._queue.full() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ahead._queue.full()
        time.sleep(0.1)
        assert src.reads <= 3 + 1  # the queue's blocks and the one waiting to be put
        assert ahead.read(4096)
    # leaving early stops the thread although most of the source was never read
    assert not _threads() and src.reads < 100
