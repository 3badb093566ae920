"""The TOC text: the C-encoder fast path writes exactly Go's ``json.MarshalIndent`` layout (the Python encoder's
``indent="\\t"`` output, entry by entry), whatever the piece size, and a TOC too large to keep between its two
passes (length, then text) gives the same blob as one kept."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest

from cvmfs_snap.estargz import open_bytes
from cvmfs_snap.estargz import writer as writer_mod
from cvmfs_snap.estargz.toc import TocEntry, toc_json, toc_json_parts
from cvmfs_snap_devenv.images import make_tar
from tests.support.estargz import to_estargz


def _reference(entries: list[TocEntry]) -> bytes:
    """The layout entry by entry with the generic (Python) encoder, as the writer produced it before."""
    out = [b'{\n\t"version": 1,\n\t"entries": [\n']
    for i, e in enumerate(entries):
        text = json.dumps(e.to_json(), indent="\t", ensure_ascii=False).replace("\n", "\n\t\t")
        out.append(b"\t\t" + text.encode("utf-8", "surrogateescape") + (b",\n" if i < len(entries) - 1 else b"\n"))
    out.append(b"\t]\n}")
    return b"".join(out)


def _entries(n: int) -> list[TocEntry]:
    rnd = random.Random(7)
    names = ["usr/lib/libc.so.6", "caf\u00e9/\u6587\u5b57", "bad\udcffbyte", 'quote"back\\slash', "new\nline\ttab",
             "ctrl\x01\x7f", ""]
    out = []
    for i in range(n):
        kind = rnd.choice(["reg", "dir", "chunk", "symlink", "hardlink", "char", "fifo"])
        out.append(TocEntry(
            names[i % len(names)] + str(i), kind, size=rnd.choice([0, 1, 4 << 20, 1 << 40]),
            mode=rnd.choice([0, 0o755]),
            uid=rnd.choice([0, 1000]), gid=rnd.choice([0, 65534]), modtime=rnd.choice(["", "2024-01-01T00:00:00Z"]),
            linkname="t\u00e9" if kind in ("symlink", "hardlink") else "", uname=rnd.choice(["", "root"]),
            devmajor=i % 3 if kind == "char" else 0, devminor=i % 5 if kind == "char" else 0,
            xattrs={"user.a": b"\x00\xff", "security.capability": b"x" * 20} if i % 11 == 0 else None,
            digest="sha256:" + "ab" * 32 if kind == "reg" else "", offset=rnd.randrange(1 << 40),
            chunk_offset=i if kind == "chunk" else 0, chunk_size=(1 << 20) * (i % 2),
            chunk_digest="sha256:" + "cd" * 32 if kind in ("reg", "chunk") else "", inner_offset=i % 4,
        ))
    return out


def test_toc_text_is_the_marshal_indent_layout() -> None:
    entries = _entries(500)
    got = b"".join(toc_json_parts(entries))
    assert got == _reference(entries)
    assert json.loads(got.decode("utf-8", "surrogateescape"))["entries"][11]["xattrs"] == {
        "user.a": "AP8=", "security.capability": "eHh4eHh4eHh4eHh4eHh4eHh4eHg="}
    assert toc_json(entries[:1]) == _reference(entries[:1])
    assert toc_json([]) == b'{\n\t"version": 1,\n\t"entries": []\n}'


def test_a_toc_too_large_to_keep_is_serialised_again_identically(monkeypatch: pytest.MonkeyPatch) -> None:
    tar = make_tar([f"d{k}/" for k in range(5)] + [(f"d{i % 5}/f{i}", bytes([i % 256]) * (i % 900))
                                                   for i in range(2000)])
    calls: list[int] = []
    real = writer_mod.toc_json_parts

    def counting(entries: list[TocEntry]) -> Iterator[bytes]:
        calls.append(len(entries))
        return real(entries)

    monkeypatch.setattr(writer_mod, "toc_json_parts", counting)
    kept, res = to_estargz(tar, chunk_size=100_000, workers=2)
    assert len(calls) == 1  # serialised once, kept for writing
    monkeypatch.setattr(writer_mod, "TOC_KEEP_BYTES", 1000)
    again, res2 = to_estargz(tar, chunk_size=100_000, workers=2)
    assert len(calls) == 3  # measured, then written again
    assert again == kept and res2.toc_digest == res.toc_digest
    es = open_bytes(again, toc_digest=res.toc_digest)
    assert sum(1 for e in es.toc.entries if e.type == "reg") == 2001  # the files and the landmark
