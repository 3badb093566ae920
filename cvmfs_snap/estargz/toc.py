"""The eStargz table of contents (``stargz.index.json``, version 1): model, JSON, and validation before any use.

A TOC comes from a registry we do not control, so :func:`parse_toc` checks all of it before anyone reads a chunk:
entry types, names (the same path rules as ``cvmfs_snap.layer``), parent directories, hardlink targets, xattrs,
chunk rules (``offset``, ``chunkOffset``, ``chunkSize``, ``innerOffset``; the chunks of one file contiguous and
covering its size; no two chunks overlapping in the blob), every offset inside the blob, and limits on the TOC's own
size and entry count (a TOC bomb is refused, not parsed). Everything here works on bytes: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from cvmfs_snap.digests import is_sha256
from cvmfs_snap.errors import InvalidInputError, UnsafeLayerError
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.paths import check_xattr, normalize_path, show

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"
#: default upper bound on the uncompressed TOC JSON (a layer with 2 million entries needs ~600 MiB)
DEFAULT_MAX_TOC_SIZE = 256 << 20

_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk")
_INT_FIELDS = ("size", "mode", "uid", "gid", "offset", "devMajor", "devMinor", "chunkOffset", "chunkSize",
               "innerOffset")


@dataclass(slots=True)
class TocEntry:
    """One TOC entry. ``name`` is normalised (``""`` is the root); for ``chunk`` entries it is the file's name."""

    name: str
    type: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    modtime: str = ""
    linkname: str = ""
    uname: str = ""
    gname: str = ""
    devmajor: int = 0
    devminor: int = 0
    #: extended attributes; None when there are none (most entries: no empty dict per entry)
    xattrs: dict[str, bytes] | None = None
    digest: str = ""
    offset: int = 0
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""
    inner_offset: int = 0
    #: blob offset where the compressed bytes this chunk needs end (the next member with other data, or the TOC)
    next_offset: int = 0

    @property
    def is_data(self) -> bool:
        return self.type in ("reg", "chunk")

    def to_json(self) -> dict[str, object]:
        """The entry as the Go library writes it (zero values left out)."""
        out: dict[str, object] = {"name": self.name, "type": self.type}
        for key, value in (
            ("size", self.size), ("modtime", self.modtime), ("linkName", self.linkname), ("mode", self.mode),
            ("uid", self.uid), ("gid", self.gid), ("userName", self.uname), ("groupName", self.gname),
            ("offset", self.offset), ("devMajor", self.devmajor), ("devMinor", self.devminor),
        ):
            if value:
                out[key] = value
        if self.xattrs:
            out["xattrs"] = {k: base64.b64encode(v).decode() for k, v in self.xattrs.items()}
        for key, value in (
            ("digest", self.digest), ("chunkOffset", self.chunk_offset), ("chunkSize", self.chunk_size),
            ("chunkDigest", self.chunk_digest), ("innerOffset", self.inner_offset),
        ):
            if value:
                out[key] = value
        return out


def format_modtime(mtime_ns: int) -> str:
    """RFC 3339 in UTC rounded to the second, "" for the epoch (as Go's writer does)."""
    secs = (mtime_ns + 500_000_000) // 1_000_000_000
    if secs == 0:
        return ""
    try:
        return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return ""


def toc_json_parts(entries: list[TocEntry]) -> Iterator[bytes]:
    """The serialised TOC piece by piece (tab-indented like Go's ``json.MarshalIndent``): a layer with a million
    files is written without holding its whole TOC text, nor a million dicts, at once."""
    if not entries:
        yield b'{\n\t"version": 1,\n\t"entries": []\n}'
        return
    yield b'{\n\t"version": 1,\n\t"entries": [\n'
    last = len(entries) - 1
    for i, e in enumerate(entries):
        text = json.dumps(e.to_json(), indent="\t", ensure_ascii=False).replace("\n", "\n\t\t")
        yield b"\t\t" + text.encode("utf-8", "surrogateescape") + (b",\n" if i < last else b"\n")
    yield b"\t]\n}"


