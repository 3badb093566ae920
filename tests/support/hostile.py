"""A corpus of hostile and malformed layers, built by hand (byte by byte where tarfile would refuse to write them).

Each case says which error it must raise and a piece of text the message must contain (the entry's name), so that a
test can check both that the layer is refused and that an admin reading the error learns which entry was the
problem. Cases that try to escape are given a real directory outside the target (``outside``) to aim at; the tests
snapshot it before and after.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError, UnsafeLayerError
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.mediatypes import OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD
from cvmfs_snap_devenv.images import Entry, make_tar

# -- raw tar writing ---------------------------------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return (b"%0*o" % (width - 1, value)) + b"\0"


def header(
    name: bytes,
    typeflag: bytes = b"0",
    size: int = 0,
    *,
    linkname: bytes = b"",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_700_000_000,
    devmajor: int = 0,
    devminor: int = 0,
    size_field: bytes | None = None,
    bad_checksum: bool = False,
) -> bytes:
    """One ustar header block exactly as given (no checks: names may hold anything)."""
    b = bytearray(512)
    b[0:100] = name[:100].ljust(100, b"\0")
    b[100:108] = _octal(mode, 8)
    b[108:116] = _octal(uid, 8)
    b[116:124] = _octal(gid, 8)
    b[124:136] = size_field if size_field is not None else _octal(size, 12)
    b[136:148] = _octal(mtime, 12)
    b[148:156] = b" " * 8
    b[156:157] = typeflag
    b[157:257] = linkname[:100].ljust(100, b"\0")
    b[257:265] = b"ustar\x0000"
    b[329:337] = _octal(devmajor, 8)
    b[337:345] = _octal(devminor, 8)
    chk = sum(b) + (1 if bad_checksum else 0)
    b[148:156] = b"%06o\0 " % chk
    return bytes(b)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def pax_block(records: dict[bytes, bytes], name: bytes = b"PaxHeaders/x") -> bytes:
    body = b""
    for k, v in records.items():
        rec = b" " + k + b"=" + v + b"\n"
        n = len(rec) + 1
        while len(str(n).encode()) + len(rec) != n:
            n += 1
        body += str(n).encode() + rec
    return header(name, b"x", len(body)) + pad(body)


def raw_file(name: bytes, data: bytes = b"", **kw: object) -> bytes:
    return header(name, b"0", len(data), **kw) + pad(data)  # type: ignore[arg-type]


END = bytes(1024)


def tar_of(*parts: bytes) -> bytes:
    return b"".join(parts) + END


# -- the corpus ----------------------------------------------------------------------------------------------------


@dataclass
class HostileCase:
    """One layer that must be refused."""

    id: str
    blob: bytes
    error: type[CvmfsSnapError]
    names: str  # text the error message must contain (usually the entry's name)
    media_type: str = OCI_LAYER_TAR
    mode: str = "layer"
    limits: Limits = field(default_factory=Limits)
    setup: Callable[[Path], None] | None = None  # prepares the target (merged-mode cases)


def _gz(tar: bytes) -> bytes:
    return gzip.compress(tar, mtime=0)


def _symlink_setup(name: str, to: Path) -> Callable[[Path], None]:
    def setup(target: Path) -> None:
        (target / name).symlink_to(to)

    return setup


def _old_sparse(name: bytes, segments: list[tuple[int, int]], realsize: int, stored: int) -> bytes:
    """An old-GNU sparse header ('S') with the given map (at most 4 segments, no extension blocks)."""
    b = bytearray(header(name, b"S", stored))
    b[257:265] = b"ustar  \0"
    for i, (off, n) in enumerate(segments):
        b[386 + 24 * i : 398 + 24 * i] = _octal(off, 12)
        b[398 + 24 * i : 410 + 24 * i] = _octal(n, 12)
    b[483:495] = _octal(realsize, 12)
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b) + pad(b"x" * stored)


def _device_setup(target: Path) -> None:
    (target / "dev").mkdir()
    os.mknod(target / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))


def build_corpus(outside: Path) -> list[HostileCase]:
    """All hostile cases; ``outside`` is an existing directory beside the target, holding a file ``secret``."""
    out = str(outside).encode()
    secret_rel = b"../" * 8 + out.lstrip(b"/") + b"/secret"
    ok = make_tar([("ok", b"fine")])
    big_file = make_tar([("big/file", b"x" * 20000)])
    cases = [
        HostileCase("traversal-dotdot", tar_of(raw_file(b"../x", b"pwned")), UnsafeLayerError, "'../x'"),
        HostileCase("traversal-nested", tar_of(raw_file(b"a/../../x", b"pwned")), UnsafeLayerError, "a/../../x"),
        HostileCase("traversal-absolute-dotdot", tar_of(raw_file(b"/../../x", b"pwned")), UnsafeLayerError,
                    "/../../x"),
        HostileCase("traversal-deep", tar_of(pax_block({b"path": secret_rel}), raw_file(b"x", b"pwned")),
                    UnsafeLayerError, "../../"),
        HostileCase(
            "symlink-absolute-escape",
            tar_of(header(b"esc", b"2", linkname=out), raw_file(b"esc/pwned", b"pwned")),
            UnsafeLayerError, "esc/pwned",
        ),
        HostileCase(
            "symlink-relative-escape",
            tar_of(header(b"esc", b"2", linkname=b"../../../../../../../../.." + out),
                   raw_file(b"esc/pwned", b"pwned")),
            UnsafeLayerError, "esc/pwned",
        ),
        HostileCase(
            "symlink-dotdot-escape",
            tar_of(header(b"esc", b"2", linkname=b"../../.."), raw_file(b"esc/file", b"pwned")),
            UnsafeLayerError, "esc/file",
        ),
        HostileCase(
            "symlink-chain",
            tar_of(header(b"b", b"2", linkname=out), header(b"a", b"2", linkname=b"b"),
                   raw_file(b"a/pwned", b"pwned")),
            UnsafeLayerError, "a/pwned",
        ),
        HostileCase(
            "symlink-replaces-dir-mid-layer",
            tar_of(header(b"d/", b"5", mode=0o755), raw_file(b"d/ok", b"fine"), header(b"d", b"2", linkname=out),
                   raw_file(b"d/pwned", b"pwned")),
            UnsafeLayerError, "d/pwned",
        ),
        HostileCase(
            "symlink-deep-parent",
            tar_of(header(b"x/y/", b"5", mode=0o755), header(b"x/y/z", b"2", linkname=out),
                   header(b"x/y/z/sub/", b"5", mode=0o755)),
            UnsafeLayerError, "x/y/z/sub",
        ),
        HostileCase("hardlink-etc-passwd", tar_of(header(b"h", b"1", linkname=b"/etc/passwd")), UnsafeLayerError,
                    "'h'"),
        HostileCase(
            "hardlink-through-symlink",
            tar_of(header(b"s", b"2", linkname=out), header(b"h", b"1", linkname=b"s/secret")),
            UnsafeLayerError, "'h'",
        ),
        HostileCase("hardlink-dotdot", tar_of(header(b"h", b"1", linkname=b"../outside/secret")), UnsafeLayerError,
                    "'h'"),
        HostileCase(
            "hardlink-to-dir",
            tar_of(header(b"d/", b"5", mode=0o755), header(b"h", b"1", linkname=b"d")),
            UnsafeLayerError, "'h'",
        ),
        HostileCase(
            "device-then-write-through",
            tar_of(header(b"f", b"3", devmajor=1, devminor=3), raw_file(b"f/x", b"pwned")),
            UnsafeLayerError, "f/x",
        ),
        HostileCase(
            "device-refused-by-limits",
            tar_of(header(b"dev/sda", b"4", devmajor=8, devminor=0)),
            UnsafeLayerError, "dev/sda", limits=Limits(allow_devices=False),
        ),
        HostileCase(
            "hardlink-to-device-refused",
            tar_of(header(b"h", b"1", linkname=b"dev/null")),
            UnsafeLayerError, "'h'",
            mode="merged", limits=Limits(allow_devices=False),
            setup=_device_setup,
        ),
        HostileCase(
            "huge-pax-header",
            tar_of(header(b"PaxHeaders/huge", b"x", 64 << 20)),
            UnsafeLayerError, "PaxHeaders/huge",
        ),
        HostileCase(
            "huge-gnu-longname",
            tar_of(header(b"././@LongLink", b"L", 1 << 20) + pad(b"AAAAlongname" * 20), raw_file(b"short")),
            UnsafeLayerError, "AAAAlongname",
        ),
        HostileCase(
            "many-pax-headers",
            tar_of(*(pax_block({f"k{i}".encode(): b"v" * 400_000}) for i in range(3)), raw_file(b"f")),
            UnsafeLayerError, "Limits.max_pax_header_size",
        ),
        HostileCase(
            "sparse-map-out-of-range",
            tar_of(pax_block({b"GNU.sparse.map": b"0,10,5,10", b"GNU.sparse.size": b"20", b"GNU.sparse.name": b"sp"}),
                   raw_file(b"GNUSparseFile.0/sp", b"x" * 20)),
            InvalidInputError, "'sp'",
        ),
        HostileCase("too-many-entries", make_tar([f"f{i}" for i in range(12)]), UnsafeLayerError, "'f10'",
                    limits=Limits(max_entries=10)),
        HostileCase("overlong-path", tar_of(pax_block({b"path": b"d/" * 2100 + b"f"}), raw_file(b"f")),
                    UnsafeLayerError, "d/d/d/"),
        HostileCase("overlong-name", tar_of(pax_block({b"path": b"n" * 300}), raw_file(b"f")), UnsafeLayerError,
                    "nnnn"),
        HostileCase("truncated-tar", big_file[:3000], InvalidInputError, "big/file"),
        HostileCase("truncated-header", make_tar([("a", b"x"), ("b", b"y")])[: 1024 + 100], InvalidInputError,
                    "truncated"),
        HostileCase("truncated-gzip", _gz(big_file)[:-40], InvalidInputError, "truncated",
                    media_type=OCI_LAYER_GZIP),
        HostileCase("corrupt-gzip-crc", _flip(_gz(big_file), -8), InvalidInputError, "gzip",
                    media_type=OCI_LAYER_GZIP),
        HostileCase("garbage-after-gzip", _gz(big_file) + b"garbage!", InvalidInputError, "after the end of the gzip",
                    media_type=OCI_LAYER_GZIP),
        HostileCase("corrupt-zstd", _corrupt(zstandard.ZstdCompressor(write_checksum=True).compress(big_file)),
                    InvalidInputError, "zstd", media_type=OCI_LAYER_ZSTD),
        HostileCase("truncated-zstd", zstandard.ZstdCompressor().compress(big_file)[:-10], InvalidInputError,
                    "truncated", media_type=OCI_LAYER_ZSTD),
        HostileCase("zstd-labelled-gzip", zstandard.ZstdCompressor().compress(ok), InvalidInputError,
                    OCI_LAYER_GZIP, media_type=OCI_LAYER_GZIP),
        HostileCase("gzip-labelled-tar", _gz(ok), InvalidInputError, OCI_LAYER_TAR, media_type=OCI_LAYER_TAR),
        HostileCase("tar-labelled-zstd", ok, InvalidInputError, OCI_LAYER_ZSTD, media_type=OCI_LAYER_ZSTD),
        HostileCase("unknown-media-type", _gz(ok), InvalidInputError, "tar+bzip2",
                    media_type="application/vnd.oci.image.layer.v1.tar+bzip2"),
        HostileCase("bad-checksum", tar_of(raw_file(b"checked", b"x", bad_checksum=True)), InvalidInputError,
                    "checked"),
        HostileCase("garbage-size-field", tar_of(header(b"sized", b"0", size_field=b"12z4\0\0\0\0\0\0\0\0")),
                    InvalidInputError, "sized"),
        HostileCase("nul-in-pax-path", tar_of(pax_block({b"path": b"a\0b"}), raw_file(b"x")), UnsafeLayerError,
                    "a\\x00b"),
        HostileCase("nul-in-gnu-longname",
                    tar_of(header(b"././@LongLink", b"L", 8) + pad(b"ev\0il\0\0\0"), raw_file(b"x")),
                    UnsafeLayerError, "ev\\x00il"),
        HostileCase("trusted-overlay-xattr",
                    tar_of(pax_block({b"SCHILY.xattr.trusted.overlay.opaque": b"y"}), header(b"od/", b"5")),
                    UnsafeLayerError, "od/"),
        HostileCase("xattr-too-big",
                    tar_of(pax_block({b"SCHILY.xattr.user.big": b"v" * 70000}), raw_file(b"xf")),
                    UnsafeLayerError, "xf"),
        HostileCase("whiteout-of-dotdot", tar_of(raw_file(b"d/.wh...")), UnsafeLayerError, ".wh..."),
        HostileCase("whiteout-traversal", tar_of(raw_file(b".wh.../x")), UnsafeLayerError, ".wh.../x"),
        HostileCase("whiteout-of-dot", tar_of(raw_file(b"d/.wh..")), UnsafeLayerError, ".wh.."),
        HostileCase("gnu-sparse-map-mismatch", tar_of(_old_sparse(b"sparse", [(0, 100)], realsize=100, stored=0)),
                    InvalidInputError, "'sparse'"),
        HostileCase("unknown-type", tar_of(header(b"vol", b"V")), InvalidInputError, "vol"),
        HostileCase("root-replaced-by-symlink", tar_of(header(b"./", b"2", linkname=out)), UnsafeLayerError, "./"),
        HostileCase(
            "merged-hardlink-through-symlink", tar_of(header(b"h", b"1", linkname=b"lnk/secret")), UnsafeLayerError,
            "'h'", mode="merged", setup=_symlink_setup("lnk", outside),
        ),
    ]
    return cases


@dataclass
class ClampedCase:
    """A ``merged``-mode layer that writes through a symlink aiming outside the target.

    containerd resolves parent paths inside the root (absolute targets and ``..`` stop at the root), so it accepts
    these layers and the writes land inside the root; so must we. ``lands`` are paths (relative to the target) the
    apply must create, ``symlinks`` paths that must still be symlinks afterwards. Nothing outside may change.
    """

    id: str
    blob: bytes
    lands: list[str]
    symlinks: list[str] = field(default_factory=list)
    setup: Callable[[Path], None] | None = None


def build_clamped_corpus(outside: Path) -> list[ClampedCase]:
    """Escapes through symlinks that merged mode clamps inside the target (``outside`` as in :func:`build_corpus`)."""
    out = str(outside).encode()
    rel = str(outside).lstrip("/")  # where an absolute symlink to ``outside`` lands inside the target
    return [
        ClampedCase("target-symlink-absolute", tar_of(raw_file(b"lib/evil", b"pwned")), [f"{rel}/evil"], ["lib"],
                    setup=_symlink_setup("lib", outside)),
        ClampedCase("target-symlink-whiteout", tar_of(raw_file(b"lnk/.wh.secret")), [], ["lnk"],
                    setup=_symlink_setup("lnk", outside)),
        ClampedCase("target-symlink-opaque", tar_of(raw_file(b"lnk/.wh..wh..opq")), [], ["lnk"],
                    setup=_symlink_setup("lnk", outside)),
        ClampedCase("layer-symlink-absolute",
                    tar_of(header(b"esc", b"2", linkname=out), raw_file(b"esc/pwned", b"pwned")),
                    [f"{rel}/pwned"], ["esc"]),
        ClampedCase("layer-symlink-relative",
                    tar_of(header(b"esc", b"2", linkname=b"../../../../../../../../.." + out),
                           raw_file(b"esc/pwned", b"pwned")),
                    [f"{rel}/pwned"], ["esc"]),
        ClampedCase("layer-symlink-dotdot",
                    tar_of(header(b"esc", b"2", linkname=b"../../.."), raw_file(b"esc/file", b"pwned")),
                    ["file"], ["esc"]),
        ClampedCase("layer-symlink-chain",
                    tar_of(header(b"b", b"2", linkname=out), header(b"a", b"2", linkname=b"b"),
                           raw_file(b"a/pwned", b"pwned")),
                    [f"{rel}/pwned"], ["a", "b"]),
        ClampedCase("layer-symlink-replaces-dir",
                    tar_of(header(b"d/", b"5", mode=0o755), raw_file(b"d/ok", b"fine"),
                           header(b"d", b"2", linkname=out), raw_file(b"d/pwned", b"pwned")),
                    [f"{rel}/pwned"], ["d"]),
        ClampedCase("layer-symlink-deep-parent",
                    tar_of(header(b"x/y/", b"5", mode=0o755), header(b"x/y/z", b"2", linkname=out),
                           header(b"x/y/z/sub/", b"5", mode=0o755)),
                    [f"{rel}/sub"], ["x/y/z"]),
        ClampedCase("layer-whiteout-through-symlink",
                    tar_of(header(b"esc", b"2", linkname=out), raw_file(b"esc/.wh.secret"),
                           raw_file(b"esc/sub/.wh..wh..opq")),
                    [], ["esc"]),
    ]


def _flip(blob: bytes, at: int) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x01
    return bytes(b)


def _corrupt(blob: bytes) -> bytes:
    b = bytearray(blob)
    mid = len(b) // 2
    for i in range(mid, min(mid + 16, len(b) - 8)):
        b[i] ^= 0x5A
    return bytes(b)


def tarfile_names(blob: bytes) -> list[str]:
    """Member names as Python's tarfile reads them (to check the corpus is what it claims)."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
        return tf.getnames()


__all__ = ["END", "ClampedCase", "Entry", "HostileCase", "build_clamped_corpus", "build_corpus", "header", "pad",
           "pax_block", "raw_file", "tar_of"]
