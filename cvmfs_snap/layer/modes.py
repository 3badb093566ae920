"""The two ways a layer is applied, one policy object each (see :mod:`cvmfs_snap.layer.apply`).

:class:`LayerMode`
    the tree as CVMFS stores one layer: whiteout files are kept as plain empty files (mode 0644, root-owned) for the
    node to turn into overlay whiteouts later, AUFS bookkeeping is kept as plain entries, and a symlink in the parent
    path of an entry is refused (it usually points into lower layers that are not there).
:class:`MergedMode`
    a flattened root filesystem built layer by layer: whiteouts delete from what the target already holds (never
    what this layer itself added), AUFS bookkeeping is skipped, parent symlinks are followed inside the root.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import ClassVar, Literal

from cvmfs_snap.errors import UnsafeLayerError
from cvmfs_snap.layer.inroot import InRoot
from cvmfs_snap.layer.rules import own_symlink_error
from cvmfs_snap.layer.tarstream import TarEntry
from cvmfs_snap.layer.whiteout import aufs_meta_prefix

log = logging.getLogger(__name__)

Mode = Literal["layer", "merged"]


class ModePolicy:
    """What differs between the modes; the applier asks its policy at each of these points."""

    name: ClassVar[Mode]
    #: AUFS bookkeeping (``.wh..wh.plnk/``, ``.wh..wh.aufs``) kept as plain entries (True) or skipped
    keeps_aufs_meta: ClassVar[bool]
    #: symlinks in an entry's parent path followed inside the root (True) or refused
    follows_symlinks: ClassVar[bool]

    def __init__(self, target: str, same_owner: bool) -> None:
        self.target = target
        self.same_owner = same_owner

    def symlink_error(self, where: str, sub: str, to: str) -> UnsafeLayerError:
        """The error for a symlink met where the walk needs a real directory."""
        raise NotImplementedError

    def added(self, path: str) -> None:
        """The layer put ``path`` (below the root, symlinks resolved) in place."""

    def check_hardlink(self, where: str, linkname: str) -> None:
        """Refuse a hardlink to ``linkname`` that this mode cannot honour."""

    def whiteout(self, dirs: InRoot, entry: TarEntry, parts: list[str], deleted: str | None, where: str) -> None:
        """Carry out the whiteout ``entry`` (path ``parts``; ``deleted`` is None for the opaque marker)."""
        raise NotImplementedError


class LayerMode(ModePolicy):
    name = "layer"
    keeps_aufs_meta = True
    follows_symlinks = False

    def symlink_error(self, where: str, sub: str, to: str) -> UnsafeLayerError:
        return own_symlink_error(where, sub, to)

    def whiteout(self, dirs: InRoot, entry: TarEntry, parts: list[str], deleted: str | None, where: str) -> None:
        base = parts[-1]
        pfd = dirs.walk(parts[:-1], True, where)
        assert pfd is not None
        dirs.remove(pfd, base, keep_dir=False, path=entry.path)
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=pfd)
        try:
            if self.same_owner:
                os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o644)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)


class MergedMode(ModePolicy):
    name = "merged"
    keeps_aufs_meta = False
    follows_symlinks = True

    def __init__(self, target: str, same_owner: bool) -> None:
        super().__init__(target, same_owner)
        # what this layer itself put in place, so that whiteouts only ever hit lower layers
        self._added: set[str] = set()
        self._ancestors: set[str] = set()

    def symlink_error(self, where: str, sub: str, to: str) -> UnsafeLayerError:
        # resolution found a real directory a moment ago: someone swapped it
        return UnsafeLayerError(
            f"{where}: {sub!r} became a symlink{to} while resolving the path; refusing to write through it. Is "
            f"another process changing {self.target}?"
        )

    def added(self, path: str) -> None:
        self._added.add(path)
        while "/" in path:
            path = path.rsplit("/", 1)[0]
            if path in self._ancestors:
                break
            self._ancestors.add(path)
        self._ancestors.add("")

    def _own(self, path: str) -> bool:
        return path in self._added or path in self._ancestors

    def check_hardlink(self, where: str, linkname: str) -> None:
        if aufs_meta_prefix(linkname.split("/")) is not None:
            raise UnsafeLayerError(
                f"{where}: hardlink into AUFS metadata ({linkname!r}), which merged mode skips; the image was "
                "committed on AUFS. Its layers can still be published in layer mode; for a flat tree, re-export the "
                "image (e.g. docker save / skopeo copy from a non-AUFS host) or skip the flat"
            )

    def whiteout(self, dirs: InRoot, entry: TarEntry, parts: list[str], deleted: str | None, where: str) -> None:
        # delete from the lower layers, never what this layer itself added. The directory resolves like any parent
        # path (symlinks followed inside the root); one that does not exist has nothing to delete.
        got = dirs.parent(parts[:-1], False, where)
        if got is None:
            return
        pfd, real = got
        if deleted is None:
            self._clear_lower(dirs, real, where)
            return
        path = "/".join([*real, deleted])
        if self._own(path):
            # the layer itself (re)created this path: the whiteout only hides what lower layers had below it
            try:
                is_dir = stat.S_ISDIR(os.lstat(deleted, dir_fd=pfd).st_mode)
            except FileNotFoundError:
                is_dir = False
            if is_dir:
                self._clear_lower(dirs, [*real, deleted], where)
            return
        dirs.remove(pfd, deleted, keep_dir=False, path=path)

    def _clear_lower(self, dirs: InRoot, dir_parts: list[str], where: str) -> None:
        """Remove everything below a directory that this layer did not add (an opaque directory)."""
        stack = [dir_parts]
        while stack:
            parts = stack.pop()
            fd = dirs.walk(parts, False, where)
            if fd is None:
                continue
            for name in os.listdir(fd):
                child = "/".join([*parts, name])
                if self._own(child):
                    if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                        stack.append([*parts, name])
                    continue
                dirs.remove(fd, name, keep_dir=False, path=child)


POLICIES: dict[str, type[ModePolicy]] = {"layer": LayerMode, "merged": MergedMode}