def toc_json(entries: list[TocEntry]) -> bytes:
    """Serialised TOC; its sha256 is the TOC digest."""
    return b"".join(toc_json_parts(entries))


@dataclass
class Toc:
    """A validated TOC: entries in order, the files by name (hardlinks resolved) and each file's chunks."""

    entries: list[TocEntry]
    #: non-chunk entries by normalised name (the last one wins, as in a tar); parents the TOC leaves out are added
    by_name: dict[str, TocEntry]
    #: regular file name -> its reg entry and chunk entries, in file order
    chunks: dict[str, tuple[TocEntry, ...]]
    #: name -> the name it is a hardlink to (resolved to a regular file's name)
    hardlinks: dict[str, str]
    #: names before ``.prefetch.landmark`` (the prefetch set); empty if there is no such landmark
    prefetch: list[str]
    has_prefetch_landmark: bool
    has_no_prefetch_landmark: bool

    _children: dict[str, list[str]] | None = None

    def lookup(self, name: str) -> TocEntry | None:
        """The entry at ``name`` (hardlinks resolved to their target), None if absent."""
        target = self.hardlinks.get(name, name)
        return self.by_name.get(target)

    def children(self, name: str) -> list[str]:
        """Base names in directory ``name`` ("" is the root), sorted; [] for anything else."""
        if self._children is None:
            index: dict[str, list[str]] = {}
            for path in self.by_name:
                if path:
                    parent, _, base = path.rpartition("/")
                    index.setdefault(parent, []).append(base)
            for names in index.values():
                names.sort()
            self._children = index
        return list(self._children.get(name, []))


def _bad(name: str, i: int, what: str, ent: object = None, *, unsafe: bool = False) -> InvalidInputError:
    who = f" ({show(str(ent))})" if ent is not None else ""
    cls = UnsafeLayerError if unsafe else InvalidInputError
    return cls(f"{name}: TOC entry {i}{who}: {what}; the eStargz layer is corrupt or hostile: refusing it")


def _int(raw: dict[str, object], key: str, name: str, i: int, ent: str) -> int:
    v = raw.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, i, f"{key!r} is {v!r}, not an integer", ent)
    if v < 0:
        raise _bad(name, i, f"{key!r} is negative ({v})", ent)
    if v >= 1 << 63:
        raise _bad(name, i, f"{key!r} is out of range ({v})", ent)
    return v


def _str(raw: dict[str, object], key: str, name: str, i: int, ent: str) -> str:
    v = raw.get(key, "")
    if not isinstance(v, str):
        raise _bad(name, i, f"{key!r} is not a string", ent)
    return v


class _Interner:
    """One object per distinct value while a TOC is parsed: type names, times, owners and modes repeat across
    entries, and JSON gives each occurrence its own object (a 20,000-file layer: ~3 MB less for the same TOC)."""

    __slots__ = ("times", "values")

    def __init__(self) -> None:
        self.values: dict[object, object] = {}
        #: modtimes checked already (each distinct one is parsed once)
        self.times: dict[str, str] = {}

    def str(self, v: str) -> str:
        got = self.values.setdefault(v, v)
        assert isinstance(got, str)
        return got

    def int(self, v: int) -> int:
        if -5 <= v <= 256:  # CPython's small ints are shared already
            return v
        got = self.values.setdefault(("i", v), v)
        assert isinstance(got, int)
        return got


