"""Apply a layer tar to a directory without ever writing outside it.

Two modes:

``layer``
    the tree as CVMFS stores one layer: whiteout files (``.wh.NAME``, ``.wh..wh..opq``) are kept as plain empty
    files (mode 0644, root-owned) and returned as a :class:`WhiteoutIndex`, so that the node can build overlay
    whiteouts from them later.
``merged``
    whiteouts are applied to what the target already holds (a flattened root filesystem built layer by layer).

Safety does not rest on checking path strings. Every parent directory is opened component by component from a file
descriptor of the target root with ``O_NOFOLLOW | O_DIRECTORY`` (openat-style), so a symlink anywhere in a parent
path -- created by this layer or already in the target -- makes the write fail instead of following it. Files are
created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` after removing what was there, so an existing device node, FIFO or
symlink at that name is never opened. Writing *through* a symlink is refused even when the symlink points inside
the target: Docker-built layers never need it, and refusing is what keeps the rule simple enough to trust.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from cvmfs_snap.errors import CvmfsSnapError, FailedPreconditionError, UnsafeLayerError
from cvmfs_snap.layer.digesting import Readable
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.tarstream import TarEntry, TarReader
from cvmfs_snap.layer.whiteout import META_PREFIX, OPAQUE_MARKER, WHITEOUT_PREFIX, WhiteoutIndex

log = logging.getLogger(__name__)

Mode = Literal["layer", "merged"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_DIR_CACHE = 128
_ZEROS = bytes(_CHUNK)


@dataclass
class ApplyResult:
    """What one apply did: member count, bytes of file content, the layer's whiteouts, its diffID."""

    entries: int
    size: int
    whiteouts: WhiteoutIndex = field(default_factory=WhiteoutIndex)
    diff_id: str | None = None


