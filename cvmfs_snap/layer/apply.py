"""Apply a layer tar to a directory without ever writing outside it.

Two modes:

``layer``
    the tree as CVMFS stores one layer: whiteout files (``.wh.NAME``, ``.wh..wh..opq``) are kept as plain empty
    files (mode 0644, root-owned) and returned as a :class:`WhiteoutIndex`, so that the node can build overlay
    whiteouts from them later.
``merged``
    whiteouts are applied to what the target already holds (a flattened root filesystem built layer by layer).

Safety does not rest on checking path strings. Every directory is opened component by component from a file
descriptor of the target root with ``O_NOFOLLOW | O_DIRECTORY`` (openat-style). Files are created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` after removing what was there, so an existing device node, FIFO or symlink at that
name is never opened: the last component of an entry is never followed (a tar entry replaces a symlink at its own
path, as in containerd). Symlinks in the *parent* path of an entry (or of a hardlink target) depend on the mode:

``merged``
    followed, but only inside the target, the way containerd resolves a parent path on a merged view (continuity's
    ``fs.RootPath``; securejoin, ``openat2(RESOLVE_IN_ROOT)``): each component is looked up with ``lstat`` from the
    root, a symlink's target is spliced in, an absolute target restarts at the root and ``..`` stops at the root;
    more than :data:`MAX_SYMLINKS` symlinks in one path is an error (ELOOP). The result is a list of real
    directories below the root, opened again with ``O_NOFOLLOW``, so the write lands inside the target whatever the
    symlinks say. Real images need this: a usrmerge base layer has ``lib -> usr/lib`` and a later tar-built layer
    adds ``lib/x86_64-linux-gnu/libfoo.so``.
``layer``
    refused. A layer tree is stored on its own, and its symlinks usually point into lower layers that are not
    there, so following them would put files where the image does not expect them.

AUFS bookkeeping entries (``.wh..wh.plnk/``, ``.wh..wh.aufs``) are skipped in ``merged`` mode and stored as plain
entries in ``layer`` mode (as ``cvmfs_server ingest`` stores them), listed in ``WhiteoutIndex.hidden``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from cvmfs_snap.errors import CvmfsSnapError, FailedPreconditionError, UnsafeLayerError
from cvmfs_snap.fsutil import remove_tree_at
from cvmfs_snap.layer.digesting import HashingReader, Readable
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.tarstream import TarEntry, TarReader
from cvmfs_snap.layer.whiteout import (
    META_PREFIX,
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    WhiteoutIndex,
    aufs_meta_prefix,
    is_aufs_meta,
)

log = logging.getLogger(__name__)

Mode = Literal["layer", "merged"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_DIR_CACHE = 128
_ZEROS = bytes(_CHUNK)
#: symlinks followed while resolving one path in merged mode (Linux's MAXSYMLINKS); more is ELOOP
MAX_SYMLINKS = 40


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
                        raise self._symlink_error(fd, comp, sub, where) from None
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

    def _symlink_error(self, fd: int, comp: str, sub: str, where: str) -> UnsafeLayerError:
        try:
            to = f" (to {os.readlink(comp, dir_fd=fd)!r})"
        except OSError:
            to = ""
        if self.mode == "layer":
            return UnsafeLayerError(
                f"{where}: parent {sub!r} is a symlink{to} of this layer. In layer mode each layer is stored on its "
                "own, where such a symlink may point into a lower layer that is not there, so writing through it is "
                "refused. Rebuild the image so that the layer does not write below its own symlink (merged, flat "
                "unpacking follows symlinks inside the root)"
            )
        return UnsafeLayerError(
            f"{where}: {sub!r} became a symlink{to} while resolving the path; refusing to write through it. Is "
            f"another process changing {self.target}?"
        )

    def _parent(self, parts: list[str], create: bool, where: str) -> tuple[int, list[str]] | None:
        """fd and real path (components below the root) of the directory named by ``parts``; None if it does not
        exist and ``create`` is False. In merged mode symlinks on the way are resolved inside the root (see the
        module docstring); in layer mode a symlink is refused. The fd is borrowed, as from :meth:`_walk`."""
        if self.mode == "layer" or not parts or "/".join(parts) in self._dirs:
            # a cached fd is a real directory reached without symlinks: no resolution needed
            fd = self._walk(parts, create, where)
            return None if fd is None else (fd, parts)
        real = self._resolve(parts, create, where)
        if real is None:
            return None
        fd = self._walk(real, create, where)
        return None if fd is None else (fd, real)

    def _resolve(self, parts: list[str], create: bool, where: str) -> list[str] | None:
        """The real directories ``parts`` leads to, following symlinks but never above the root (merged mode).

        Components that do not exist are kept as they are (created later when ``create``), as containerd does; a
        dangling symlink thus leads to directories created inside the root. None if missing and not ``create``.
        """
        todo = list(reversed(parts))
        cur: list[str] = []
        known = 0  # how many leading components of cur exist as real directories
        links = 0
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                if cur:  # at the root, ".." stays at the root
                    cur.pop()
                    known = min(known, len(cur))
                continue
            if known == len(cur):
                pfd = self._walk(cur, False, where)
                st: os.stat_result | None = None
                if pfd is not None:
                    with contextlib.suppress(FileNotFoundError):
                        st = os.lstat(comp, dir_fd=pfd)
                if st is None:
                    if not create:
                        return None
                elif stat.S_ISLNK(st.st_mode):
                    assert pfd is not None
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise UnsafeLayerError(
                            f"{where}: more than {MAX_SYMLINKS} symlinks while resolving {'/'.join(parts)!r} (a "
                            "symlink loop, ELOOP); refusing the layer"
                        )
                    target = os.readlink(comp, dir_fd=pfd)
                    if target.startswith("/"):
                        cur, known = [], 0
                    todo.extend(reversed(target.split("/")))
                    continue
                elif stat.S_ISDIR(st.st_mode):
                    known += 1
                else:
                    sub = "/".join([*cur, comp])
                    via = "" if sub == "/".join(parts[: len(cur) + 1]) else " (after following symlinks)"
                    raise UnsafeLayerError(
                        f"{where}: parent {sub!r}{via} is a {_kind_of(st.st_mode)}, not a directory; refusing the "
                        "layer"
                    )
            elif not create:
                return None
            cur.append(comp)
        return cur

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
        plain = False  # below an AUFS metadata directory in layer mode: stored as it is, nothing interpreted
        for i, comp in enumerate(parts[:-1]):
            if comp.startswith(META_PREFIX):
                if self.mode == "layer" and comp != OPAQUE_MARKER:
                    plain = True  # the directory may come without an entry of its own: hide it anyway
                    self.index.hidden.append("/".join(parts[: i + 1]))
                    break
                log.debug("%s: ignoring entry below AUFS metadata directory", where)
                return
            if comp.startswith(WHITEOUT_PREFIX):
                raise UnsafeLayerError(
                    f"{where}: path goes through whiteout {comp!r}, which cannot be a directory; refusing the layer"
                )
        if not plain and base.startswith(WHITEOUT_PREFIX):
            if not is_aufs_meta(base):
                self._whiteout(entry, parts, where)
                return
            if self.mode == "merged":
                log.debug("%s: ignoring AUFS metadata entry", where)
                return
            self.index.hidden.append(entry.path)  # layer mode: kept as the tar has it, hidden on the node
        got = self._parent(parts[:-1], True, where)
        assert got is not None
        pfd, real = got
        path = "/".join([*real, base])
        self._create(pfd, base, path, real, entry, where)
        self._record_added(path)

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
            remove_tree_at(pfd, base)  # no recursion limit: a layer may delete a 5,000-level tree
        else:
            os.unlink(base, dir_fd=pfd)
        return False

    def _create(self, pfd: int, base: str, path: str, parent: list[str], entry: TarEntry, where: str) -> None:
        """Create ``entry`` as ``base`` in the directory ``pfd``; ``path`` is where that is below the root (after
        resolving symlinks in merged mode), ``parent`` the components of its directory."""
        kind = entry.kind
        if kind == "dir":
            if not self._clear(pfd, base, keep_dir=True, path=path):
                os.mkdir(base, 0o700, dir_fd=pfd)
            dfd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
            try:
                self._meta_fd(dfd, entry)
            finally:
                os.close(dfd)
            self.dir_times[path] = entry.mtime_ns
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
                self._clear(pfd, base, keep_dir=False, path=path)
                fd = os.open(base, flags, 0o600, dir_fd=pfd)
            try:
                self._write(fd, entry)
                self._meta_fd(fd, entry)
            finally:
                os.close(fd)
            self.size += entry.size
        elif kind == "symlink":
            self._clear(pfd, base, keep_dir=False, path=path)
            os.symlink(entry.linkname, base, dir_fd=pfd)
            self._meta_at(pfd, base, entry)
        elif kind == "hardlink":
            self._hardlink(base, path, parent, entry, where)
        elif kind in ("char", "block", "fifo"):
            if kind != "fifo" and not self.limits.allow_devices:
                raise UnsafeLayerError(
                    f"{where}: {kind} device {entry.devmajor}:{entry.devminor} refused (Limits.allow_devices is "
                    "False)"
                )
            self._clear(pfd, base, keep_dir=False, path=path)
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

    def _hardlink(self, base: str, path: str, parent: list[str], entry: TarEntry, where: str) -> None:
        if entry.linkname == entry.path:
            log.debug("%s: hardlink to itself, nothing to do", where)
            return
        missing = UnsafeLayerError(
            f"{where}: hardlink target {entry.linkname!r} does not exist in the target directory; hardlinks "
            "may only point to files unpacked before them. Refusing the layer"
        )
        tparts = entry.linkname.split("/")
        if self.mode == "merged" and aufs_meta_prefix(tparts) is not None:
            raise UnsafeLayerError(
                f"{where}: hardlink into AUFS metadata ({entry.linkname!r}), which merged mode skips; the image was "
                "committed on AUFS. Its layers can still be published in layer mode; for a flat tree, re-export the "
                "image (e.g. docker save / skopeo copy from a non-AUFS host) or skip the flat"
            )
        # the target's directory resolves like any parent path (merged: symlinks inside the root), its last
        # component is never followed: a hardlink to a symlink links the symlink, as containerd and link(2) do
        got = self._parent(tparts[:-1], False, where + f" (hardlink target {entry.linkname!r})")
        if got is None:
            raise missing
        tpfd, treal = got
        try:
            st = os.lstat(tparts[-1], dir_fd=tpfd)
        except FileNotFoundError:
            raise missing from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeLayerError(f"{where}: hardlink to directory {entry.linkname!r}; refusing the layer")
        if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and not self.limits.allow_devices:
            raise UnsafeLayerError(f"{where}: hardlink to device {entry.linkname!r} refused "
                                   "(Limits.allow_devices is False)")
        if "/".join([*treal, tparts[-1]]).startswith(path + "/"):
            raise UnsafeLayerError(f"{where}: hardlink to {entry.linkname!r}, inside itself; refusing the layer")
        pfd = self._walk(parent, False, where)  # again: resolving the target may have evicted it from the cache
        if pfd is None:
            raise UnsafeLayerError(f"{where}: its directory disappeared while unpacking; refusing the layer")
        try:
            dst = os.lstat(base, dir_fd=pfd)
            if dst.st_ino == st.st_ino and dst.st_dev == st.st_dev:
                return  # already that file
        except FileNotFoundError:
            pass
        self._clear(pfd, base, keep_dir=False, path=path)
        os.link(tparts[-1], base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
        # containerd (archive/tar.go createTarFile) applies the hardlink header's owner, xattrs, mode and times to
        # the shared inode; a hardlink to a symlink must not be chmod-ed (chmod follows symlinks)
        self._meta_at(pfd, base, dataclasses.replace(entry, kind="symlink") if stat.S_ISLNK(st.st_mode) else entry)

    # -- whiteouts --------------------------------------------------------------------------------------------
    def _whiteout(self, entry: TarEntry, parts: list[str], where: str) -> None:
        """``.wh.NAME`` or ``.wh..wh..opq`` (AUFS metadata never comes here)."""
        base = parts[-1]
        parent = "/".join(parts[:-1])
        if base == OPAQUE_MARKER:
            self.index.opaque_dirs.append(parent)
            deleted = None
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
        # merged: delete from the lower layers, never what this layer itself added. The directory resolves like
        # any parent path (symlinks followed inside the root); one that does not exist has nothing to delete.
        got = self._parent(parts[:-1], False, where)
        if got is None:
            return
        pfd, real = got
        if deleted is None:
            self._clear_lower(real, where)
            return
        path = "/".join([*real, deleted])
        if path in self.added or path in self.ancestors:
            # the layer itself (re)created this path: the whiteout only hides what lower layers had below it
            try:
                is_dir = stat.S_ISDIR(os.lstat(deleted, dir_fd=pfd).st_mode)
            except FileNotFoundError:
                is_dir = False
            if is_dir:
                self._clear_lower([*real, deleted], where)
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
    digest: bool = True,
) -> ApplyResult:
    """Unpack an uncompressed layer tar (e.g. from :func:`open_layer`) into the existing directory ``target``.

    ``mode`` is ``"layer"`` (keep ``.wh.*`` files, return their index) or ``"merged"`` (apply them to what
    ``target`` holds). ``same_owner`` keeps numeric uid/gid (never looked up by name). ``name`` (e.g. the layer
    digest; by default the stream's own ``name``) goes into error messages. ``digest=False``: the caller does not
    need the diffID (a tar made here from a verified tree), so a stream that does not hash itself is not hashed
    (``ApplyResult.diff_id`` is then None). Hostile layers raise
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
    # a HashingReader that does not hash has a diff_id of its own (None), so TarReader does not hash either
    reader = TarReader(tar_stream if digest else HashingReader(tar_stream, hash=False), limits, name)
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