def _entry(r: dict[str, object], i: int, name: str, lim: Limits, memo: _Interner) -> TocEntry:
    """One raw entry, with every check that needs nothing but the entry itself (the rest: :func:`parse_toc`)."""
    rawname = r.get("name")
    if not isinstance(rawname, str):
        raise _bad(name, i, "has no name")
    typ = r.get("type")
    if typ not in _TYPES:
        raise _bad(name, i, f"unknown type {typ!r}", rawname)
    where = f"{name}: TOC entry {i} ({show(rawname)})"
    path = normalize_path(rawname, lim, where)
    ints = {k: _int(r, k, name, i, rawname) for k in _INT_FIELDS}
    modtime = _str(r, "modtime", name, i, rawname)
    if modtime and modtime not in memo.times:
        try:
            datetime.fromisoformat(modtime.replace("Z", "+00:00"))
        except ValueError:
            raise _bad(name, i, f"modtime {modtime[:40]!r} is not an RFC 3339 time", rawname) from None
        memo.times[modtime] = modtime
    digest = _str(r, "digest", name, i, rawname)
    chunk_digest = _str(r, "chunkDigest", name, i, rawname)
    size = memo.int(ints["size"])
    e = TocEntry(
        name=path, type=_TYPES[_TYPES.index(str(typ))], size=size, mode=memo.int(ints["mode"]),
        uid=memo.int(ints["uid"]), gid=memo.int(ints["gid"]), modtime=memo.times.get(modtime, ""),
        linkname=_str(r, "linkName", name, i, rawname), uname=memo.str(_str(r, "userName", name, i, rawname)),
        gname=memo.str(_str(r, "groupName", name, i, rawname)), devmajor=ints["devMajor"],
        devminor=ints["devMinor"], digest=digest, offset=ints["offset"], chunk_offset=ints["chunkOffset"],
        chunk_size=size if ints["chunkSize"] == size else ints["chunkSize"],
        chunk_digest=digest if chunk_digest == digest else chunk_digest, inner_offset=ints["innerOffset"],
    )
    if e.uid > 0xFFFFFFFE or e.gid > 0xFFFFFFFE:
        raise _bad(name, i, f"owner {e.uid}:{e.gid} is out of range", rawname)
    if e.mode > 0o177777:
        raise _bad(name, i, f"mode {e.mode:o} is out of range", rawname)
    for key in ("digest", "chunkDigest"):
        v = r.get(key)
        if v and not is_sha256(v):
            raise _bad(name, i, f"{key} {str(v)[:80]!r} is not a sha256 digest", rawname)
    xa = r.get("xattrs", {})
    if not isinstance(xa, dict):
        raise _bad(name, i, "xattrs is not an object", rawname)
    for k, v in xa.items():
        if not isinstance(v, str):
            raise _bad(name, i, f"xattr {k!r} is not base64 text", rawname)
        try:
            value = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(name, i, f"xattr {k!r} is not valid base64", rawname) from None
        check_xattr(k, value, lim, where)
        if e.xattrs is None:
            e.xattrs = {}
        e.xattrs[memo.str(k)] = value
    return e


def _loads(data: bytes, name: str, lim: Limits, memo: _Interner) -> object:
    """``json.loads`` that turns each entry object into a :class:`TocEntry` as soon as it is decoded, so the raw
    dicts of a large TOC (about 1 KB each) never exist all at once: the parse peaks near the parsed TOC's size,
    and the process does not keep the freed peak as fragmented heap. An object that is not a valid entry (or is
    not an entry: the document, xattrs) stays a dict; :func:`parse_toc` checks those with their index."""

    def hook(obj: dict[str, object]) -> object:
        if "type" not in obj or "name" not in obj:
            return obj
        try:
            return _entry(obj, 0, name, lim, memo)
        except InvalidInputError:
            return obj  # refused again by parse_toc, with the entry's index in the message

    try:
        return json.loads(data, object_hook=hook)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{name}: TOC is not valid JSON ({exc}); the eStargz layer is corrupt") from None


