"""The gzip decoder with each inflater installed (ISA-L, zlib-ng, zlib): same bytes, same errors."""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterator

import pytest

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layer import gzipmember
from cvmfs_snap.layer.gzipmember import GzipStreamDecoder, decode_member, decode_member_prefix


def _gz(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


@pytest.fixture(params=list(gzipmember.BACKENDS))
def inflater(request: pytest.FixtureRequest) -> Iterator[str]:
    before = gzipmember.INFLATER
    gzipmember.use_inflater(request.param)
    try:
        yield request.param
    finally:
        gzipmember.use_inflater(before)


def test_the_fastest_installed_inflater_is_used() -> None:
    # isal comes with the node extra (installed here), zlib-ng with the core dependencies
    assert list(gzipmember.BACKENDS)[:2] == ["isal", "zlib-ng"] and gzipmember.BACKENDS.keys() >= {"zlib"}
    assert gzipmember.INFLATER == "isal"


def test_unknown_inflater_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="not installed"):
        gzipmember.use_inflater("brotli")


def test_members_decode_alike(inflater: str) -> None:
    text = b"".join(b"line %d of some text\n" % i for i in range(50_000))
    raw = os.urandom(300_000)
    a, b = _gz(text), _gz(raw)
    blob = b"xx" + a + b
    assert inflater == gzipmember.INFLATER
    out, end = decode_member(blob, start=2)
    assert out == text and end == 2 + len(a)
    out, end = decode_member(blob, start=end)
    assert out == raw and end == len(blob)
    assert decode_member_prefix(a + b, 1000) == text[:1000]
    assert decode_member_prefix(a, len(text)) == text
    got = GzipStreamDecoder(io.BytesIO(a + b), "t")
    parts = []
    while chunk := got.read(65536):
        assert len(chunk) <= 65536
        parts.append(chunk)
    assert b"".join(parts) == text + raw


def test_corrupt_and_short_members_raise_the_same_errors(inflater: str) -> None:
    text = b"abc" * 100_000
    a = bytearray(_gz(text))
    a[len(a) // 2: len(a) // 2 + 64] = b"\xff" * 64
    with pytest.raises(InvalidInputError, match="corrupt gzip member at blob offset 7"):
        decode_member(bytes(a), offset=7)
    with pytest.raises(InvalidInputError, match="truncated"):
        decode_member(_gz(text)[:-20])
    with pytest.raises(InvalidInputError, match="fewer than"):
        decode_member_prefix(_gz(b"short"), 100)
    with pytest.raises(InvalidInputError, match="decodes to more than 1000 bytes"):
        decode_member(_gz(text), max_output=1000)
    with pytest.raises(InvalidInputError, match="corrupt gzip data"):
        GzipStreamDecoder(io.BytesIO(bytes(a)), "t").read()
