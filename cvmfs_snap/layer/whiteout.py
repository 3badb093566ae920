"""Whiteouts: how a layer deletes what lower layers hold.

In an image layer tar, ``dir/.wh.NAME`` deletes ``dir/NAME`` of the layers below and ``dir/.wh..wh..opq`` hides
everything the lower layers have in ``dir``. CVMFS stores a layer as a plain tree (``cvmfs_server ingest`` keeps
``.wh.*`` as ordinary empty files), so the node side needs the list of those deletions to build overlay whiteouts;
the :class:`WhiteoutIndex` is that list, written next to the layer and rebuilt from a tree with
:func:`scan_tree_whiteouts` when only the tree exists (e.g. layers published by DUCC).

Old images built on AUFS also carry AUFS bookkeeping (``.wh..wh.plnk/``, ``.wh..wh.aufs``, ``.wh..wh.orph/``). They
delete nothing and are not image content (Docker drops them on import). A tree in layer form keeps them as plain
files and directories, as ``cvmfs_server ingest`` does, so the index lists them in ``hidden`` for the node to mask.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.fsutil import walk_fd

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
#: how overlayfs marks an opaque directory (value ``y``): what ``.wh..wh..opq`` becomes on a node
OPAQUE_XATTR = "trusted.overlay.opaque"
#: AUFS bookkeeping names (``.wh..wh.plnk``, ``.wh..wh.aufs``): not deletions, never shown to containers
META_PREFIX = ".wh..wh."


def is_aufs_meta(name: str) -> bool:
    """True for an AUFS bookkeeping name (``.wh..wh.plnk``, ``.wh..wh.aufs``...), not the opaque marker."""
    return name.startswith(META_PREFIX) and name != OPAQUE_MARKER


def aufs_meta_prefix(parts: list[str] | tuple[str, ...]) -> int | None:
    """Index of the first AUFS metadata component of a path (the entry to hide), None if there is none."""
    for i, comp in enumerate(parts):
        if is_aufs_meta(comp):
            return i
    return None


def whiteout_target(base: str) -> str | None:
    """For a file name ``.wh.NAME`` the deleted ``NAME``; None if ``base`` is not a plain whiteout."""
    if not base.startswith(WHITEOUT_PREFIX) or base.startswith(META_PREFIX):
        return None
    return base[len(WHITEOUT_PREFIX) :]


def classify(path: str) -> tuple[str, str] | None:
    """What a layer member at ``path`` (normalised, relative) means for the index of a layer kept in layer form.

    ``("whiteout", deleted path)``, ``("opaque", directory)``, ``("hidden", top-most AUFS metadata path)`` or None
    (plain content, or something below an opaque marker used as a directory, which the unpacker ignores). Malformed
    whiteout names (``.wh.``, ``.wh..``) are None here: the structure check refuses them.
    """
    parts = path.split("/")
    for i, comp in enumerate(parts):
        if comp == OPAQUE_MARKER:
            if i == len(parts) - 1:
                return ("opaque", "/".join(parts[:-1]))
            return None
        if is_aufs_meta(comp):
            return ("hidden", "/".join(parts[: i + 1]))
    target = whiteout_target(parts[-1])
    if target and target not in (".", ".."):
        return ("whiteout", "/".join([*parts[:-1], target]))
    return None


def _check_rel(path: str, what: str) -> str:
    if not isinstance(path, str):
        raise InvalidInputError(f"whiteout index: {what} entry {path!r} is not a string")
    if path.startswith("/") or "\0" in path or any(p in ("..", ".") for p in path.split("/")) or "//" in path:
        raise InvalidInputError(
            f"whiteout index: {what} entry {path!r} is not a clean relative path; the index is corrupt: "
            "republish the layer"
        )
    return path


@dataclass
class WhiteoutIndex:
    """Deleted paths, opaque directories and hidden entries of one layer, relative to the layer root (``""`` = the
    root)."""

    whiteouts: list[str] = field(default_factory=list)
    opaque_dirs: list[str] = field(default_factory=list)
    #: AUFS metadata entries the layer tree keeps (``.wh..wh.plnk``, ``d/.wh..wh.aufs``): the top-most such
    #: component of each path, never what lies below it. Containers must not see them.
    hidden: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.whiteouts or self.opaque_dirs or self.hidden)

    def normalized(self) -> WhiteoutIndex:
        """Sorted, without duplicates (the order of a tar is not meaningful for whiteouts)."""
        return WhiteoutIndex(sorted(set(self.whiteouts)), sorted(set(self.opaque_dirs)), sorted(set(self.hidden)))

    def to_dict(self) -> dict[str, list[str]]:
        n = self.normalized()
        return {"whiteouts": n.whiteouts, "opaque_dirs": n.opaque_dirs, "hidden": n.hidden}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> WhiteoutIndex:
        """Parse what :meth:`to_dict` wrote; InvalidInputError on anything else."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"whiteout index: expected an object, got {type(data).__name__}")
        out = cls()
        for key, target in (("whiteouts", out.whiteouts), ("opaque_dirs", out.opaque_dirs), ("hidden", out.hidden)):
            value = data.get(key, [])
            if not isinstance(value, list):
                raise InvalidInputError(f"whiteout index: {key!r} must be a list, got {type(value).__name__}")
            for p in value:
                target.append(_check_rel(p, key))
        for key, paths in (("whiteouts", out.whiteouts), ("hidden", out.hidden)):
            if "" in paths:
                raise InvalidInputError(
                    f"whiteout index: {key!r} has an empty path (the layer root cannot be deleted or hidden); "
                    "the index is corrupt: republish the layer"
                )
        return out


def scan_tree_whiteouts(layer_dir: str | os.PathLike[str]) -> WhiteoutIndex:
    """Build the index from a layer tree that keeps ``.wh.*`` as plain files (our ``layer`` mode, DUCC, ingest).

    Symlinks are never followed, so a hostile tree cannot make the scan wander outside ``layer_dir``. AUFS metadata
    entries go to ``hidden`` and are not looked into.
    """
    idx = WhiteoutIndex()
    for rel, _fd, dirs, files in walk_fd(layer_dir):  # fd-relative: no depth or PATH_MAX limit
        for name in [d for d in dirs if is_aufs_meta(d)]:
            idx.hidden.append(f"{rel}/{name}" if rel else name)
            dirs.remove(name)
        for name in files:
            child = f"{rel}/{name}" if rel else name
            if is_aufs_meta(name):
                idx.hidden.append(child)
                continue
            if name == OPAQUE_MARKER:
                idx.opaque_dirs.append(rel)
                continue
            target = whiteout_target(name)
            if target and target not in (".", ".."):
                idx.whiteouts.append(f"{rel}/{target}" if rel else target)
    return idx.normalized()


#: the name in ARCHITECTURE.md's import line
scan_whiteouts = scan_tree_whiteouts
