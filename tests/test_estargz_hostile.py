"""Hostile eStargz blobs: bad footers, lying TOCs and chunks, bombs. Each is refused with a clear error before any
byte of a file is returned."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import struct
import tarfile
from collections.abc import Callable
from typing import Any

import pytest

from cvmfs_snap.errors import IntegrityError, InvalidInputError, UnsafeLayerError
from cvmfs_snap.estargz import EStargz, gzip_footer, open_bytes, parse_footer, zstd_footer
from cvmfs_snap.layer import Limits
from cvmfs_snap_devenv.images import make_tar
from tests.support.estargz import to_estargz

TAR = make_tar(["d/", ("d/a", b"A" * 5000), ("d/b", b"B" * 300), ("c", b"C" * 2500), "e/"])
BLOB, RES = to_estargz(TAR, chunk_size=2000)
DOC: dict[str, Any] = json.loads(open_bytes(BLOB, keep_toc_json=True).toc_json or b"")


def _toc_member(body: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("stargz.index.json")
        ti.size = len(body)
        tf.addfile(ti, io.BytesIO(body))
    return gzip.compress(buf.getvalue(), mtime=0)


def with_toc(mutate: Callable[[dict[str, Any]], None], blob: bytes = BLOB) -> tuple[bytes, str]:
    """The blob with its TOC changed by ``mutate`` (payload kept), and the new TOC's digest."""
    es = open_bytes(blob, keep_toc_json=True)
    doc = copy.deepcopy(json.loads(es.toc_json or b""))
    mutate(doc)
    body = json.dumps(doc).encode()
    payload = blob[: es.footer.toc_offset]
    return payload + _toc_member(body) + gzip_footer(len(payload)), "sha256:" + hashlib.sha256(body).hexdigest()


def entry(doc: dict[str, Any], name: str, typ: str | None = None, nth: int = 0) -> dict[str, Any]:
    found = [e for e in doc["entries"] if e["name"] == name and (typ is None or e["type"] == typ)]
    return found[nth]  # type: ignore[no-any-return]


def refuse(blob: bytes, exc: type[Exception], match: str, **kw: Any) -> None:
    with pytest.raises(exc, match=match):
        es = open_bytes(blob, **kw)
        es.verify_all(lambda o, n: blob[o : o + n])


def test_unchanged_blob_opens() -> None:
    blob, digest = with_toc(lambda d: None)
    assert open_bytes(blob, toc_digest=digest).verify_all(lambda o, n: blob[o : o + n]) == 7801


def test_offset_outside_the_blob() -> None:
    def m(d: dict[str, Any]) -> None:
        entry(d, "c")["offset"] = len(BLOB) * 4
    refuse(with_toc(m)[0], InvalidInputError, r"TOC entry \d+ \('c'\): chunk offset \d+ is outside the blob")


def test_offset_zero_for_data() -> None:
    def m(d: dict[str, Any]) -> None:
        entry(d, "c")["offset"] = 0
    refuse(with_toc(m)[0], InvalidInputError, "outside the blob")


def test_overlapping_chunks() -> None:
    def m(d: dict[str, Any]) -> None:
        entry(d, "d/b")["offset"] = entry(d, "d/a")["offset"]
    refuse(with_toc(m)[0], InvalidInputError, r"'d/b'.*overlaps or precedes the previous chunk")


def test_chunk_gap_and_short_coverage() -> None:
    def gap(d: dict[str, Any]) -> None:
        entry(d, "d/a", "chunk")["chunkOffset"] = 2500
    refuse(with_toc(gap)[0], InvalidInputError, "leaves a gap or overlaps")

    def short(d: dict[str, Any]) -> None:
        entry(d, "d/a", "reg")["size"] = 9000
        entry(d, "d/a", "chunk", 1)["chunkSize"] = 1000
    refuse(with_toc(short)[0], InvalidInputError, "cover 5000 bytes, but its size is 9000")

    def longer(d: dict[str, Any]) -> None:  # the last chunk is "the rest": the bytes are not there
        entry(d, "d/a", "reg")["size"] = 9000
    refuse(with_toc(longer)[0], IntegrityError, r"entry 'd/a', chunk at file offset 4000 .*fewer than")


def test_orphan_chunk() -> None:
    def m(d: dict[str, Any]) -> None:
        entry(d, "d/a", "chunk")["name"] = "c"
    refuse(with_toc(m)[0], InvalidInputError, "does not follow the regular file")


