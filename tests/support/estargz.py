"""eStargz test helpers: layer corpora to convert, building blobs in memory, and the Go reference tool `esgz`."""

from __future__ import annotations

import io

import pytest

from cvmfs_snap.estargz import BuildOptions, BuildResult, build
from cvmfs_snap_devenv.images import Entry, make_tar
from tests.support.runnable import goref_bin

CAP = bytes.fromhex("0100000200200000000000000000000000000000")
T0 = 1_650_000_000


def corpus() -> dict[str, bytes]:
    """Layer tars covering what eStargz must carry: deletions, hardlinks, xattrs, devices, long names, empty
    files and files larger than a chunk (sparse files come from GNU tar, see :func:`tests.support.trees.sparse_tar`)."""
    big = bytes(range(256)) * 9000  # 2.3 MB: several 1 MiB chunks, not a multiple of the chunk size
    long = "d" * 120 + "/" + "n" * 200
    return {
        "whiteouts": make_tar([
            "etc/", Entry("etc/.wh.passwd"), Entry("usr/.wh..wh..opq"), "usr/", ("usr/kept", b"k"),
        ]),
        "hardlinks": make_tar([
            "bin/", Entry("bin/tool", data=b"#!/bin/sh\necho hi\n", mode=0o755),
            Entry("bin/alias", type="hardlink", linkname="bin/tool"),
            Entry("bin/alias2", type="hardlink", linkname="bin/alias"),
        ]),
        "xattrs": make_tar([
            Entry("ping", data=b"ELF", mode=0o4755, uid=0, gid=0,
                  pax={"SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape"),
                       "SCHILY.xattr.user.note": "hello"}),
            Entry("dir", type="dir", pax={"SCHILY.xattr.user.d": "1"}),
        ]),
        "devices": make_tar([
            "dev/", Entry("dev/null", type="char", devmajor=1, devminor=3, mode=0o666),
            Entry("dev/sda", type="block", devmajor=8, devminor=0, mode=0o660, gid=6),
            Entry("dev/pipe", type="fifo"), Entry("dev/stdin", type="symlink", linkname="/proc/self/fd/0"),
        ]),
        "long-names": make_tar([Entry(long, data=b"deep"), Entry("l", type="symlink", linkname="x" * 900),
                                Entry("ü-ñ €", data=b"utf8", uid=123456, gid=654321, mtime=T0)]),
        "empty": make_tar([Entry("e1"), Entry("e2", mtime=0), "emptydir/"]),
        "big": make_tar([("big", big), ("exact", b"e" * (1 << 20)), ("small", b"s"), ("after", b"a" * 700)]),
        "nothing": make_tar([]),
        "replaced": make_tar([("f", b"old"), ("f", b"new content"), "d/", ("d/x", b"1")]),
    }


def to_estargz(tar: bytes, **kw: object) -> tuple[bytes, BuildResult]:
    out = io.BytesIO()
    res = build(io.BytesIO(tar), out, BuildOptions(**kw))  # type: ignore[arg-type]
    return out.getvalue(), res


def esgz() -> str:
    """The Go reference tool, or skip saying how to build it."""
    tool = goref_bin("esgz")
    if tool is None:
        pytest.skip("Go reference tool esgz not built: run GOREF_BIN=/tmp/go-reference/bin bash "
                    "../shared/tools/go-reference/build.sh (scripts/test does it)")
    return tool