class _Applier:
    def __init__(self, root_fd: int, target: str, mode: Mode, limits: Limits, same_owner: bool, name: str) -> None:
        self.root_fd = root_fd
        self.target = target
        self.mode = mode
        self.limits = limits
        self.same_owner = same_owner
        self.name = name
        self.size = 0
        self.index = WhiteoutIndex()
        self.dir_times: dict[str, int] = {}
        # merged mode: what this layer itself put in place, so that whiteouts only ever hit lower layers
        self.added: set[str] = set()
        self.ancestors: set[str] = set()
        self._warned_xattr = False
        self._dirs: OrderedDict[str, int] = OrderedDict()

    # -- walking ----------------------------------------------------------------------------------------------
    def _walk(self, parts: list[str], create: bool, where: str) -> int | None:
        """fd of the directory ``parts`` below the root, never through a symlink; None if missing (create=False).

        The fd is *borrowed* from a small cache (do not close it): tars list neighbours together, and re-opening
        every parent for every entry would double the syscalls. The cache is dropped whenever a directory is
        removed, so a cached fd never stands for a path that now names something else.
        """
        if not parts:
            return self.root_fd
        key = "/".join(parts)
        fd = self._dirs.get(key)
        if fd is not None:
            self._dirs.move_to_end(key)
            return fd
        start, base_fd = 0, self.root_fd
        for i in range(len(parts) - 1, 0, -1):  # start from the nearest cached ancestor
            anc = self._dirs.get("/".join(parts[:i]))
            if anc is not None:
                start, base_fd = i, anc
                break
        fd = os.dup(base_fd)
        try:
            for i in range(start, len(parts)):
                comp = parts[i]
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)  # independent of the process umask, as containerd's MkdirAll
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.lstat(comp, dir_fd=fd)
                    sub = "/".join(parts[: i + 1])
                    if stat.S_ISLNK(st.st_mode):
                        raise UnsafeLayerError(
                            f"{where}: parent {sub!r} is a symlink; writing through symlinks is refused because "
                            "it could escape the target directory. The layer is hostile or was built wrongly"
                        ) from None
                    raise UnsafeLayerError(
                        f"{where}: parent {sub!r} is a {_kind_of(st.st_mode)}, not a directory; refusing the layer"
                    ) from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self._dirs[key] = fd
        if len(self._dirs) > _DIR_CACHE:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    # -- metadata ---------------------------------------------------------------------------------------------
    def _set_xattrs(self, target: int | str, entry: TarEntry, follow: bool = True) -> None:
        for key, value in entry.xattrs.items():
            try:
                os.setxattr(target, key, value, follow_symlinks=follow)
            except OSError as e:
                if e.errno in (errno.ENOTSUP, errno.EPERM) and (
                    e.errno == errno.ENOTSUP or entry.kind not in ("file", "dir")
                ):
                    if not self._warned_xattr:
                        log.warning("%s: cannot set xattr %s on %s (%s); skipping such xattrs",
                                    self.name, key, entry.display, os.strerror(e.errno or 0))
                        self._warned_xattr = True
                    continue
                raise

    def _meta_fd(self, fd: int, entry: TarEntry) -> None:
        # chown first: it clears setuid/setgid and security.capability, which the following calls then set
        if self.same_owner:
            os.fchown(fd, entry.uid, entry.gid)
        self._set_xattrs(fd, entry)
        os.fchmod(fd, entry.mode)
        if entry.kind != "dir":
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))

    def _meta_at(self, pfd: int, base: str, entry: TarEntry) -> None:
        """Metadata of a symlink, device or FIFO: such files must not be opened, so use *at() calls, no follow."""
        if self.same_owner:
            os.chown(base, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        self._set_xattrs(f"/proc/self/fd/{pfd}/{base}", entry, follow=False)
        if entry.kind != "symlink":
            # we created this node a moment ago and it is not a symlink, so chmod cannot be redirected
            os.chmod(base, entry.mode, dir_fd=pfd)
        os.utime(base, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    # -- entries ----------------------------------------------------------------------------------------------
    def _where(self, entry: TarEntry) -> str:
        return f"{self.name}: entry {entry.display} (tar offset {entry.offset})"

    def _record_added(self, path: str) -> None:
        if self.mode != "merged":
            return
        self.added.add(path)
        while "/" in path:
            path = path.rsplit("/", 1)[0]
            if path in self.ancestors:
                break
            self.ancestors.add(path)
        self.ancestors.add("")

    def apply(self, entry: TarEntry) -> None:
        where = self._where(entry)
        if entry.path == "":
            self._meta_fd(self.root_fd, entry)
            self.dir_times[""] = entry.mtime_ns
            return
        parts = entry.path.split("/")
        base = parts[-1]
        for comp in parts[:-1]:
            if comp.startswith(META_PREFIX):
                log.debug("%s: ignoring entry below AUFS metadata directory", where)
                return
            if comp.startswith(WHITEOUT_PREFIX):
                raise UnsafeLayerError(
                    f"{where}: path goes through whiteout {comp!r}, which cannot be a directory; refusing the layer"
                )
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(entry, parts, where)
            return
        pfd = self._walk(parts[:-1], True, where)
        assert pfd is not None
        self._create(pfd, base, entry, where)
        self._record_added(entry.path)

    def _clear(self, pfd: int, base: str, keep_dir: bool, path: str) -> bool:
        """Remove what is at ``base`` (a directory recursively) unless keep_dir and it is a directory.

        ``path`` is the same thing relative to the root (to drop cached fds below it). Returns True if a directory
        was kept.
        """
        try:
            st = os.lstat(base, dir_fd=pfd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            for key in [k for k in self._dirs if k == path or k.startswith(path + "/")]:
                os.close(self._dirs.pop(key))
            shutil.rmtree(base, dir_fd=pfd)
        else:
            os.unlink(base, dir_fd=pfd)
        return False

    def _create(self, pfd: int, base: str, entry: TarEntry, where: str) -> None:
        kind = entry.kind
        if kind == "dir":
            if not self._clear(pfd, base, keep_dir=True, path=entry.path):
                os.mkdir(base, 0o700, dir_fd=pfd)
            dfd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
            try:
                self._meta_fd(dfd, entry)
            finally:
                os.close(dfd)
            self.dir_times[entry.path] = entry.mtime_ns
        elif kind == "file":
            lim = self.limits.max_total_size
            if lim is not None and self.size + entry.size > lim:
                raise UnsafeLayerError(
                    f"{where}: layer content exceeds Limits.max_total_size ({lim} bytes); refusing the layer"
                )
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(base, flags, 0o600, dir_fd=pfd)
            except FileExistsError:  # O_EXCL: whatever is there (device, FIFO, symlink) is never opened
                self._clear(pfd, base, keep_dir=False, path=entry.path)
                fd = os.open(base, flags, 0o600, dir_fd=pfd)
            try:
                self._write(fd, entry)
                self._meta_fd(fd, entry)
            finally:
                os.close(fd)
            self.size += entry.size
        elif kind == "symlink":
            self._clear(pfd, base, keep_dir=False, path=entry.path)
            os.symlink(entry.linkname, base, dir_fd=pfd)
            self._meta_at(pfd, base, entry)
        elif kind == "hardlink":
            self._hardlink(pfd, base, entry, where)
        elif kind in ("char", "block", "fifo"):
            if kind != "fifo" and not self.limits.allow_devices:
                raise UnsafeLayerError(
                    f"{where}: {kind} device {entry.devmajor}:{entry.devminor} refused (Limits.allow_devices is "
                    "False)"
                )
            self._clear(pfd, base, keep_dir=False, path=entry.path)
            try:
                if kind == "fifo":
                    os.mkfifo(base, 0o600, dir_fd=pfd)
                else:
                    ftype = stat.S_IFCHR if kind == "char" else stat.S_IFBLK
                    os.mknod(base, ftype | 0o600, os.makedev(entry.devmajor, entry.devminor), dir_fd=pfd)
            except PermissionError:
                raise FailedPreconditionError(
                    f"{where}: not allowed to create a {kind} node here; unpack as root outside a user namespace, "
                    "or set Limits(allow_devices=False) to refuse such layers"
                ) from None
            self._meta_at(pfd, base, entry)
        else:  # pragma: no cover - TarReader only yields the kinds above
            raise UnsafeLayerError(f"{where}: unsupported entry kind {kind}")

    def _write(self, fd: int, entry: TarEntry) -> None:
        if entry.sparse is not None:
            self._write_sparse(fd, entry, entry.sparse)
            return
        pos = 0
        holes = False
        while True:
            chunk = entry.read(_CHUNK)
            if not chunk:
                break
            n = len(chunk)
            if n >= 4096 and _ZEROS.startswith(chunk):  # a memcmp, no copy; fails fast on real data
                os.lseek(fd, n, os.SEEK_CUR)  # leave a hole: big zero-filled files cost no disk
                holes = True
            else:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            pos += n
        if holes:
            os.ftruncate(fd, pos)

    @staticmethod
    def _write_sparse(fd: int, entry: TarEntry, segments: list[tuple[int, int]]) -> None:
        for off, n in segments:
            os.lseek(fd, off, os.SEEK_SET)
            while n:
                chunk = entry.read(min(n, _CHUNK))
                if not chunk:  # TarReader raises on truncation; this only guards a map/data mismatch
                    raise UnsafeLayerError(f"entry {entry.display}: sparse data shorter than its map")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                n -= len(chunk)
        os.ftruncate(fd, entry.size)

    def _hardlink(self, pfd: int, base: str, entry: TarEntry, where: str) -> None:
        if entry.linkname == entry.path:
            log.debug("%s: hardlink to itself, nothing to do", where)
            return
        tparts = entry.linkname.split("/")
        tpfd = self._walk(tparts[:-1], False, where + f" (hardlink target {entry.linkname!r})")
        if tpfd is None:
            raise UnsafeLayerError(
                f"{where}: hardlink target {entry.linkname!r} does not exist in the target directory; hardlinks "
                "may only point to files unpacked before them. Refusing the layer"
            )
        try:
            st = os.lstat(tparts[-1], dir_fd=tpfd)
        except FileNotFoundError:
            raise UnsafeLayerError(
                f"{where}: hardlink target {entry.linkname!r} does not exist in the target directory; "
                "hardlinks may only point to files unpacked before them. Refusing the layer"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeLayerError(f"{where}: hardlink to directory {entry.linkname!r}; refusing the layer")
        if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and not self.limits.allow_devices:
            raise UnsafeLayerError(f"{where}: hardlink to device {entry.linkname!r} refused "
                                   "(Limits.allow_devices is False)")
        try:
            dst = os.lstat(base, dir_fd=pfd)
            if dst.st_ino == st.st_ino and dst.st_dev == st.st_dev:
                return  # already that file
        except FileNotFoundError:
            pass
        if entry.linkname.startswith(entry.path + "/"):
            raise UnsafeLayerError(f"{where}: hardlink to {entry.linkname!r}, inside itself; refusing the layer")
        self._clear(pfd, base, keep_dir=False, path=entry.path)
        os.link(tparts[-1], base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)

    # -- whiteouts --------------------------------------------------------------------------------------------
    def _whiteout(self, entry: TarEntry, parts: list[str], where: str) -> None:
        base = parts[-1]
        parent = "/".join(parts[:-1])
        if base == OPAQUE_MARKER:
            self.index.opaque_dirs.append(parent)
            deleted = None
        elif base.startswith(META_PREFIX):
            log.debug("%s: ignoring AUFS metadata entry", where)
            return
        else:
            deleted = base[len(WHITEOUT_PREFIX) :]
            if deleted in ("", ".", ".."):
                raise UnsafeLayerError(
                    f"{where}: whiteout of {deleted!r} is not a valid name (path traversal?); refusing the layer"
                )
            self.index.whiteouts.append(f"{parent}/{deleted}" if parent else deleted)
        if self.mode == "layer":
            pfd = self._walk(parts[:-1], True, where)
            assert pfd is not None
            self._clear(pfd, base, keep_dir=False, path=entry.path)
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=pfd)
            try:
                if self.same_owner:
                    os.fchown(fd, 0, 0)
                os.fchmod(fd, 0o644)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
            return
        # merged: delete from the lower layers, never what this layer itself added
        if deleted is None:
            self._clear_lower(parts[:-1], where)
            return
        path = f"{parent}/{deleted}" if parent else deleted
        pfd = self._walk(parts[:-1], False, where)
        if pfd is None:
            return
        if path in self.added or path in self.ancestors:
            # the layer itself (re)created this path: the whiteout only hides what lower layers had below it
            try:
                is_dir = stat.S_ISDIR(os.lstat(deleted, dir_fd=pfd).st_mode)
            except FileNotFoundError:
                is_dir = False
            if is_dir:
                self._clear_lower([*parts[:-1], deleted], where)
            return
        self._clear(pfd, deleted, keep_dir=False, path=path)

    def _clear_lower(self, dir_parts: list[str], where: str) -> None:
        """Remove everything below a directory that this layer did not add (an opaque directory)."""
        stack = [dir_parts]
        while stack:
            parts = stack.pop()
            fd = self._walk(parts, False, where)
            if fd is None:
                continue
            for name in os.listdir(fd):
                child = "/".join([*parts, name])
                if child in self.added or child in self.ancestors:
                    if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                        stack.append([*parts, name])
                    continue
                self._clear(fd, name, keep_dir=False, path=child)

    def finish(self) -> None:
        """Directory mtimes last, deepest first: creating children changed them while unpacking."""
        for path, mtime in sorted(self.dir_times.items(), key=lambda kv: -kv[0].count("/") - bool(kv[0])):
            try:
                fd = self._walk(path.split("/") if path else [], False, path)
            except UnsafeLayerError:
                continue  # replaced by a symlink or file later in the layer
            if fd is not None:
                os.utime(fd, ns=(mtime, mtime))


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISREG, "regular file"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "non-directory"


def apply_layer(
    tar_stream: Readable,
    target: str | os.PathLike[str],
    mode: Mode = "layer",
    limits: Limits | None = None,
    same_owner: bool = True,
    *,
    name: str | None = None,
) -> ApplyResult:
    """Unpack an uncompressed layer tar (e.g. from :func:`open_layer`) into the existing directory ``target``.

    ``mode`` is ``"layer"`` (keep ``.wh.*`` files, return their index) or ``"merged"`` (apply them to what
    ``target`` holds). ``same_owner`` keeps numeric uid/gid (never looked up by name). ``name`` (e.g. the layer
    digest; by default the stream's own ``name``) goes into error messages. Hostile layers raise
    :class:`UnsafeLayerError`, malformed ones :class:`InvalidInputError`; a failed apply leaves a partial tree
    inside ``target`` (nothing outside it), which the caller should remove.
    """
    if mode not in ("layer", "merged"):
        raise ValueError(f"mode must be 'layer' or 'merged', not {mode!r}")
    limits = limits or Limits()
    if name is None:
        name = str(getattr(tar_stream, "name", None) or "layer")
    tgt = os.fspath(target)
    try:
        root_fd = os.open(tgt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise FailedPreconditionError(f"{name}: cannot open target directory {tgt}: {e.strerror}") from None
    applier = _Applier(root_fd, tgt, mode, limits, same_owner, name)
    reader = TarReader(tar_stream, limits, name)
    current: TarEntry | None = None
    try:
        for current in reader:
            applier.apply(current)
        current = None
        applier.finish()
    except CvmfsSnapError:
        raise
    except OSError as e:
        what = f"entry {current.display} (tar offset {current.offset})" if current else "finishing"
        raise FailedPreconditionError(
            f"{name}: {what}: cannot write under {tgt}: {e.strerror or e} ({e.filename or ''}); check free space, "
            "permissions and that the target filesystem supports the file types and xattrs of the image"
        ) from e
    finally:
        applier.close()
        os.close(root_fd)
    return ApplyResult(
        entries=reader.entries,
        size=applier.size,
        whiteouts=applier.index.normalized(),
        diff_id=reader.diff_id,
    )
