"""Check a layer's structure without unpacking it: what ``apply_layer`` would refuse, found from the tar alone.

Some consumers never unpack a layer themselves (``cvmfs_server ingest`` reads the tar), yet must not pass on a
layer that writes through a symlink it created, hardlinks to something outside itself, or abuses whiteout names.
:class:`StructureChecker` follows the layer's own tree in memory (one small record per path) and applies the same
rules as :func:`~cvmfs_snap.layer.apply.apply_layer` in ``layer`` mode (:mod:`cvmfs_snap.layer.rules`, written once
for both), so both paths refuse the same layers.
"""

from __future__ import annotations

from collections.abc import Iterator

from cvmfs_snap.layer.digesting import Readable
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.rules import (
    check_device,
    check_hardlink_target,
    check_total_size,
    hardlink_missing_error,
    not_a_directory_error,
    own_symlink_error,
    place,
    where_of,
)
from cvmfs_snap.layer.tarstream import TarEntry, TarReader

_NAMES = {"file": "regular file", "symlink": "symlink", "hardlink": "regular file", "char": "character device",
          "block": "block device", "fifo": "FIFO"}


class StructureChecker:
    """Feed every entry of one layer, in order, to :meth:`check`; it raises UnsafeLayerError like apply would."""

    def __init__(self, limits: Limits | None = None, name: str = "layer") -> None:
        self.limits = limits or Limits()
        self.name = name
        self._kinds: dict[str, str] = {}  # path -> kind, for what the layer has created so far
        self.size = 0

    def _check_parents(self, parts: list[str], where: str) -> None:
        for i in range(1, len(parts)):
            sub = "/".join(parts[:i])
            kind = self._kinds.get(sub)
            if kind is None or kind == "dir":
                continue
            if kind == "symlink":
                raise own_symlink_error(where, sub)
            raise not_a_directory_error(where, sub, _NAMES[kind])

    def check(self, entry: TarEntry) -> None:
        where = where_of(self.name, entry)
        if entry.path == "":
            return
        parts = entry.path.split("/")
        placed = place(parts, where, keep_aufs_meta=True)  # layer mode, as cvmfs_server ingest stores the layer
        if placed.action == "skip":
            return
        self._check_parents(parts, where)
        kind = entry.kind
        if placed.action == "whiteout":
            kind = "file"
        elif kind in ("char", "block"):
            check_device(where, entry, self.limits)
        elif kind == "hardlink" and entry.linkname != entry.path:
            self._check_parents(entry.linkname.split("/"), where + f" (hardlink target {entry.linkname!r})")
            target = self._kinds.get(entry.linkname)
            if target is None:
                raise hardlink_missing_error(where, entry.linkname)
            check_hardlink_target(where, entry.linkname, target == "dir", target in ("char", "block"), self.limits)
            kind = target
        elif kind == "file":
            check_total_size(where, self.size, entry, self.limits)
            self.size += entry.size
        old = self._kinds.get(entry.path)
        if old == "dir" and kind != "dir":  # a non-directory replaces a directory and everything below it
            prefix = entry.path + "/"
            for p in [p for p in self._kinds if p.startswith(prefix)]:
                del self._kinds[p]
        self._kinds[entry.path] = kind


def iter_layer(
    stream: Readable, limits: Limits | None = None, name: str = "layer", *, check_structure: bool = True
) -> Iterator[TarEntry]:
    """Checked members of an uncompressed layer tar (see :class:`~cvmfs_snap.layer.tarstream.TarReader`).

    With ``check_structure`` (the default) the layer is also checked as a whole, as a standalone layer, the way
    ``apply_layer`` in ``layer`` mode would (no writing through its own symlinks, hardlinks only to its own
    earlier files, sane whiteout names): for consumers that hand the tar to another tool instead of unpacking it.
    """
    reader = TarReader(stream, limits, name)
    if not check_structure:
        yield from reader
        return
    checker = StructureChecker(limits, name)
    for entry in reader:
        checker.check(entry)
        yield entry
