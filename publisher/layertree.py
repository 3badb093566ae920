"""Read a published layer tree back as layer entries, so flat trees need no second download.

Why: a flat root filesystem is all layers applied bottom-first in merged mode. Fetching the blobs again for it
doubles registry traffic (20 GB images, rate-limited registries), and spooling every blob locally until the flat
is built costs a compressed image of disk per image in flight. Every layer the flat needs is already complete in
the repository when the flat is built (new ones were just published, the others were skipped *because* they are
there), and its ``layerfs`` keeps ``.wh.*`` whiteouts as plain files -- exactly the tar form. So the tree is walked
(``fsutil.walk_fd``: no recursion, fds only) and each file, directory, symlink, device and FIFO becomes the same
:class:`~cvmfs_snap.layer.TarEntry` a tar member of it would be (numeric owner, mode, nanosecond mtime, xattrs, a
second name of an inode as a hard link, the data segments of a sparse file found with ``SEEK_DATA``/``SEEK_HOLE``),
fed to the same hardened merged-mode applier (``apply_entries``), which applies the whiteouts and opaque markers.
File data is read from the tree while the applier writes it: no archive is made and parsed in between (that was
GNU ``tar`` through a pipe, and reading the tar back in Python was most of a file-heavy flat's time).

The entries pass the same path and xattr checks as a tar's (``Limits``: name and path length, depth, entry count,
xattr names and sizes), because a tree in the repository may have been written by another tool (DUCC).
What is left out on the way: the ``.cvmfscatalog`` marker at the layer root (a CVMFS artefact, not image content),
sockets (as ``tar`` does), ``security.selinux`` (the stratum-0's own label, not the image's) and, when the tree is
read through a CVMFS mount, every ``user.*`` xattr, because the CVMFS client lists its magic attributes
(``user.hash``, ``user.pid``...) there and they cannot be told apart from an image's own.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cvmfs_snap.errors import CommandError, UnsafeLayerError
from cvmfs_snap.fsutil import walk_fd
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.paths import check_xattr, show
from cvmfs_snap.layer.tarstream import TarEntry
from cvmfs_snap.layout import CVMFS_MARKER_FILES

log = logging.getLogger(__name__)

#: xattrs never copied from a tree into a flat: the stratum-0's own SELinux label
_SKIP_XATTRS = frozenset({"security.selinux"})
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass
class TreeFile(TarEntry):
    """A regular file of a layer tree as an entry: ``read`` returns its data (the data segments back to back for
    a sparse file, as a sparse tar member's ``read`` does), from an fd opened by the walk."""

    fd: int = -1
    #: where ``read`` is: index into the segments, offset inside it
    _seg: int = 0
    _pos: int = 0
    _segments: list[tuple[int, int]] | None = None

    def read(self, n: int = 1 << 20) -> bytes:
        if self.fd < 0:
            raise RuntimeError(f"{self.display}: read after the walk moved on to the next entry")
        segs = self._segments
        if segs is None:
            segs = self._segments = self.sparse if self.sparse is not None else [(0, self.size)]
        while self._seg < len(segs):
            off, length = segs[self._seg]
            if self._pos >= length:
                self._seg, self._pos = self._seg + 1, 0
                continue
            try:
                data = os.pread(self.fd, min(n, length - self._pos), off + self._pos)
            except OSError as exc:
                raise CommandError(f"{self.display}: cannot read it from the published layer tree: "
                                   f"{exc.strerror or exc}; check that the repository is mounted and readable") from exc
            if not data:
                raise CommandError(f"{self.display}: the file became shorter while it was read (the published "
                                   "layer tree changed under the publisher)")
            self._pos += len(data)
            return data
        return b""


    def copy_to(self, fd: int) -> bool:
        """The whole (non-sparse) file into ``fd`` with ``copy_file_range``: no copy through Python."""
        if self.sparse is not None or self.fd < 0 or self._seg or self._pos:
            return False
        done = 0
        while done < self.size:
            try:
                n = os.copy_file_range(self.fd, fd, self.size - done, done, done)
            except OSError as exc:
                if done == 0 and exc.errno in _NO_COPY_RANGE:
                    return False  # another filesystem that cannot, an old kernel: the caller reads instead
                raise
            if n == 0:
                raise CommandError(f"{self.display}: the file became shorter while it was read (the published "
                                   "layer tree changed under the publisher)")
            done += n
        self._seg = 1  # read() is at the end now
        return True


#: copy_file_range cannot copy between these two files (the caller copies through ``read``)
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})


