"""eStargz round trips: every corpus layer converts, reads back verified, unpacks as the original, and the output
does not depend on the number of workers."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
import threading
from pathlib import Path

import pytest

from cvmfs_snap.estargz import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    BuildOptions,
    build,
    open_bytes,
)
from cvmfs_snap.fsutil import remove_tree
from cvmfs_snap.layer import apply_layer, iter_layer, open_layer
from cvmfs_snap.mediatypes import OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD
from cvmfs_snap_devenv.images import compress, make_tar
from tests.support.estargz import corpus, to_estargz
from tests.support.trees import NON_DIRS, diff, listing, sparse_tar

CHUNK = 1 << 20
CORPUS = corpus()
ADDED = {TOC_TAR_NAME, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK}


def _files(tar: bytes) -> dict[str, bytes]:
    """Regular file contents by normalised path (later entries win), read by our own tar reader."""
    out: dict[str, bytes] = {}
    for e in iter_layer(io.BytesIO(tar), check_structure=False):
        if e.kind == "file":
            data = bytearray()
            while chunk := e.read():
                data += chunk
            out[e.path] = bytes(data)
            # a sparse member reads back its stored segments: expand them
            if e.sparse is not None:
                full = bytearray(e.size)
                pos = 0
                for off, n in e.sparse:
                    full[off : off + n] = data[pos : pos + n]
                    pos += n
                out[e.path] = bytes(full)
    return out


def _check_round_trip(tar: bytes, tmp: Path, **kw: object) -> bytes:
    blob, res = to_estargz(tar, chunk_size=CHUNK, **kw)
    # a plain tar.gz to everyone else: sha256 of the gunzipped stream is the diffID, sizes agree
    plain = gzip.decompress(blob)
    assert "sha256:" + hashlib.sha256(plain).hexdigest() == res.diff_id
    assert len(plain) == res.uncompressed_size
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == res.digest and len(blob) == res.size
    # the reader opens it with the TOC digest as annotation and every chunk verifies
    es = open_bytes(blob, toc_digest=res.toc_digest, keep_toc_json=True)
    es.verify_all(lambda o, n: blob[o : o + n])
    want = _files(tar)
    for path, data in want.items():
        ent = es.toc.lookup(path)
        assert ent is not None and ent.size == len(data), path
        assert es.read_file(lambda o, n: blob[o : o + n], path) == data, path
        if len(data) > CHUNK:
            assert len(es.toc.chunks[path]) == -(-len(data) // CHUNK), path
    # unpacked as a normal layer it is the original plus the TOC and landmark files
    a, b = tmp / "orig", tmp / "esgz"
    for d in (a, b):
        if d.exists():
            remove_tree(d)
        d.mkdir()
    apply_layer(io.BytesIO(tar), a)
    with open_layer(io.BytesIO(blob), OCI_LAYER_GZIP) as stream:
        apply_layer(stream, b)
    got = {k: v for k, v in listing(b, mtimes=NON_DIRS).items() if k not in ADDED}
    assert not diff(listing(a, mtimes=NON_DIRS), got)
    assert (b / TOC_TAR_NAME).read_bytes() == es.toc_json
    return blob


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_round_trip(case: str, tmp_path: Path) -> None:
    _check_round_trip(CORPUS[case], tmp_path)


@pytest.mark.parametrize("fmt", [["--format=gnu"], ["--format=posix", "--sparse-version=1.0"],
                                 ["--format=posix", "--sparse-version=0.0"]])
def test_sparse_files_become_regular_files(fmt: list[str], tmp_path: Path) -> None:
    blob = _check_round_trip(sparse_tar(tmp_path, fmt), tmp_path)
    es = open_bytes(blob)
    assert es.toc.lookup("sparse") is not None and es.toc.lookup("sparse").size == (5 << 20) + 4  # type: ignore


@pytest.mark.parametrize("codec,media", [("gzip", OCI_LAYER_GZIP), ("zstd", OCI_LAYER_ZSTD), ("plain", OCI_LAYER_TAR)])
def test_any_input_compression(codec: str, media: str) -> None:
    tar = CORPUS["big"]
    with open_layer(io.BytesIO(compress(tar, codec)), media) as stream:
        out = io.BytesIO()
        res = build(stream, out, BuildOptions(chunk_size=CHUNK))
    assert out.getvalue() == to_estargz(tar, chunk_size=CHUNK)[0]
    assert res.entries == 5  # 4 files + the landmark


def test_output_identical_whatever_the_worker_count() -> None:
    tar = make_tar([(f"f{i}", bytes([i]) * (i * 37_000)) for i in range(40)])
    blobs = {w: to_estargz(tar, chunk_size=100_000, workers=w)[0] for w in (1, 2, 3, 8)}
    assert len(set(blobs.values())) == 1


def test_prioritized_files_come_first_behind_the_landmark(tmp_path: Path) -> None:
    tar = make_tar(["a/", ("a/one", b"1"), "bin/", ("bin/tool", b"T"), ("z", b"zz"),
                    *[(f"a/f{i}", b"x") for i in range(3)]])
    blob, res = to_estargz(tar, prioritized=["z", "/a/f2", "missing/file"])
    assert res.missing_prioritized == ["missing/file"]
    es = open_bytes(blob, toc_digest=res.toc_digest)
    assert es.toc.has_prefetch_landmark and not es.toc.has_no_prefetch_landmark
    assert es.prefetch == ["z", "a", "a/f2"]
    assert es.toc.children("a") == ["f0", "f1", "f2", "one"] and es.toc.children("z") == []
    assert es.toc.children("") == [PREFETCH_LANDMARK, "a", "bin", "z"]
    with tarfile.open(fileobj=io.BytesIO(blob)) as out, tarfile.open(fileobj=io.BytesIO(tar)) as src:
        names = out.getnames()
        assert names[:4] == ["z", "a", "a/f2", PREFETCH_LANDMARK]
        assert sorted(names) == sorted([*src.getnames(), PREFETCH_LANDMARK, TOC_TAR_NAME])
    _check_round_trip(tar, tmp_path, prioritized=["z"])


def test_no_prioritized_files_gives_the_no_prefetch_landmark() -> None:
    blob, _ = to_estargz(CORPUS["big"])
    es = open_bytes(blob)
    assert es.toc.has_no_prefetch_landmark and not es.toc.has_prefetch_landmark and es.prefetch == []
    assert es.toc.entries[0].name == NO_PREFETCH_LANDMARK


def test_chunks_for_a_range_name_only_the_chunks_needed() -> None:
    blob, _ = to_estargz(CORPUS["big"], chunk_size=CHUNK)
    es = open_bytes(blob)
    refs = es.chunks_for("big", CHUNK - 10, 20)
    assert [r.file_offset for r in refs] == [0, CHUNK]
    for r in refs:
        off, n = r.blob_range
        assert 0 < off < es.footer.toc_offset and off + n <= es.footer.toc_offset
        assert len(es.decode_chunk(r, blob[off : off + n])) == r.size
    assert es.chunks_for("big", 2 * CHUNK + 5, 1)[0].file_offset == 2 * CHUNK
    assert es.chunks_for("big", 10**9, 1) == []


def test_compression_level_changes_size_not_content() -> None:
    tar = make_tar([("t", b"the quick brown fox " * 50_000)])
    fast, r1 = to_estargz(tar, compression_level=1)
    best, r9 = to_estargz(tar, compression_level=9)
    assert len(best) < len(fast)
    # offsets in the TOC differ (so do the TOC digest and diffID); the files do not
    assert r1.toc_digest != r9.toc_digest
    a, b = _files(gzip.decompress(fast)), _files(gzip.decompress(best))
    assert a.pop(TOC_TAR_NAME) != b.pop(TOC_TAR_NAME) and a == b


@pytest.mark.parametrize("case", ["big", "hardlinks", "xattrs", "empty"])
def test_zstd_chunked_round_trip(case: str) -> None:
    import zstandard

    tar = CORPUS[case]
    blob, res = to_estargz(tar, compression="zstd", compression_level=3, chunk_size=CHUNK)
    es = open_bytes(blob, toc_digest=res.toc_digest)
    assert es.footer.kind == "zstd" and blob[-8:] == b"GnUlInUx"
    read = lambda o, n: blob[o : o + n]  # noqa: E731
    es.verify_all(read)
    for path, data in _files(tar).items():
        assert es.read_file(read, path) == data
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    assert "sha256:" + hashlib.sha256(plain).hexdigest() == res.diff_id and len(plain) == res.uncompressed_size
    assert _files(plain).keys() == _files(tar).keys() | {NO_PREFETCH_LANDMARK}


def test_many_small_files_batched_on_the_pool_give_the_same_output() -> None:
    """Small files make units of a few hundred bytes; they go to the pool in batches, still one member each."""
    files = [(f"d{i % 7}/f{i}", bytes([i % 251]) * (i % 3000)) for i in range(3000)]
    tar = make_tar([f"d{k}/" for k in range(7)] + files + [("big", bytes(range(256)) * 9000)])
    blobs = {w: to_estargz(tar, chunk_size=200_000, workers=w)[0] for w in (1, 2, 4)}
    assert len(set(blobs.values())) == 1
    es = open_bytes(blobs[2])
    assert es.toc.lookup(f"d{2998 % 7}/f2998") is not None
    assert sum(1 for e in es.toc.entries if e.type == "reg") == 3000 + 2  # the files, "big" and the landmark


class _CountingSink:
    def __init__(self) -> None:
        self.writes = 0
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.writes += 1
        self.data += data
        return len(data)


def test_small_files_are_joined_hashed_and_landed_per_batch_not_per_file() -> None:
    """With a pool, a batch of small files costs one join, one diffID update and one write (a GIL round trip per
    file made a layer of many small files convert at 1.45x on two cores instead of ~1.9x)."""
    files = [(f"d/f{i}", random.Random(i).randbytes(i % 700 + 1)) for i in range(3000)]
    tar = make_tar(["d/", *files])
    sink = _CountingSink()
    res = build(io.BytesIO(tar), sink, BuildOptions(chunk_size=CHUNK, workers=2))
    assert bytes(sink.data) == to_estargz(tar, chunk_size=CHUNK, workers=1)[0]
    assert "sha256:" + hashlib.sha256(gzip.decompress(bytes(sink.data))).hexdigest() == res.diff_id
    assert sink.writes < 40  # 3000 members in a few batches, the TOC pieces, the footer


@pytest.mark.parametrize("level", range(10))
def test_one_call_compression_keeps_the_compressobj_bytes(level: int) -> None:
    from zlib_ng import zlib_ng

    from cvmfs_snap.estargz.emitter import compress_unit

    rnd = random.Random(level)
    for data in (b"", b"x", bytes(70_000), rnd.randbytes(5000), b"".join(rnd.choice([b"ab", b"cde", b"\n"])
                                                                          for _ in range(40_000))):
        c = zlib_ng.compressobj(level, zlib_ng.DEFLATED, 31)
        assert compress_unit(memoryview(data), level, [(0, len(data))], "gzip") == (
            c.compress(data) + c.flush(), ["sha256:" + hashlib.sha256(data).hexdigest()])


class _FailingSink:
    """A destination (an upload) that breaks after ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0

    def write(self, data: bytes) -> int:
        if self.size + len(data) > self.limit:
            raise OSError("the registry went away")
        self.size += len(data)
        return len(data)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_a_failing_destination_stops_the_build_and_its_threads(workers: int) -> None:
    tar = make_tar([(f"f{i}", random.Random(i).randbytes(128_000)) for i in range(60)])  # 7.7 MB, incompressible
    before = {t.ident for t in threading.enumerate()}
    sink = _FailingSink(1 << 20)
    with pytest.raises(OSError, match="the registry went away"):
        build(io.BytesIO(tar), sink, BuildOptions(chunk_size=100_000, workers=workers))
    assert sink.size <= 1 << 20
    assert {t.ident for t in threading.enumerate() if t.is_alive()} <= before  # pool and landing thread ended