def test_chunk_digest_that_lies_is_an_integrity_error_naming_entry_and_offset() -> None:
    def m(d: dict[str, Any]) -> None:
        entry(d, "d/a", "chunk")["chunkDigest"] = "sha256:" + "0" * 64
    blob, digest = with_toc(m)
    es = open_bytes(blob, toc_digest=digest)  # the TOC itself is consistent
    read = lambda o, n: blob[o : o + n]  # noqa: E731
    assert es.read_file(read, "d/a", 0, 2000) == b"A" * 2000  # the first chunk is fine
    with pytest.raises(IntegrityError, match=r"layer: entry 'd/a', chunk at file offset 2000 \(blob offset \d+\)"):
        es.read_file(read, "d/a", 1999, 2)


def test_corrupted_chunk_bytes_are_an_integrity_error() -> None:
    es = open_bytes(BLOB)
    ref = es.chunks_for("c")[0]
    off, n = ref.blob_range
    bad = bytearray(BLOB[off : off + n])
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(IntegrityError, match="entry 'c'"):
        es.decode_chunk(ref, bytes(bad))


def test_toc_digest_that_does_not_match_the_annotation() -> None:
    refuse(BLOB, IntegrityError, "TOC digest is sha256:.*annotation says sha256:1111", toc_digest="sha256:" + "1" * 64)


def test_toc_naming_dotdot_is_refused() -> None:
    def m(d: dict[str, Any]) -> None:
        entry(d, "c")["name"] = "../x"
    refuse(with_toc(m)[0], UnsafeLayerError, r"TOC entry \d+ \('../x'\).*'\.\.' component")


def test_hardlink_to_nothing_and_to_a_dir() -> None:
    def m(d: dict[str, Any]) -> None:
        d["entries"].append({"name": "h", "type": "hardlink", "linkName": "nope"})
    refuse(with_toc(m)[0], InvalidInputError, "hardlink target 'nope' is not in the TOC")

    def m2(d: dict[str, Any]) -> None:
        d["entries"].append({"name": "h", "type": "hardlink", "linkName": "d"})
    refuse(with_toc(m2)[0], UnsafeLayerError, "is a directory")


def test_entry_below_a_file() -> None:
    def m(d: dict[str, Any]) -> None:
        d["entries"].append({"name": "c/inside", "type": "symlink", "linkName": "x"})
    refuse(with_toc(m)[0], UnsafeLayerError, "lies below 'c', which is a reg")


def test_unknown_type_bad_fields_and_forbidden_xattr() -> None:
    def m(d: dict[str, Any]) -> None:
        entry(d, "e")["type"] = "socket"
    refuse(with_toc(m)[0], InvalidInputError, "unknown type 'socket'")

    def m2(d: dict[str, Any]) -> None:
        entry(d, "e")["mode"] = "0755"
    refuse(with_toc(m2)[0], InvalidInputError, "'mode' is '0755', not an integer")

    def m3(d: dict[str, Any]) -> None:
        entry(d, "e")["xattrs"] = {"trusted.overlay.opaque": "eQ=="}
    refuse(with_toc(m3)[0], UnsafeLayerError, "overlayfs semantics")

    def m4(d: dict[str, Any]) -> None:
        e = entry(d, "d/a", "chunk")
        e["chunkDigest"] = e["chunkDigest"] + "\n"  # "$" in a regex match would take it
    refuse(with_toc(m4)[0], InvalidInputError, "is not a sha256 digest")


def test_one_gib_toc_claim_in_a_one_kib_blob() -> None:
    # gzip: the TOC tar header claims 1 GiB
    hdr = tarfile.TarInfo("stargz.index.json")
    hdr.size = 1 << 30
    member = gzip.compress(hdr.tobuf(tarfile.USTAR_FORMAT) + b"{}", mtime=0)
    blob = b"\0" * 700 + member + gzip_footer(700)
    refuse(blob, InvalidInputError, "claims 1073741824 bytes")
    # zstd: the footer claims a 1 GiB TOC
    blob = b"\0" * 900 + zstd_footer(100, 1 << 30, 1 << 30)
    refuse(blob, InvalidInputError, "outside the 948-byte blob")
    blob = b"\0" * 900 + zstd_footer(100, 500, 1 << 30)
    refuse(blob, InvalidInputError, "claims a TOC of 1073741824 bytes")


