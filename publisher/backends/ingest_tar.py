"""The tars the cvmfs backends feed to ``cvmfs_server ingest``: a validated layer spool and small metadata tars.

Why a spool: hostile tars must never reach ``cvmfs_server``, and an ingest cannot be stopped half-way without
publishing something. So the decompressed tar is checked entry by entry (``cvmfs_snap.layer.iter_layer``, the same
verdict ``apply_layer`` would give) while it is written to a file in the state directory, the whiteout index is
computed on the way, the diffID is checked, and only then is the spool streamed into ``ingest``. Local disk of one
uncompressed layer per worker, never memory.

What ingest does with a tar (CVMFS-FACTS) and what we do about it:

- ``<base_dir>`` itself and every directory ingest creates without a tar entry are recorded with uid/gid
  4294967295, and a directory so recorded can never be modified by a later transaction. So the backend adds
  root-owned entries (0755, as containerd creates them) for the layer directory, ``layerfs`` and each directory
  the layer implies without listing it (``SpooledLayer.implied_dirs``); the tar's own entries come after and win.
- Extended attributes are dropped and hard links become separate files. Both are recorded in ``layer.json``
  (``xattrs``, ``hardlinks``) so that a node can give containers what containerd would have (see docs/layout.md).
  ``security.selinux`` is not recorded: it is the label of the machine that built the image, not image content.
"""

from __future__ import annotations

import base64
import json
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layout import LAYERFS, LayerRecord, digest_hex

from ..workers import offloadable
from .base import LayerInfo, TarStream, check_diff_id, new_record, write_atomic
from .tar_rebase import rebase

#: xattrs that are not image content
_IGNORED_XATTRS = frozenset({"security.selinux"})


@dataclass
class SpooledLayer:
    record: LayerRecord
    spool: Path
    #: directories the layer implies without listing them (recorded root 0755 through the prefix)
    implied_dirs: list[str] = field(default_factory=list)


class _Tee:
    def __init__(self, src: TarStream, sink: BinaryIO) -> None:
        self._src, self._sink = src, sink

    def read(self, n: int = -1, /) -> bytes:
        data = self._src.read(n)
        if data:
            self._sink.write(data)
        return data

    @property
    def diff_id(self) -> str | None:
        """The source's digest: the tar reader on top need not hash the tar again (cvmfs_snap.layer.digesting)."""
        return getattr(self._src, "diff_id", None)


def spool_and_validate(info: LayerInfo, tar: TarStream, spool: Path, limits: Limits | None = None) -> SpooledLayer:
    """Copy the tar to ``spool`` while checking every entry (hostile tars raise UnsafeLayerError) and collecting
    whiteouts, xattrs and hard links; check the diffID. Nothing reaches ``cvmfs_server`` before this returned."""
    from cvmfs_snap.layer import iter_layer
    from cvmfs_snap.layer.digesting import HashingReader
    from cvmfs_snap.layer.whiteout import classify

    found: dict[str, list[str]] = {"whiteout": [], "opaque": [], "hidden": []}
    xattrs: dict[str, dict[str, str]] = {}
    hardlinks: list[list[str]] = []
    explicit_dirs: set[str] = set()
    parents: set[str] = set()
    entries = 0
    reader = HashingReader(tar)
    with open(spool, "wb") as f:
        tee = _Tee(reader, f)
        for entry in iter_layer(tee, limits, name=info.digest):
            entries += 1
            path = entry.path
            meaning = classify(path)  # the same index apply_layer(mode="layer") returns
            if meaning is not None:
                found[meaning[0]].append(meaning[1])
            if entry.kind == "dir":
                explicit_dirs.add(path)
            elif entry.kind == "hardlink":
                hardlinks.append([path, entry.linkname])
            kept = {k: base64.b64encode(v).decode() for k, v in entry.xattrs.items() if k not in _IGNORED_XATTRS}
            if kept and path:
                xattrs[path] = kept
            head = path.rpartition("/")[0]
            while head and head not in parents:
                parents.add(head)
                head = head.rpartition("/")[0]
            while entry.read(1 << 20):
                pass
        while tee.read(1 << 20):
            pass
    check_diff_id(info, reader.digest)
    rec = new_record(info, reader.digest or "", reader.size, entries, found["whiteout"], found["opaque"],
                     found["hidden"])
    rec.xattrs = xattrs
    rec.hardlinks = hardlinks
    implied = sorted(parents - explicit_dirs)
    return SpooledLayer(rec, spool, implied)


def _dir_info(name: str, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o755
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = mtime
    return ti


def _buf(ti: tarfile.TarInfo) -> bytes:
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def entries_tar(files: Iterable[tuple[str, bytes]], dirs: Iterable[str] = ()) -> bytes:
    """Tar entries (no end-of-archive blocks) of root-owned directories (0755), then regular files (0644)."""
    now = int(time.time())
    out = [_buf(_dir_info(d.rstrip("/") + "/", now)) for d in dirs]
    for name, data in files:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mode = 0o644
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = now
        out += [_buf(ti), data, bytes(-len(data) % 512)]
    return b"".join(out)


#: the end of a tar archive
END_OF_ARCHIVE = bytes(1024)


def files_tar(files: Iterable[tuple[str, bytes]], dirs: Iterable[str] = ()) -> bytes:
    """A complete tar of root-owned directories (0755) then regular files (0644), in the order given."""
    return entries_tar(files, dirs) + END_OF_ARCHIVE


#: in a staging directory prepared by :func:`prepare_layer`
REBASED_TAR = "rebased.tar"
QUEUE_ITEM = "item.json"


@offloadable  # runs in a layer worker process when the pipeline has them (publisher.workers)
def prepare_layer(info: LayerInfo, tar: TarStream, stage: Path, limits: Limits | None = None) -> LayerRecord:
    """Everything one queued layer needs, below ``stage``: the validated tar with its members under
    ``<xx>/<d>/layerfs/`` (``rebased.tar``) and ``item.json`` (record, origin, implied directories), written last.
    Nothing reaches ``cvmfs_server`` before this returned."""
    hexd = digest_hex(info.digest)
    stage.mkdir(parents=True, exist_ok=True)
    spooled = spool_and_validate(info, tar, stage / "layer.tar", limits)
    with open(spooled.spool, "rb") as src, open(stage / REBASED_TAR, "wb") as out:
        rebase(src, out, f"{hexd[:2]}/{hexd}/{LAYERFS}/")
    spooled.spool.unlink()
    body = {"record": json.loads(spooled.record.to_json()), "origin": list(info.origin),
            "implied_dirs": spooled.implied_dirs}
    write_atomic(stage / QUEUE_ITEM, json.dumps(body).encode())
    return spooled.record
