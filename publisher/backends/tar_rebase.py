"""Move every member of an already validated layer tar under a directory prefix, copying data untouched.

Why: one ``cvmfs_server ingest -b .layers`` can then publish several layers (and their metadata) at once, each
under ``<xx>/<d>/layerfs/``, instead of one publish per layer. Member data, sparse maps and every header field but
the names are copied byte for byte (sparse files stay sparse, nothing is decompressed or re-encoded): each member
gets a PAX extended header whose ``path`` (and, for a hard link, ``linkpath``; for a PAX sparse file,
``GNU.sparse.name``) carries the prefixed name, which overrides the names of the original headers; GNU long-name
headers are folded into it. Symlink targets are content and stay as they are.

Only for tars that ``cvmfs_snap.layer.iter_layer`` has accepted: this reader trusts the structure it was given.
"""

from __future__ import annotations

import tarfile
from typing import BinaryIO

from cvmfs_snap.errors import InvalidInputError

BLOCK = 512
_META = (b"x", b"L", b"K")  # per-member metadata headers (b"g": global, copied as it is)
_NAME_KEYS = ("path", "linkpath", "GNU.sparse.name")


def _number(fld: bytes) -> int:
    if fld and fld[0] & 0x80:  # base-256
        return int.from_bytes(bytes([fld[0] & 0x7F]) + fld[1:], "big")
    s = fld.split(b"\0", 1)[0].strip(b" ")
    return int(s, 8) if s else 0


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise InvalidInputError(f"layer tar ends inside a member ({len(data)} of {n} bytes)")
    return data


def _copy(f: BinaryIO, out: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise InvalidInputError("layer tar ends inside a member's data")
        out.write(chunk)
        n -= len(chunk)


def parse_pax(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        rec = data[sp + 1: pos + length - 1]  # without the trailing newline
        key, _, value = rec.partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return out


def _record(key: str, value: bytes) -> bytes:
    payload = b" " + key.encode("utf-8", "surrogateescape") + b"=" + value + b"\n"
    n = len(payload) + len(str(len(payload)))
    if len(str(n)) != len(str(n - len(payload))):
        n = len(payload) + len(str(n))
    return str(n).encode() + payload


def pax_header(records: dict[str, bytes]) -> bytes:
    body = b"".join(_record(k, v) for k, v in records.items())
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type = tarfile.XHDTYPE
    ti.size = len(body)
    return ti.tobuf(tarfile.USTAR_FORMAT) + body + bytes(_padded(len(body)) - len(body))


def _normal(raw: bytes) -> bytes:
    """``./a//b/`` -> ``a/b`` (the tar was validated: no ``..``)."""
    return b"/".join(p for p in raw.split(b"/") if p not in (b"", b"."))


def _join(prefix: bytes, name: bytes) -> bytes:
    rel = _normal(name)
    return prefix + rel if rel else prefix.rstrip(b"/")


def rebase(src: BinaryIO, out: BinaryIO, prefix: str) -> None:
    """Write the members of the tar ``src`` to ``out`` under ``prefix`` (``"<xx>/<d>/layerfs/"``), without the
    end-of-archive blocks (more members may follow)."""
    pre = prefix.rstrip("/").encode("utf-8", "surrogateescape") + b"/"
    pax: dict[str, bytes] = {}
    longname = longlink = b""
    while True:
        hdr = src.read(BLOCK)
        if len(hdr) < BLOCK or hdr == bytes(BLOCK):
            return
        typ = hdr[156:157]
        size = _number(hdr[124:136])
        if typ in _META:
            data = _read_exact(src, _padded(size))[:size]
            if typ == b"x":
                pax.update(parse_pax(data))
            elif typ == b"L":
                longname = data.split(b"\0", 1)[0]
            else:
                longlink = data.split(b"\0", 1)[0]
            continue
        if typ == b"g":
            out.write(hdr)
            _copy(src, out, _padded(size))
            continue
        name = hdr[0:100].split(b"\0", 1)[0]
        if hdr[257:263] == b"ustar\0" and hdr[345:500].strip(b"\0"):
            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
        link = hdr[157:257].split(b"\0", 1)[0]
        path = pax.get("GNU.sparse.name") or pax.get("path") or longname or name
        target = pax.get("linkpath") or longlink or link
        records = {k: v for k, v in pax.items() if k not in _NAME_KEYS}
        records["path"] = _join(pre, path)
        if "GNU.sparse.name" in pax:
            records["GNU.sparse.name"] = records["path"]
        if typ == b"1":  # hard link: its target is a member of the same layer
            records["linkpath"] = _join(pre, target)
        elif typ == b"2" and (longlink or "linkpath" in pax):
            records["linkpath"] = target  # a long symlink target, as it was
        out.write(pax_header(records))
        out.write(hdr)
        if typ == b"S" and hdr[482]:  # old GNU sparse: extension blocks follow the header
            while True:
                ext = _read_exact(src, BLOCK)
                out.write(ext)
                if not ext[504]:
                    break
        data_size = int(pax["size"]) if "size" in pax else size
        if typ not in (b"1", b"2", b"3", b"4", b"5", b"6"):
            _copy(src, out, _padded(data_size))
        pax, longname, longlink = {}, b"", b""
