"""Safe, streaming iteration over the members of a layer tar.

Python's ``tarfile`` reads PAX headers and GNU long names whole into memory before anyone can look at their size,
and hands back member names unchecked. A layer comes from the network, so this module parses headers itself
(ustar, GNU and PAX, as Go's ``archive/tar`` that Docker and containerd use) and checks every member *before* the
caller sees it: limits on header sizes, entry counts and path lengths, no NUL bytes, no ``..`` components, and paths
normalised the way containerd does (a leading ``/`` is joined under the target root). Data is read by the caller
in chunks, so a member of any size streams through bounded memory.

Malformed input raises :class:`InvalidInputError`; input that is well-formed but hostile or beyond the limits raises
:class:`UnsafeLayerError`. Both name the member and its byte offset in the uncompressed tar.
"""

from __future__ import annotations

import base64
import io
import logging
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

from cvmfs_snap.errors import InvalidInputError, UnsafeLayerError
from cvmfs_snap.layer.digesting import HashingReader, Readable
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.paths import FORBIDDEN_XATTR_PREFIXES, check_xattr, normalize_path, show

log = logging.getLogger(__name__)

__all__ = ["FORBIDDEN_XATTR_PREFIXES", "TarEntry", "TarReader", "decode_entry", "normalize_path", "show"]

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)

_KINDS = {
    b"0": "file",
    b"\0": "file",
    b"7": "file",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}

@dataclass
class TarEntry:
    """One member of a layer tar, already checked.

    ``path`` is normalised and relative to the layer root (``""`` is the root itself). For hard links ``linkname``
    is normalised the same way; for symlinks it is the target exactly as stored (it is only ever *stored*, never
    followed by the unpacker).
    """

    path: str
    raw_name: str
    kind: str  # file, dir, symlink, hardlink, char, block, fifo
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    offset: int = 0
    #: for sparse members: (offset, length) of each data segment; ``read`` returns the segments back to back
    sparse: list[tuple[int, int]] | None = None
    #: with ``TarReader(keep_raw=True)``: the member's header blocks exactly as stored (PAX and GNU long-name
    #: headers included), from ``offset`` up to where its data starts
    header_raw: bytes = b""
    #: tar offset of the member's first header block (its PAX or GNU long-name header, if it has one)
    header_offset: int = 0
    _reader: TarReader | None = field(default=None, repr=False, compare=False)

    @property
    def display(self) -> str:
        return show(self.raw_name)

    def read(self, n: int = 1 << 20) -> bytes:
        """Next chunk (at most ``n`` bytes) of this member's data; b"" at its end."""
        if self._reader is None:
            return b""
        return self._reader.read_data(self, n)

    def copy_to(self, fd: int) -> bool:
        """Write all of this member's data to the start of ``fd`` without passing it through Python, when the source
        can (an entry read from a file tree: ``copy_file_range``); False when nothing was written and the caller
        must copy it with ``read``. A tar member always says False."""
        return False


def _parse_octal(fld: bytes, what: str, where: str) -> int:
    if fld and fld[0] & 0x80:  # base-256 (GNU/star extension for values that do not fit in octal)
        if fld[0] == 0xFF:
            return int.from_bytes(fld, "big") - (1 << (8 * len(fld)))
        return int.from_bytes(bytes([fld[0] & 0x7F]) + fld[1:], "big")
    s = fld.split(b"\0", 1)[0].strip(b" ")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise InvalidInputError(
            f"{where}: malformed tar header: {what} field {fld!r} is not a number; the layer is corrupt"
        ) from None


def _parse_pax(data: bytes, where: str) -> dict[str, bytes]:
    recs: dict[str, bytes] = {}
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:  # some writers pad the record block with NULs
            break
        sp = data.find(b" ", pos, pos + 24)
        try:
            length = int(data[pos:sp]) if sp > pos else -1
        except ValueError:
            length = -1
        if length <= 0 or pos + length > n or data[pos + length - 1 : pos + length] != b"\n":
            raise InvalidInputError(f"{where}: malformed PAX extended header record at +{pos}; the layer is corrupt")
        key, eq, value = data[sp + 1 : pos + length - 1].partition(b"=")
        if not eq or not key:
            raise InvalidInputError(f"{where}: malformed PAX extended header record at +{pos}; the layer is corrupt")
        k = key.decode("utf-8", "surrogateescape")
        if k in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
            # sparse format 0.0 repeats these two keys, once per segment: keep them all, in order
            recs["GNU.sparse.map00"] = recs.get("GNU.sparse.map00", b"") + value + b","
        else:
            recs[k] = value
        pos += length
    return recs