class LayerTreeEntries:
    """The entries of a published layer tree (``layerfs``), top-down, each directory's names sorted, for
    :func:`cvmfs_snap.layer.apply.apply_entries`. Iterate once; an entry's data can be read until the next one is
    asked for."""

    def __init__(self, layerfs: str | os.PathLike[str], *, user_xattrs: bool = True, name: str = "",
                 limits: Limits | None = None) -> None:
        self.root = Path(layerfs)
        self.name = name or str(self.root)
        self.user_xattrs = user_xattrs
        self.limits = limits or Limits()
        self.entries = 0

    def __iter__(self) -> Iterator[TarEntry]:
        lim = self.limits
        links: dict[tuple[int, int], str] = {}
        for rel, dfd, dirs, files in walk_fd(self.root):
            if rel == "":
                dirs[:] = [d for d in dirs if d not in CVMFS_MARKER_FILES]
                files = [f for f in files if f not in CVMFS_MARKER_FILES]
            depth = rel.count("/") + 2 if rel else 1
            if depth > lim.max_depth and (dirs or files):
                raise UnsafeLayerError(
                    f"{self.name}: {show(rel)} in the published layer tree is more than Limits.max_depth "
                    f"({lim.max_depth}) levels deep; refusing it"
                )
            prefix = rel + "/" if rel else ""
            dirs.sort()
            for base in sorted(dirs + files):
                try:
                    entry = self._entry(dfd, base, prefix + base, links)
                except OSError as exc:
                    raise CommandError(
                        f"{self.name}: cannot read {show(prefix + base)} in the published layer tree {self.root}: "
                        f"{exc.strerror or exc}; check that the repository is mounted and readable"
                    ) from exc
                if entry is None:
                    continue
                self.entries += 1
                if self.entries > lim.max_entries:
                    raise UnsafeLayerError(f"{self.name}: the published layer tree has more than {lim.max_entries} "
                                           "entries (Limits.max_entries); refusing it")
                if isinstance(entry, TreeFile):
                    try:
                        yield entry
                    finally:
                        os.close(entry.fd)
                        entry.fd = -1
                else:
                    yield entry

    def _entry(self, dfd: int, base: str, path: str, links: dict[tuple[int, int], str]) -> TarEntry | None:
        lim = self.limits
        # (a UTF-8 character is at most 4 bytes: most paths need no encoding to pass)
        if len(path) * 4 > lim.max_path_len and len(path.encode("utf-8", "surrogateescape")) > lim.max_path_len:
            raise UnsafeLayerError(f"{self._where(path)}: path exceeds Limits.max_path_len ({lim.max_path_len}); "
                                   "refusing it")
        try:
            st = os.lstat(base, dir_fd=dfd)
        except FileNotFoundError:
            raise CommandError(f"{self._where(path)} vanished while the published layer tree was read") from None
        fmt = stat.S_IFMT(st.st_mode)
        kind = _KINDS.get(fmt)
        if kind is None:
            log.debug("%s: a socket; left out, as tar does", self._where(path))
            return None
        mode = st.st_mode & 0o7777
        if kind != "dir" and st.st_nlink > 1:
            first = links.setdefault((st.st_dev, st.st_ino), path)
            if first != path:  # a second name of an inode already given: a hard link to the first (its xattrs
                # are the inode's, given with the first name; tar gives none with a link either)
                return TarEntry(path, path, "hardlink", mode, st.st_uid, st.st_gid, 0, st.st_mtime_ns,
                                linkname=first)
        if kind == "file":
            fd = os.open(base, _OPEN_FLAGS, dir_fd=dfd)
            try:
                fst = os.fstat(fd)
                if (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev) or not stat.S_ISREG(fst.st_mode):
                    raise CommandError(f"{self._where(path)} was replaced while the published layer tree was read")
                sparse = _data_segments(fd, st.st_size) if st.st_blocks * 512 < st.st_size else None
                xattrs = self._xattrs(fd, None, path)
            except BaseException:
                os.close(fd)
                raise
            return TreeFile(path, path, "file", mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                            xattrs=xattrs, sparse=sparse, fd=fd)
        linkname = os.readlink(base, dir_fd=dfd) if kind == "symlink" else ""
        major = minor = 0
        if kind in ("char", "block"):
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        return TarEntry(path, path, kind, mode, st.st_uid, st.st_gid, 0, st.st_mtime_ns, linkname=linkname,
                        devmajor=major, devminor=minor, xattrs=self._xattrs(dfd, base, path))

    def _where(self, path: str) -> str:
        """The prefix of a message about ``path`` (made only when there is one to write)."""
        return f"{self.name}: {show(path)}"

    def _xattrs(self, fd: int, base: str | None, path: str) -> dict[str, bytes]:
        """xattrs of the open file ``fd``, or of ``base`` in the directory ``fd`` (never following a symlink)."""
        target: int | str = fd if base is None else f"/proc/self/fd/{fd}/{base}"
        follow = base is None
        try:
            names = os.listxattr(target, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM):
                return {}
            raise
        out: dict[str, bytes] = {}
        for key in sorted(names):
            if key in _SKIP_XATTRS or (not self.user_xattrs and key.startswith("user.")):
                continue
            try:
                value = os.getxattr(target, key, follow_symlinks=follow)
            except OSError as exc:
                if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                    continue
                raise
            check_xattr(key, value, self.limits, self._where(path))
            out[key] = value
        return out


_KINDS = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
    stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
}


def _data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of each data segment of the file ``fd`` (``SEEK_DATA``/``SEEK_HOLE``); the whole file when
    the filesystem cannot tell."""
    segments: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to the end
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            segments.append((start, end - start))
            pos = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP):
            return [(0, size)]
        raise
    return segments


@contextmanager
def open_layer_tree(layerfs: str | os.PathLike[str], *, user_xattrs: bool = True, name: str = "",
                    limits: Limits | None = None) -> Iterator[LayerTreeEntries]:
    """The entries of a published layer tree (whiteouts as ``.wh.*`` entries), for ``apply_entries``; a tree that
    cannot be read raises :class:`CommandError` naming it."""
    root = Path(layerfs)
    what = name or str(root)
    try:
        os.listdir(root)
    except OSError as exc:
        raise CommandError(f"{what}: cannot read the published layer tree {root}: {exc.strerror}") from exc
    try:
        yield LayerTreeEntries(root, user_xattrs=user_xattrs, name=what, limits=limits)
    except OSError as exc:
        raise CommandError(
            f"{what}: reading the published layer tree {root} failed: {exc.strerror or exc} ({exc.filename or ''}); "
            "check that the repository is mounted and readable"
        ) from exc
