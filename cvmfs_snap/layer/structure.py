"""Check a layer's structure without unpacking it: what ``apply_layer`` would refuse, found from the tar alone.

Some consumers never unpack a layer themselves (``cvmfs_server ingest`` reads the tar), yet must not pass on a
layer that writes through a symlink it created, hardlinks to something outside itself, or abuses whiteout names.
:class:`StructureChecker` follows the layer's own tree in memory (one small record per path) and applies the same
rules as :func:`~cvmfs_snap.layer.apply.apply_layer` in ``layer`` mode, so both paths refuse the same layers.
"""

from __future__ import annotations

from cvmfs_snap.errors import UnsafeLayerError
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.tarstream import TarEntry
from cvmfs_snap.layer.whiteout import META_PREFIX, OPAQUE_MARKER, WHITEOUT_PREFIX, is_aufs_meta

_NAMES = {"file": "regular file", "symlink": "symlink", "hardlink": "regular file", "char": "character device",
          "block": "block device", "fifo": "FIFO"}


class StructureChecker:
    """Feed every entry of one layer, in order, to :meth:`check`; it raises UnsafeLayerError like apply would."""

    def __init__(self, limits: Limits | None = None, name: str = "layer") -> None:
        self.limits = limits or Limits()
        self.name = name
        self._kinds: dict[str, str] = {}  # path -> kind, for what the layer has created so far
        self.size = 0

    def _where(self, entry: TarEntry) -> str:
        return f"{self.name}: entry {entry.display} (tar offset {entry.offset})"

    def _check_parents(self, parts: list[str], where: str) -> None:
        for i in range(1, len(parts)):
            sub = "/".join(parts[:i])
            kind = self._kinds.get(sub)
            if kind is None or kind == "dir":
                continue
            if kind == "symlink":
                raise UnsafeLayerError(
                    f"{where}: parent {sub!r} is a symlink of this layer. In layer mode each layer is stored on its "
                    "own, where such a symlink may point into a lower layer that is not there, so writing through it "
                    "is refused. Rebuild the image so that the layer does not write below its own symlink (merged, "
                    "flat unpacking follows symlinks inside the root)"
                )
            raise UnsafeLayerError(f"{where}: parent {sub!r} is a {_NAMES[kind]}, not a directory; refusing the layer")

    def check(self, entry: TarEntry) -> None:
        where = self._where(entry)
        if entry.path == "":
            return
        parts = entry.path.split("/")
        base = parts[-1]
        plain = False  # below AUFS metadata: stored as it is (layer mode, cvmfs_server ingest), checked as content
        for comp in parts[:-1]:
            if comp.startswith(META_PREFIX):
                if comp != OPAQUE_MARKER:
                    plain = True
                    break
                return
            if comp.startswith(WHITEOUT_PREFIX):
                raise UnsafeLayerError(
                    f"{where}: path goes through whiteout {comp!r}, which cannot be a directory; refusing the layer"
                )
        self._check_parents(parts, where)
        whiteout = not plain and base.startswith(WHITEOUT_PREFIX) and not is_aufs_meta(base)
        if whiteout and base != OPAQUE_MARKER:
            deleted = base[len(WHITEOUT_PREFIX) :]
            if deleted in ("", ".", ".."):
                raise UnsafeLayerError(
                    f"{where}: whiteout of {deleted!r} is not a valid name (path traversal?); refusing the layer"
                )
        kind = entry.kind
        if whiteout:
            kind = "file"
        elif kind in ("char", "block") and not self.limits.allow_devices:
            raise UnsafeLayerError(
                f"{where}: {kind} device {entry.devmajor}:{entry.devminor} refused (Limits.allow_devices is False)"
            )
        elif kind == "hardlink" and entry.linkname != entry.path:
            tparts = entry.linkname.split("/")
            self._check_parents(tparts, where + f" (hardlink target {entry.linkname!r})")
            target = self._kinds.get(entry.linkname)
            if target is None:
                raise UnsafeLayerError(
                    f"{where}: hardlink target {entry.linkname!r} does not exist in the target directory; "
                    "hardlinks may only point to files unpacked before them. Refusing the layer"
                )
            if target == "dir":
                raise UnsafeLayerError(f"{where}: hardlink to directory {entry.linkname!r}; refusing the layer")
            if target in ("char", "block") and not self.limits.allow_devices:
                raise UnsafeLayerError(
                    f"{where}: hardlink to device {entry.linkname!r} refused (Limits.allow_devices is False)"
                )
            kind = target
        elif kind == "file":
            lim = self.limits.max_total_size
            if lim is not None and self.size + entry.size > lim:
                raise UnsafeLayerError(
                    f"{where}: layer content exceeds Limits.max_total_size ({lim} bytes); refusing the layer"
                )
            self.size += entry.size
        old = self._kinds.get(entry.path)
        if old == "dir" and kind != "dir":  # a non-directory replaces a directory and everything below it
            prefix = entry.path + "/"
            for p in [p for p in self._kinds if p.startswith(prefix)]:
                del self._kinds[p]
        self._kinds[entry.path] = kind
