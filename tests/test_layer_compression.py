"""open_layer: every layer media type, multi-member gzip / multi-frame zstd, digests, and bounded memory."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import os
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import pytest
import zstandard

from cvmfs_snap.errors import IntegrityError, InvalidInputError
from cvmfs_snap.layer import MEDIA_TYPES, apply_layer, iter_layer, open_layer
from cvmfs_snap.mediatypes import OCI_LAYER_ZSTD
from cvmfs_snap_devenv.images import make_tar

TAR = make_tar([("a", b"alpha" * 1000), "d/", ("d/b", os.urandom(70000)), ("d/c", b"")])


def _encode(tar: bytes, codec: str) -> bytes:
    if codec == "gzip":
        return gzip.compress(tar, mtime=0)
    if codec == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    return tar


def _digest(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("media_type", sorted(MEDIA_TYPES))
def test_every_media_type(media_type: str) -> None:
    blob = _encode(TAR, MEDIA_TYPES[media_type])
    with open_layer(io.BytesIO(blob), media_type) as s:
        assert s.diff_id is None  # not before EOF
        names = [e.path for e in iter_layer(s)]
        assert names == ["a", "d", "d/b", "d/c"]
        assert s.diff_id == _digest(TAR)
        assert s.digest == _digest(blob)
        s.verify_diff_id(_digest(TAR))
        s.verify_digest(_digest(blob))
        with pytest.raises(IntegrityError, match="expected sha256:00"):
            s.verify_diff_id("sha256:" + "0" * 64)


def test_multi_member_gzip_like_estargz(tmp_path: Path) -> None:
    # eStargz: one gzip member per file chunk plus a TOC member and a footer member
    cuts = [0, 700, 1536, 5000, 40000, len(TAR)]
    blob = b"".join(gzip.compress(TAR[a:b], mtime=0) for a, b in itertools.pairwise(cuts))
    blob += gzip.compress(b"", mtime=0)  # empty trailing member, like the eStargz footer
    with open_layer(io.BytesIO(blob), "application/vnd.oci.image.layer.v1.tar+gzip") as s:
        res = apply_layer(s, tmp_path)
    assert res.diff_id == _digest(TAR) and s.digest == _digest(blob)
    assert (tmp_path / "a").read_bytes() == b"alpha" * 1000


def test_multi_frame_zstd_and_skippable_frames(tmp_path: Path) -> None:
    c = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    blob = c.compress(TAR[:10000]) + skippable + c.compress(TAR[10000:])
    with open_layer(io.BytesIO(blob), "application/vnd.oci.image.layer.v1.tar+zstd") as s:
        res = apply_layer(s, tmp_path)
    assert res.diff_id == _digest(TAR)


def test_zstd_streaming_compressor_output(tmp_path: Path) -> None:
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(out, closefd=False) as w:
        for i in range(0, len(TAR), 4096):
            w.write(TAR[i : i + 4096])
    with open_layer(io.BytesIO(out.getvalue()), "application/vnd.oci.image.layer.v1.tar+zstd") as s:
        assert apply_layer(s, tmp_path).diff_id == _digest(TAR)


@pytest.mark.parametrize("blob", [b"", bytes(1024), bytes(10240)])
def test_empty_layers(blob: bytes, tmp_path: Path) -> None:
    with open_layer(io.BytesIO(blob), "application/vnd.oci.image.layer.v1.tar") as s:
        res = apply_layer(s, tmp_path)
    assert res.entries == 0 and res.diff_id == _digest(blob)
    assert list(tmp_path.iterdir()) == []


def test_v7_tar_without_magic_is_refused_as_not_a_tar() -> None:
    with pytest.raises(InvalidInputError, match="neither gzip, zstd nor tar"):
        open_layer(io.BytesIO(make_tar([("a", b"x")], fmt=tarfile.USTAR_FORMAT)[:257] + bytes(255)),
                   "application/vnd.oci.image.layer.v1.tar")


class _Generated:
    """A gzip'd tar of one big file, generated chunk by chunk: the layer never exists whole anywhere."""

    def __init__(self, size: int, chunk: int = 1 << 20) -> None:
        info = tarfile.TarInfo("big/blob")
        info.size = size
        self._parts = self._gen(info.tobuf(tarfile.PAX_FORMAT), size, chunk)
        self._z: zlib._Compress | None = zlib.compressobj(1, wbits=31)
        self._buf = b""

    @staticmethod
    def _gen(header: bytes, size: int, chunk: int):  # type: ignore[no-untyped-def]
        yield header
        block = bytearray(chunk)
        left = size
        i = 0
        while left:
            n = min(chunk, left)
            block[0:8] = i.to_bytes(8, "big")  # not all zeros: written densely
            yield bytes(block[:n])
            left -= n
            i += 1
        yield bytes(-size % 512) + bytes(1024)

    def read(self, n: int = -1) -> bytes:
        while len(self._buf) < max(n, 1):
            part = next(self._parts, None)
            if part is None:
                if self._z is not None:
                    self._buf += self._z.flush()
                    self._z = None
                break
            assert self._z is not None
            self._buf += self._z.compress(part)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def test_memory_stays_bounded_for_a_big_layer(tmp_path: Path) -> None:
    size = 192 << 20
    tracemalloc.start()
    try:
        with open_layer(_Generated(size), "application/vnd.oci.image.layer.v1.tar+gzip") as s:
            res = apply_layer(s, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.size == size and (tmp_path / "big/blob").stat().st_size == size
    assert peak < 24 << 20, f"peak Python memory {peak / 2**20:.1f} MiB for a {size >> 20} MiB layer"


def test_zstd_bomb_is_read_in_bounded_chunks(tmp_path: Path) -> None:
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        info = tarfile.TarInfo("zeros")
        info.size = 256 << 20

        class Zeros:
            def read(self, n: int) -> bytes:
                return bytes(n)

        tf.addfile(info, Zeros())  # type: ignore[arg-type]
    blob = zstandard.ZstdCompressor(level=19).compress(tar.getvalue())
    del tar
    assert len(blob) < 64 << 10
    tracemalloc.start()
    try:
        with open_layer(io.BytesIO(blob), "application/vnd.oci.image.layer.v1.tar+zstd") as s:
            res = apply_layer(s, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    st = (tmp_path / "zeros").stat()
    assert res.size == st.st_size == 256 << 20
    assert st.st_blocks * 512 < 1 << 20  # all-zero chunks become holes
    assert peak < 24 << 20


def test_diff_id_through_a_hashing_wrapper(tmp_path: Path) -> None:
    from cvmfs_snap.layer import HashingReader

    wrapped = HashingReader(io.BytesIO(TAR))
    res = apply_layer(wrapped, tmp_path)
    assert res.diff_id == wrapped.digest == _digest(TAR)


@pytest.mark.parametrize("window_log", [28, 30])
def test_zstd_window_beyond_the_limit_is_named_not_called_damaged(window_log: int) -> None:
    """Issue 7.17: a valid zstd blob that needs a larger window than accepted is refused as what it is."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log, enable_ldm=True,
                                                           write_content_size=False)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False) as w:
        w.write(TAR)
    with pytest.raises(InvalidInputError) as ei, \
            open_layer(io.BytesIO(out.getvalue()), "application/vnd.oci.image.layer.v1.tar+zstd") as s:
        s.drain()
    msg = str(ei.value)
    assert f"window of {1 << (window_log - 20)} MiB" in msg and "128 MiB" in msg and "not damaged" in msg
    assert "--long" in msg and "corrupt" not in msg


def test_zstd_window_at_the_limit_is_accepted() -> None:
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27, write_content_size=False)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False) as w:
        w.write(TAR)
    with open_layer(io.BytesIO(out.getvalue()), "application/vnd.oci.image.layer.v1.tar+zstd") as s:
        s.drain()
        assert s.diff_id == _digest(TAR)


# -- zstd frames through zstandard's decompressobj (eof / unused_data), issue 10 ------------------------------------


def _zstd_read(blob: bytes, n: int = 1 << 18) -> bytes:
    with open_layer(io.BytesIO(blob), OCI_LAYER_ZSTD) as s:
        parts = []
        while data := s.read(n):
            assert len(data) <= n
            parts.append(data)
        return b"".join(parts)


def test_zstd_many_small_frames_end_on_every_feed_boundary() -> None:
    """Frames of a few bytes each: frame ends fall inside, at the start and at the end of the pieces fed to libzstd,
    and of the compressed reads, so that ``unused_data`` hand-over is exercised everywhere."""
    c = zstandard.ZstdCompressor(write_checksum=True)
    cuts = [*range(0, len(TAR), 997), len(TAR)]
    blob = b"".join(c.compress(TAR[a:b]) for a, b in itertools.pairwise(cuts))
    assert blob.count(b"\x28\xb5\x2f\xfd") >= len(cuts) - 1
    for n in (1, 511, 512, 1 << 18):
        assert _zstd_read(blob, n) == TAR


def test_zstd_skippable_frames_between_last_and_empty() -> None:
    # (a blob starting with a skippable frame is refused by the magic check, as containerd's sniffing does)
    c = zstandard.ZstdCompressor()
    skip = (0x184D2A50).to_bytes(4, "little") + (300).to_bytes(4, "little") + os.urandom(300)
    empty_skip = (0x184D2A5F).to_bytes(4, "little") + bytes(4)
    blob = c.compress(TAR[:5000]) + skip + empty_skip + c.compress(b"") + c.compress(TAR[5000:]) + skip
    assert _zstd_read(blob) == TAR


@pytest.mark.parametrize("where", ["in the magic", "in the header", "in a block", "in the checksum",
                                   "in the second frame", "in a skippable frame"])
def test_truncated_zstd_is_refused_as_truncated(where: str) -> None:
    c = zstandard.ZstdCompressor(write_checksum=True)
    first, second = c.compress(TAR[:40000]), c.compress(TAR[40000:])
    skip = (0x184D2A53).to_bytes(4, "little") + (100).to_bytes(4, "little") + bytes(100)
    blob = {"in the magic": first + second[:2], "in the header": first + second[:5],
            "in a block": first[: len(first) // 2], "in the checksum": first[:-2],
            "in the second frame": first + second[:-100], "in a skippable frame": first + second + skip[:50]}[where]
    with pytest.raises(InvalidInputError, match="zstd stream is truncated") as ei:
        _zstd_read(blob)
    assert f"after {len(blob)} compressed bytes" in str(ei.value)


@pytest.mark.parametrize("tail", [b"garbage!", bytes(16)])
def test_bytes_after_the_last_zstd_frame_are_refused_as_corrupt(tail: bytes) -> None:
    blob = zstandard.ZstdCompressor().compress(TAR)
    with pytest.raises(InvalidInputError, match=f"corrupt zstd data near compressed offset {len(blob)}"):
        _zstd_read(blob + tail)


def test_damaged_zstd_block_is_refused_as_corrupt() -> None:
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(TAR))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(InvalidInputError, match="corrupt zstd data"):
        _zstd_read(bytes(blob))


def test_zstd_bomb_after_ordinary_data_stays_bounded() -> None:
    """The feed grows over ordinary data; the zeros that follow cannot make one call yield more than 64 MiB."""
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        head = tarfile.TarInfo("noise")
        noise = os.urandom(1 << 20)
        head.size = len(noise)
        tf.addfile(head, io.BytesIO(noise))
        info = tarfile.TarInfo("zeros")
        info.size = 512 << 20

        class Zeros:
            def read(self, n: int) -> bytes:
                return bytes(n)

        tf.addfile(info, Zeros())  # type: ignore[arg-type]
    size = len(tar.getvalue())
    blob = zstandard.ZstdCompressor(level=19).compress(tar.getvalue())
    del tar
    tracemalloc.start()
    try:
        with open_layer(io.BytesIO(blob), OCI_LAYER_ZSTD) as s:
            assert s.drain() == size
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 80 << 20, f"peak Python memory {peak / 2**20:.1f} MiB"