def test_toc_bomb_is_refused_without_inflating_it() -> None:
    body = b" " * (64 << 20)  # compresses to ~64 KiB
    blob = b"\0" * 10 + _toc_member(body) + gzip_footer(10)
    with pytest.raises(InvalidInputError, match="decodes to more than"):
        EStargz.open(lambda o, n: blob[o : o + n], len(blob), max_toc_size=1 << 20)


def test_entry_count_limit() -> None:
    blob, _ = with_toc(lambda d: d["entries"].extend({"name": f"x{i}", "type": "dir"} for i in range(50)))
    refuse(blob, UnsafeLayerError, "more than Limits.max_entries", limits=Limits(max_entries=20))


@pytest.mark.parametrize("blob,match", [
    (b"", "no eStargz footer"),
    (b"x" * 100, "no eStargz footer"),
    (gzip.compress(b"not estargz" * 100), "no eStargz footer"),
    (b"\0" * 10 + gzip_footer(5000), "outside the"),
    (b"\0" * 10 + gzip_footer(0), "outside the"),
    (BLOB[:-1], "no eStargz footer"),
    (BLOB[:-51] + gzip_footer(len(BLOB) - 100), "gzip member|TOC"),
])
def test_bad_footers(blob: bytes, match: str) -> None:
    refuse(blob, InvalidInputError, match)


def test_malformed_footer_offset() -> None:
    f = bytearray(gzip_footer(0x1234))
    f[16:32] = b"zzzzzzzzzzzzzzzz"
    with pytest.raises(InvalidInputError, match="malformed TOC offset"):
        parse_footer(b"\0" * 100 + bytes(f), 151)


def test_legacy_footer_is_read() -> None:
    es = open_bytes(BLOB)
    sub = b"%016xSTARGZ" % es.footer.toc_offset
    legacy = (b"\x1f\x8b\x08\x04\0\0\0\0\0\xff" + struct.pack("<H", len(sub)) + sub + b"\x01\x00\x00\xff\xff"
              + struct.pack("<II", 0, 0))
    assert len(legacy) == 47
    blob = BLOB[:-51] + legacy
    es2 = open_bytes(blob, toc_digest=RES.toc_digest)
    assert es2.footer.kind == "legacy" and es2.verify_all(lambda o, n: blob[o : o + n]) == 7801


def test_hostile_layer_tars_are_refused_by_the_writer_like_the_tar_reader() -> None:
    from pathlib import Path

    from cvmfs_snap.errors import CvmfsSnapError
    from cvmfs_snap.estargz import BuildOptions, build
    from cvmfs_snap.layer import iter_layer, open_layer
    from tests.support.hostile import build_corpus

    refused = 0
    for case in build_corpus(Path("/nonexistent")):
        try:
            with open_layer(io.BytesIO(case.blob), case.media_type) as s:
                for e in iter_layer(s, case.limits, check_structure=False):
                    while e.read():
                        pass
        except CvmfsSnapError as want:
            refused += 1
            with pytest.raises(type(want)) as got, open_layer(io.BytesIO(case.blob), case.media_type) as s:
                build(s, io.BytesIO(), BuildOptions(workers=2), limits=case.limits)
            assert case.names in str(got.value), case.id
    assert refused >= 10


def test_chunks_sharing_a_member_by_inner_offset() -> None:
    # newer Go writers pack small files into one member and address them with innerOffset
    tar = make_tar([("a", b"a" * 100), ("b", b"b" * 50)])[:-1024]  # without the end-of-archive blocks
    member = gzip.compress(tar, mtime=0)

    def ent(name: str, data: bytes, inner: int) -> dict[str, Any]:
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        return {"name": name, "type": "reg", "size": len(data), "offset": 0, "innerOffset": inner,
                "digest": d, "chunkDigest": d}

    body = json.dumps({"version": 1, "entries": [ent("a", b"a" * 100, 512), ent("b", b"b" * 50, 1536)]}).encode()
    blob = member + _toc_member(body) + gzip_footer(len(member))
    es = open_bytes(blob)
    read = lambda o, n: blob[o : o + n]  # noqa: E731
    assert es.read_file(read, "a") == b"a" * 100 and es.read_file(read, "b", 10, 5) == b"b" * 5
    assert es.chunks_for("b")[0].blob_range == (0, len(member))
    # the same inner offsets in the wrong order overlap
    body = json.dumps({"version": 1, "entries": [ent("a", b"a" * 100, 1536), ent("b", b"b" * 50, 512)]}).encode()
    refuse(member + _toc_member(body) + gzip_footer(len(member)), InvalidInputError, "overlaps or precedes")