def _pax_int(value: bytes, key: str, where: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise InvalidInputError(f"{where}: PAX record {key}={value[:40]!r} is not an integer") from None
    if v < 0:
        raise InvalidInputError(f"{where}: PAX record {key}={v} is negative")
    return v


def _pax_time_ns(value: bytes, where: str) -> int:
    s = value.decode("ascii", "replace").strip()
    neg = s.startswith("-")
    if neg:
        s = s[1:]
    whole, _, frac = s.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise InvalidInputError(f"{where}: PAX record mtime={value[:40]!r} is not a time")
    ns = int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
    return -ns if neg else ns


class TarReader:
    """Iterate over the checked members of a tar stream; the stream's sha256 (diffID) is known at the end.

    Use ``for entry in reader:``; read a member's data with ``entry.read(n)`` before asking for the next member (what
    is not read is skipped). After the last member the rest of the stream (end-of-archive blocks and any padding)
    is read too, so that ``diff_id`` covers the whole stream.
    """

    def __init__(
        self, stream: Readable, limits: Limits | None = None, name: str = "layer", *, keep_raw: bool = False
    ) -> None:
        # a LayerStream hashes the uncompressed tar already: do not pay for sha256 twice
        self._upstream_digest = hasattr(stream, "diff_id")
        self._stream = stream
        self._in = HashingReader(stream, hash=not self._upstream_digest)
        self.limits = limits or Limits()
        self.name = name
        self._pos = 0
        self._remaining = 0  # data bytes of the current member not yet read
        self._padding = 0
        self._current: TarEntry | None = None
        self.entries = 0
        self.finished = False
        self._keep_raw = keep_raw
        self._raw: list[bytes] | None = None  # header bytes of the member being parsed (keep_raw)

    # -- raw input --------------------------------------------------------------------------------------------
    def _where(self, offset: int, entry: str | None = None) -> str:
        who = f"entry {entry} " if entry is not None else ""
        return f"{self.name}: {who}at tar offset {offset}"

    def _truncated(self, what: str) -> InvalidInputError:
        return InvalidInputError(
            f"{self.name}: tar stream is truncated ({what}, at tar offset {self._pos}); the layer blob is "
            "incomplete or corrupt: fetch it again"
        )

    def _read_exact(self, n: int, what: str) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = self._in.read(min(n - got, 1 << 20))
            if not data:
                raise self._truncated(what)
            parts.append(data)
            got += len(data)
            self._pos += len(data)
        out = b"".join(parts)
        if self._raw is not None:
            self._raw.append(out)
        return out

    def _skip(self, n: int, what: str) -> None:
        while n > 0:
            data = self._in.read(min(n, 1 << 20))
            if not data:
                raise self._truncated(what)
            if self._raw is not None:
                self._raw.append(data)
            n -= len(data)
            self._pos += len(data)

    def _read_block(self) -> bytes | None:
        """The next 512-byte block, None on a clean EOF exactly at a block boundary."""
        first = self._in.read(BLOCK)
        if not first:
            return None
        self._pos += len(first)
        if len(first) < BLOCK:
            raw, self._raw = self._raw, None
            first += self._read_exact(BLOCK - len(first), "inside a tar header")
            self._raw = raw
        if self._raw is not None:
            self._raw.append(first)
        return first

    # -- member data ------------------------------------------------------------------------------------------
    def read_data(self, entry: TarEntry, n: int) -> bytes:
        if entry is not self._current or self._remaining == 0:
            return b""
        data = self._in.read(min(n, self._remaining))
        if not data:
            raise self._truncated(f"entry {entry.display} is missing {self._remaining} of its {entry.size} bytes")
        self._remaining -= len(data)
        self._pos += len(data)
        return data

    def _finish_current(self) -> None:
        if self._current is not None:
            what = f"inside the data of entry {self._current.display}"
            self._skip(self._remaining, what)
            self._skip(self._padding, what)
            self._remaining = self._padding = 0
            self._current = None

    # -- iteration --------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TarEntry]:
        while True:
            self._finish_current()
            self._raw = [] if self._keep_raw else None
            entry = self._next()
            if entry is not None and self._raw is not None:
                entry.header_raw = b"".join(self._raw)
            self._raw = None
            if entry is None:
                break
            self._current = entry
            yield entry
        self._in.drain()
        self.finished = True

    @property
    def diff_id(self) -> str | None:
        """sha256 of the whole tar stream, None until it was read to its end."""
        if self._upstream_digest:
            d = getattr(self._stream, "diff_id", None)
            return d if isinstance(d, str) and self._in.eof else None
        return self._in.digest

    @property
    def bytes_read(self) -> int:
        return self._in.size

    def _next(self) -> TarEntry | None:
        lim = self.limits
        pax: dict[str, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        pax_total = 0
        first_off = self._pos
        while True:
            off = self._pos
            block = self._read_block()
            if block is None:
                if pax or longname is not None or longlink is not None:
                    raise self._truncated("after an extended header, before its entry")
                log.debug("%s: tar ends without end-of-archive blocks", self.name)
                return None
            if block == _ZERO_BLOCK:
                return None
            hname = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            where = self._where(off, show(hname))
            stored = _parse_octal(block[148:156], "checksum", where)
            unsigned = sum(block[:148]) + 256 + sum(block[156:])
            if stored != unsigned and stored != unsigned - 256 * sum(1 for b in block if b > 127):
                # the second form is the signed-char sum some old tar writers stored
                raise InvalidInputError(
                    f"{where}: bad tar header checksum (stored {stored}, computed {unsigned}); the layer is "
                    "corrupt or not a tar: fetch it again"
                )
            typeflag = block[156:157]
            size = _parse_octal(block[124:136], "size", where)
            if size < 0:
                raise InvalidInputError(f"{where}: negative size in tar header; the layer is corrupt")
            if typeflag in (b"x", b"g"):
                pax_total += size  # several PAX headers before one entry count together
                if size > lim.max_pax_header_size or pax_total > lim.max_pax_header_size:
                    raise UnsafeLayerError(
                        f"{where}: PAX extended header of {size} bytes ({pax_total} for this entry) exceeds the "
                        f"limit of {lim.max_pax_header_size} bytes (Limits.max_pax_header_size); refusing the layer"
                    )
                data = self._read_exact(size, f"inside PAX header {show(hname)}")
                self._skip(-size % BLOCK, "after a PAX header")
                recs = _parse_pax(data, where)
                if typeflag == b"x":
                    pax.update(recs)
                else:
                    log.debug("%s: ignoring PAX global header (%d records)", where, len(recs))
                continue
            if typeflag in (b"L", b"K"):
                if size > lim.max_path_len + 1:
                    head = self._read_exact(min(size, 120), "inside a GNU long name")
                    raise UnsafeLayerError(
                        f"{self._where(off, show(head.decode('utf-8', 'surrogateescape'), 100))}: GNU long "
                        f"{'name' if typeflag == b'L' else 'link name'} of {size} bytes exceeds the limit of "
                        f"{lim.max_path_len} bytes (Limits.max_path_len); refusing the layer"
                    )
                data = self._read_exact(size, "inside a GNU long name")
                self._skip(-size % BLOCK, "after a GNU long name")
                value = data.rstrip(b"\0")
                if b"\0" in value:
                    raise UnsafeLayerError(
                        f"{self._where(off, show(value.decode('utf-8', 'surrogateescape')))}: NUL byte inside a "
                        "GNU long name; refusing the layer"
                    )
                if typeflag == b"L":
                    longname = value
                else:
                    longlink = value
                continue
            entry = self._entry(block, off, size, pax, longname, longlink)
            entry.header_offset = first_off
            return entry

    def _entry(
        self, block: bytes, off: int, size: int, pax: dict[str, bytes], longname: bytes | None,
        longlink: bytes | None,
    ) -> TarEntry:
        lim = self.limits
        typeflag = block[156:157]
        magic = block[257:265]
        if "GNU.sparse.name" in pax:
            raw = pax["GNU.sparse.name"]
        elif "path" in pax:
            raw = pax["path"]
        elif longname is not None:
            raw = longname
        else:
            raw = block[:100].split(b"\0", 1)[0]
            if magic == b"ustar\x0000":
                prefix = block[345:500].split(b"\0", 1)[0]
                if prefix:
                    raw = prefix + b"/" + raw
        raw_name = raw.decode("utf-8", "surrogateescape")
        where = self._where(off, show(raw_name))
        if b"\0" in raw:
            raise UnsafeLayerError(f"{where}: NUL byte in member name; refusing the layer")
        self.entries += 1
        if self.entries > lim.max_entries:
            raise UnsafeLayerError(
                f"{where}: layer has more than {lim.max_entries} entries (Limits.max_entries); refusing the layer"
            )
        kind = "file" if typeflag == b"S" else _KINDS.get(typeflag)
        if typeflag == b"\0" and raw.endswith(b"/"):
            kind = "dir"  # old tars mark directories only by the trailing slash
        if kind is None:
            raise InvalidInputError(
                f"{where}: unsupported tar entry type {typeflag!r}; rebuild the layer with a standard "
                "tar writer (docker, buildah, umoci)"
            )
        sparse_format = None
        pax_map = b""
        if typeflag == b"S":
            sparse_format = "old GNU"
        elif pax.get("GNU.sparse.major") == b"1" and pax.get("GNU.sparse.minor") == b"0":
            sparse_format = "1.0"
        elif "GNU.sparse.map" in pax:
            sparse_format = "0.1"
            pax_map = pax["GNU.sparse.map"]
        elif "GNU.sparse.map00" in pax:
            sparse_format = "0.0"
            pax_map = pax["GNU.sparse.map00"].rstrip(b",")
        path = normalize_path(raw_name, lim, where)
        if path == "" and kind != "dir":
            raise UnsafeLayerError(f"{where}: a {kind} cannot replace the layer root; refusing the layer")
        mode = _parse_octal(block[100:108], "mode", where) & 0o7777
        uid = _pax_int(pax["uid"], "uid", where) if "uid" in pax else _parse_octal(block[108:116], "uid", where)
        gid = _pax_int(pax["gid"], "gid", where) if "gid" in pax else _parse_octal(block[116:124], "gid", where)
        if uid < 0 or gid < 0 or uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
            raise InvalidInputError(f"{where}: owner {uid}:{gid} is out of range")
        if "mtime" in pax:
            mtime_ns = _pax_time_ns(pax["mtime"], where)
        else:
            mtime_ns = _parse_octal(block[136:148], "mtime", where) * 1_000_000_000
        if kind == "file":
            if "size" in pax:
                size = _pax_int(pax["size"], "size", where)
        else:
            size = 0  # header-only types carry no data, as in Go's archive/tar and Python's tarfile
        linkname = ""
        if kind in ("symlink", "hardlink"):
            if "linkpath" in pax:
                rawlink = pax["linkpath"]
            elif longlink is not None:
                rawlink = longlink
            else:
                rawlink = block[157:257].split(b"\0", 1)[0]
            linkname = rawlink.decode("utf-8", "surrogateescape")
            if b"\0" in rawlink:
                raise UnsafeLayerError(f"{where}: NUL byte in link target; refusing the layer")
            if not rawlink:
                raise InvalidInputError(f"{where}: {kind} with an empty target; the layer is corrupt")
            if len(rawlink) > lim.max_path_len:
                raise UnsafeLayerError(
                    f"{where}: link target of {len(rawlink)} bytes exceeds Limits.max_path_len "
                    f"({lim.max_path_len}); refusing the layer"
                )
            if kind == "hardlink":
                linkname = normalize_path(linkname, lim, where + " (hardlink target)")
                if linkname == "":
                    raise UnsafeLayerError(f"{where}: hardlink to the layer root; refusing the layer")
        devmajor = devminor = 0
        if kind in ("char", "block"):
            devmajor = _parse_octal(block[329:337], "devmajor", where)
            devminor = _parse_octal(block[337:345], "devminor", where)
        xattrs = _xattrs(pax, lim, where)
        sparse: list[tuple[int, int]] | None = None
        realsize = size
        if sparse_format == "old GNU":
            sparse, realsize = self._old_gnu_sparse(block, where)
        self._remaining = size
        self._padding = -size % BLOCK
        if sparse_format in ("1.0", "0.1", "0.0"):
            key = "GNU.sparse.realsize" if sparse_format == "1.0" else "GNU.sparse.size"
            if key not in pax:
                raise InvalidInputError(f"{where}: PAX sparse file without {key}; the layer is corrupt")
            realsize = _pax_int(pax[key], key, where)
            if sparse_format == "1.0":
                sparse = self._sparse_map_1_0(where)
            else:
                nums = pax_map.split(b",") if pax_map else []
                sparse = _pairs([_pax_int(n, "GNU.sparse.map", where) for n in nums], where)
        if sparse is not None:
            _check_sparse(sparse, realsize, self._remaining, where)
        return TarEntry(
            path=path, raw_name=raw_name, kind=kind, mode=mode, uid=uid, gid=gid, size=realsize,
            mtime_ns=mtime_ns, linkname=linkname, devmajor=devmajor, devminor=devminor, xattrs=xattrs, offset=off,
            sparse=sparse, _reader=self,
        )

    def _old_gnu_sparse(self, block: bytes, where: str) -> tuple[list[tuple[int, int]], int]:
        """Segments of an old-GNU sparse member: 4 in the header, 21 per extension block after it."""
        nums: list[int] = []

        def take(buf: bytes, start: int, count: int) -> None:
            for i in range(count):
                o = start + 24 * i
                if buf[o] == 0:
                    break
                nums.append(_parse_octal(buf[o : o + 12], "sparse offset", where))
                nums.append(_parse_octal(buf[o + 12 : o + 24], "sparse length", where))

        take(block, 386, 4)
        extended = block[482]
        used = 0
        while extended:
            used += BLOCK
            if used > self.limits.max_pax_header_size:
                raise UnsafeLayerError(f"{where}: sparse map is larger than Limits.max_pax_header_size")
            ext = self._read_exact(BLOCK, "inside a sparse map")
            take(ext, 0, 21)
            extended = ext[504]
        return _pairs(nums, where), _parse_octal(block[483:495], "sparse real size", where)

    def _sparse_map_1_0(self, where: str) -> list[tuple[int, int]]:
        """PAX 1.0 sparse map: decimal numbers, one a line, at the start of the data, padded to a block."""
        text = b""
        nums: list[int] = []
        want = None
        while want is None or len(nums) < want:
            if len(text) > self.limits.max_pax_header_size or self._remaining < BLOCK:
                raise InvalidInputError(f"{where}: malformed or oversized PAX 1.0 sparse map")
            blk = self._read_exact(BLOCK, "inside a sparse map")
            self._remaining -= BLOCK
            text += blk
            lines = text.split(b"\n")
            nums = []
            for ln in lines[:-1]:
                if not ln.isdigit():
                    raise InvalidInputError(f"{where}: malformed PAX 1.0 sparse map")
                nums.append(int(ln))
            if nums:
                want = 1 + 2 * nums[0]
        return _pairs(nums[1:want], where)


def _pairs(nums: list[int], where: str) -> list[tuple[int, int]]:
    if len(nums) % 2:
        raise InvalidInputError(f"{where}: sparse map has an odd number of values; the layer is corrupt")
    return list(zip(nums[::2], nums[1::2], strict=True))


def _check_sparse(segments: list[tuple[int, int]], realsize: int, stored: int, where: str) -> None:
    end = 0
    for off, n in segments:
        if off < end or n < 0 or off + n > realsize:
            raise InvalidInputError(f"{where}: sparse map has overlapping or out-of-range segments")
        end = off + n
    if sum(n for _, n in segments) != stored:
        raise InvalidInputError(f"{where}: sparse map does not match the stored data size; the layer is corrupt")


def _xattrs(pax: dict[str, bytes], lim: Limits, where: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :]
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            try:
                value = base64.b64decode(value + b"=" * (-len(value) % 4))
            except ValueError:
                raise InvalidInputError(f"{where}: malformed LIBARCHIVE.xattr record {name!r}") from None
            if name in out:
                continue  # the SCHILY record, when both are present, is the one Go and GNU tar read
        else:
            continue
        check_xattr(name, value, lim, where)
        out[name] = value
    return out


def decode_entry(data: bytes, limits: Limits | None = None, name: str = "layer", *, offset: int = 0) -> TarEntry:
    """The first member described by ``data`` (its header blocks, PAX/GNU extensions included; data may follow).

    For readers that hold one entry's bytes rather than a stream, such as an eStargz chunk decoded from a gzip
    member: the same checks as :class:`TarReader`. ``offset`` is where ``data`` starts in the uncompressed tar (for
    messages and ``TarEntry.offset``). The entry's data is not read; ``header_raw`` holds its header bytes.
    """
    reader = TarReader(io.BytesIO(data), limits, name, keep_raw=True)
    reader._pos = offset
    for entry in reader:
        entry._reader = None
        return entry
    # the end-of-archive block stops the iteration
    raise InvalidInputError(f"{name}: no tar entry at tar offset {offset} (end-of-archive or empty data)")
