"""Whiteouts: how a layer deletes what lower layers hold.

In an image layer tar, ``dir/.wh.NAME`` deletes ``dir/NAME`` of the layers below and ``dir/.wh..wh..opq`` hides
everything the lower layers have in ``dir``. CVMFS stores a layer as a plain tree (``cvmfs_server ingest`` keeps
``.wh.*`` as ordinary empty files), so the node side needs the list of those deletions to build overlay whiteouts;
the :class:`WhiteoutIndex` is that list, written next to the layer and rebuilt from a tree with
:func:`scan_tree_whiteouts` when only the tree exists (e.g. layers published by DUCC).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cvmfs_snap.errors import InvalidInputError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
#: AUFS bookkeeping names (``.wh..wh.plnk``, ``.wh..wh.aufs``): not deletions, ignored as containerd does
META_PREFIX = ".wh..wh."


def whiteout_target(base: str) -> str | None:
    """For a file name ``.wh.NAME`` the deleted ``NAME``; None if ``base`` is not a plain whiteout."""
    if not base.startswith(WHITEOUT_PREFIX) or base.startswith(META_PREFIX):
        return None
    return base[len(WHITEOUT_PREFIX) :]


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
    """Deleted paths and opaque directories of one layer, relative to the layer root (``""`` = the root)."""

    whiteouts: list[str] = field(default_factory=list)
    opaque_dirs: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.whiteouts or self.opaque_dirs)

    def normalized(self) -> WhiteoutIndex:
        """Sorted, without duplicates (the order of a tar is not meaningful for whiteouts)."""
        return WhiteoutIndex(sorted(set(self.whiteouts)), sorted(set(self.opaque_dirs)))

    def to_dict(self) -> dict[str, list[str]]:
        n = self.normalized()
        return {"whiteouts": n.whiteouts, "opaque_dirs": n.opaque_dirs}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> WhiteoutIndex:
        """Parse what :meth:`to_dict` wrote; InvalidInputError on anything else."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"whiteout index: expected an object, got {type(data).__name__}")
        out = cls()
        for key, target in (("whiteouts", out.whiteouts), ("opaque_dirs", out.opaque_dirs)):
            value = data.get(key, [])
            if not isinstance(value, list):
                raise InvalidInputError(f"whiteout index: {key!r} must be a list, got {type(value).__name__}")
            for p in value:
                target.append(_check_rel(p, key))
        for p in out.whiteouts:
            if not p:
                raise InvalidInputError("whiteout index: 'whiteouts' has an empty path (the root cannot be deleted)")
        return out


def scan_tree_whiteouts(layer_dir: str | os.PathLike[str]) -> WhiteoutIndex:
    """Build the index from a layer tree that keeps ``.wh.*`` as plain files (our ``layer`` mode, DUCC, ingest).

    Symlinks are never followed, so a hostile tree cannot make the scan wander outside ``layer_dir``.
    """
    idx = WhiteoutIndex()
    root = os.fspath(layer_dir)
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for de in it:
                child = f"{rel}/{de.name}" if rel else de.name
                if de.is_dir(follow_symlinks=False):
                    stack.append(child)
                    continue
                if de.name == OPAQUE_MARKER:
                    idx.opaque_dirs.append(rel)
                    continue
                target = whiteout_target(de.name)
                if target and target not in (".", ".."):
                    idx.whiteouts.append(f"{rel}/{target}" if rel else target)
    return idx.normalized()


#: the name in ARCHITECTURE.md's import line
scan_whiteouts = scan_tree_whiteouts