def parse_toc(
    data: bytes, *, toc_offset: int, name: str = "layer", limits: Limits | None = None,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
) -> Toc:
    """Parse and validate TOC JSON ``data`` of a blob whose TOC starts at ``toc_offset`` (so every data offset
    must lie before it). InvalidInputError / UnsafeLayerError for anything the rules refuse."""
    lim = limits or Limits()
    if len(data) > max_toc_size:
        raise InvalidInputError(f"{name}: TOC of {len(data)} bytes exceeds the limit of {max_toc_size} bytes; refusing")
    memo = _Interner()
    doc = _loads(data, name, lim, memo)
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("entries"), list):
        version = doc.get("version") if isinstance(doc, dict) else None
        raise InvalidInputError(f"{name}: TOC is not an eStargz TOC of version 1 (version {version!r})")
    raw_entries: list[object] = doc["entries"]
    del doc
    if len(raw_entries) > lim.max_entries:
        raise UnsafeLayerError(
            f"{name}: TOC has {len(raw_entries)} entries, more than Limits.max_entries ({lim.max_entries}); refusing"
        )
    entries: list[TocEntry] = []
    by_name: dict[str, TocEntry] = {"": TocEntry("", "dir", mode=0o755)}
    chunks: dict[str, tuple[TocEntry, ...]] = {}
    links: list[tuple[int, TocEntry]] = []
    prefetch: list[str] = []
    landmark = no_landmark = False
    current: list[TocEntry] | None = None  # chunks of the regular file being described
    last_end = (0, 0)  # (offset, inner end) of the previous chunk in blob order
    for i, r in enumerate(raw_entries):
        if isinstance(r, TocEntry):
            e = r
        elif isinstance(r, dict):
            e = _entry(r, i, name, lim, memo)  # raises: the hook kept it because it is not a valid entry
        else:
            raise _bad(name, i, "not a JSON object")
        path = rawname = e.name
        where = f"{name}: TOC entry {i} ({show(rawname)})"
        if e.type == "chunk":
            if current is None or path != current[0].name:
                raise _bad(name, i, "chunk entry does not follow the regular file (or chunk) it belongs to", rawname)
            prev = current[-1]
            if e.chunk_offset != prev.chunk_offset + prev.chunk_size:
                raise _bad(name, i, f"chunkOffset {e.chunk_offset} leaves a gap or overlaps the previous chunk "
                           f"(which ends at {prev.chunk_offset + prev.chunk_size})", rawname)
            if e.chunk_size == 0:
                e.chunk_size = current[0].size - e.chunk_offset
            e.name = current[0].name  # one string object per file, not one per chunk
            current.append(e)
        else:
            if current is not None:
                _close_file(current, chunks, name, i - 1)
                current = None
            if path == "" and e.type != "dir":
                raise _bad(name, i, f"a {e.type} cannot replace the layer root", rawname, unsafe=True)
            if e.type in ("symlink", "hardlink"):
                if not e.linkname:
                    raise _bad(name, i, f"{e.type} with an empty target", rawname)
                if len(e.linkname.encode("utf-8", "surrogateescape")) > lim.max_path_len:
                    raise _bad(name, i, "link target exceeds Limits.max_path_len", rawname, unsafe=True)
                if "\0" in e.linkname:
                    raise _bad(name, i, "NUL byte in link target", rawname, unsafe=True)
            if e.type == "hardlink":
                e.linkname = normalize_path(e.linkname, lim, where + " (hardlink target)")
                if e.linkname == "":
                    raise _bad(name, i, "hardlink to the layer root", rawname, unsafe=True)
                links.append((i, e))
            if e.type in ("char", "block") and not lim.allow_devices:
                raise _bad(name, i, "device nodes are not allowed (Limits.allow_devices)", rawname, unsafe=True)
            if e.type == "reg":
                if e.chunk_offset:
                    raise _bad(name, i, "a regular file's first chunk must start at chunkOffset 0", rawname)
                if e.size > 0:
                    if e.chunk_size == 0 or e.chunk_size > e.size:
                        e.chunk_size = e.size
                    current = [e]
                else:
                    e.chunk_size = 0
            elif e.offset or e.chunk_size or e.chunk_digest:
                raise _bad(name, i, f"a {e.type} entry carries chunk fields", rawname)
            if path == PREFETCH_LANDMARK:
                landmark = True
            elif path == NO_PREFETCH_LANDMARK:
                no_landmark = True
            elif not landmark:
                prefetch.append(path)
            by_name[path] = e
        if e.is_data and e.chunk_size:
            if (e.offset == 0 and e.inner_offset == 0) or e.offset >= toc_offset:
                raise _bad(name, i, f"chunk offset {e.offset} is outside the blob's data (which ends at the TOC, "
                           f"offset {toc_offset})", rawname)
            if e.inner_offset and e.inner_offset >= 1 << 40:
                raise _bad(name, i, f"innerOffset {e.inner_offset} is out of range", rawname)
            here = (e.offset, e.inner_offset)
            if here < last_end:
                raise _bad(name, i, f"chunk at offset {e.offset}+{e.inner_offset} overlaps or precedes the previous "
                           "chunk in the blob", rawname)
            last_end = (e.offset, e.inner_offset + e.chunk_size)
            if e.chunk_size > 1 << 40:
                raise _bad(name, i, f"chunkSize {e.chunk_size} is out of range", rawname)
        entries.append(e)
    if current is not None:
        _close_file(current, chunks, name, len(raw_entries) - 1)
    for path in list(chunks):
        if by_name.get(path) is not chunks[path][0]:
            del chunks[path]  # a later entry of that name replaced the file
    _add_parents(by_name, name)
    hardlinks = _resolve_links(links, by_name, name)
    _set_next_offsets(entries, toc_offset)
    if landmark is False:
        prefetch = []
    return Toc(entries, by_name, chunks, hardlinks, prefetch, landmark, no_landmark)


def _close_file(chunks: list[TocEntry], files: dict[str, tuple[TocEntry, ...]], name: str, i: int) -> None:
    reg = chunks[0]
    last = chunks[-1]
    if last.chunk_offset + last.chunk_size != reg.size:
        raise _bad(name, i, f"the chunks of the file cover {last.chunk_offset + last.chunk_size} bytes, but its size "
                   f"is {reg.size}", reg.name)
    for c in chunks:
        if not c.chunk_digest:
            if len(chunks) == 1 and reg.digest:
                c.chunk_digest = reg.digest  # one chunk: the file digest is the chunk digest
            else:
                raise _bad(name, i, f"chunk at file offset {c.chunk_offset} has no chunkDigest, so it cannot be "
                           "verified", reg.name)
    files[reg.name] = tuple(chunks)


def _add_parents(by_name: dict[str, TocEntry], name: str) -> None:
    for path in list(by_name):
        parts = path.split("/")
        for k in range(1, len(parts)):
            parent = "/".join(parts[:k])
            pe = by_name.get(parent)
            if pe is None:
                by_name[parent] = TocEntry(parent, "dir", mode=0o755)
            elif pe.type != "dir":
                raise UnsafeLayerError(
                    f"{name}: TOC entry {show(path)} lies below {show(parent)}, which is a {pe.type}, not a "
                    "directory; refusing the eStargz layer"
                )


def _resolve_links(links: list[tuple[int, TocEntry]], by_name: dict[str, TocEntry], name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, e in links:
        seen = {e.name}
        target = e.linkname
        while True:
            t = by_name.get(target)
            if t is None:
                raise _bad(name, i, f"hardlink target {show(target)} is not in the TOC", e.name)
            if t.type == "dir":
                raise _bad(name, i, f"hardlink target {show(target)} is a directory", e.name, unsafe=True)
            if t.type != "hardlink":
                break
            if target in seen:
                raise _bad(name, i, "hardlinks form a cycle", e.name)
            seen.add(target)
            target = t.linkname
        out[e.name] = target
    return out


def _set_next_offsets(entries: list[TocEntry], toc_offset: int) -> None:
    """Each chunk's compressed range ends where the next member with other chunks starts (chunks sharing a member,
    with different ``innerOffset``s, share its range too)."""
    nxt = seen = toc_offset
    for e in reversed(entries):
        if e.is_data and e.chunk_size:
            if e.offset < seen:
                nxt, seen = seen, e.offset
            e.next_offset = nxt
