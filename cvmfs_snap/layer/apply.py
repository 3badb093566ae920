"""Apply a layer tar to a directory without ever writing outside it: the writer.

Two modes, one policy object each (:mod:`cvmfs_snap.layer.modes`):

``layer``
    the tree as CVMFS stores one layer: whiteout files (``.wh.NAME``, ``.wh..wh..opq``) are kept as plain empty
    files (mode 0644, root-owned) and returned as a :class:`WhiteoutIndex`, so that the node can build overlay
    whiteouts from them later.
``merged``
    whiteouts are applied to what the target already holds (a flattened root filesystem built layer by layer).

Safety does not rest on checking path strings. Every directory is opened component by component from a file
descriptor of the target root (:class:`~cvmfs_snap.layer.inroot.InRoot`). Files are created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` after removing what was there, so an existing device node, FIFO or symlink at that
name is never opened: the last component of an entry is never followed (a tar entry replaces a symlink at its own
path, as in containerd). Symlinks in the *parent* path of an entry (or of a hardlink target) depend on the mode:

``merged``
    followed, but only inside the target, the way containerd resolves a parent path on a merged view
    (:meth:`InRoot.resolve <cvmfs_snap.layer.inroot.InRoot.resolve>`). Real images need this: a usrmerge base
    layer has ``lib -> usr/lib`` and a later tar-built layer adds ``lib/x86_64-linux-gnu/libfoo.so``.
``layer``
    refused. A layer tree is stored on its own, and its symlinks usually point into lower layers that are not
    there, so following them would put files where the image does not expect them.

AUFS bookkeeping entries (``.wh..wh.plnk/``, ``.wh..wh.aufs``) are skipped in ``merged`` mode and stored as plain
entries in ``layer`` mode (as ``cvmfs_server ingest`` stores them), listed in ``WhiteoutIndex.hidden``. The rules
an entry must obey are shared with the structure check (:mod:`cvmfs_snap.layer.rules`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from cvmfs_snap.errors import CvmfsSnapError, FailedPreconditionError, UnsafeLayerError
from cvmfs_snap.layer.digesting import HashingReader, Readable
from cvmfs_snap.layer.inroot import DIR_FLAGS, MAX_SYMLINKS, InRoot
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.modes import POLICIES, Mode, ModePolicy
from cvmfs_snap.layer.rules import (
    check_device,
    check_hardlink_target,
    check_total_size,
    hardlink_missing_error,
    place,
    where_of,
)
from cvmfs_snap.layer.tarstream import TarEntry, TarReader
from cvmfs_snap.layer.whiteout import WhiteoutIndex

log = logging.getLogger(__name__)

__all__ = ["MAX_SYMLINKS", "ApplyResult", "Mode", "apply_entries", "apply_layer"]

_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


@dataclass
class ApplyResult:
    """What one apply did: member count, bytes of file content, the layer's whiteouts, its diffID."""

    entries: int
    size: int
    whiteouts: WhiteoutIndex = field(default_factory=WhiteoutIndex)
    diff_id: str | None = None


class _Applier:
    def __init__(self, root_fd: int, policy: ModePolicy, limits: Limits, same_owner: bool, name: str) -> None:
        self.root_fd = root_fd
        self.policy = policy
        self.dirs = InRoot(root_fd, policy.symlink_error, policy.follows_symlinks)
        self.limits = limits
        self.same_owner = same_owner
        self.name = name
        self.size = 0
        self.index = WhiteoutIndex()
        self.dir_times: dict[str, int] = {}
        self._warned_xattr = False

    def close(self) -> None:
        self.dirs.close()

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
    def apply(self, entry: TarEntry) -> None:
        where = where_of(self.name, entry)
        if entry.path == "":
            self._meta_fd(self.root_fd, entry)
            self.dir_times[""] = entry.mtime_ns
            return
        parts = entry.path.split("/")
        placed = place(parts, where, self.policy.keeps_aufs_meta)
        if placed.action == "skip":
            log.debug("%s: ignoring AUFS metadata", where)
            return
        if placed.action == "whiteout":
            if placed.deleted is None:
                self.index.opaque_dirs.append("/".join(parts[:-1]))
            else:
                self.index.whiteouts.append("/".join([*parts[:-1], placed.deleted]))
            self.policy.whiteout(self.dirs, entry, parts, placed.deleted, where)
            return
        if placed.hidden is not None:
            self.index.hidden.append(placed.hidden)
        base = parts[-1]
        got = self.dirs.parent(parts[:-1], True, where)
        assert got is not None
        pfd, real = got
        path = "/".join([*real, base])
        self._create(pfd, base, path, real, entry, where)
        self.policy.added(path)

    def _create(self, pfd: int, base: str, path: str, parent: list[str], entry: TarEntry, where: str) -> None:
        """Create ``entry`` as ``base`` in the directory ``pfd``; ``path`` is where that is below the root (after
        resolving symlinks in merged mode), ``parent`` the components of its directory."""
        kind = entry.kind
        if kind == "dir":
            if not self.dirs.remove(pfd, base, keep_dir=True, path=path):
                os.mkdir(base, 0o700, dir_fd=pfd)
            dfd = os.open(base, DIR_FLAGS, dir_fd=pfd)
            try:
                self._meta_fd(dfd, entry)
            finally:
                os.close(dfd)
            self.dir_times[path] = entry.mtime_ns
        elif kind == "file":
            check_total_size(where, self.size, entry, self.limits)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(base, flags, 0o600, dir_fd=pfd)
            except FileExistsError:  # O_EXCL: whatever is there (device, FIFO, symlink) is never opened
                self.dirs.remove(pfd, base, keep_dir=False, path=path)
                fd = os.open(base, flags, 0o600, dir_fd=pfd)
            try:
                self._write(fd, entry)
                self._meta_fd(fd, entry)
            finally:
                os.close(fd)
            self.size += entry.size
        elif kind == "symlink":
            self.dirs.remove(pfd, base, keep_dir=False, path=path)
            os.symlink(entry.linkname, base, dir_fd=pfd)
            self._meta_at(pfd, base, entry)
        elif kind == "hardlink":
            self._hardlink(base, path, parent, entry, where)
        elif kind in ("char", "block", "fifo"):
            check_device(where, entry, self.limits)
            self.dirs.remove(pfd, base, keep_dir=False, path=path)
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
        if entry.copy_to(fd):  # copied in the kernel (a file of a tree whose holes were found already)
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
        missing = hardlink_missing_error(where, entry.linkname)
        tparts = entry.linkname.split("/")
        self.policy.check_hardlink(where, entry.linkname)
        # the target's directory resolves like any parent path (merged: symlinks inside the root), its last
        # component is never followed: a hardlink to a symlink links the symlink, as containerd and link(2) do
        got = self.dirs.parent(tparts[:-1], False, where + f" (hardlink target {entry.linkname!r})")
        if got is None:
            raise missing
        tpfd, treal = got
        try:
            st = os.lstat(tparts[-1], dir_fd=tpfd)
        except FileNotFoundError:
            raise missing from None
        check_hardlink_target(where, entry.linkname, stat.S_ISDIR(st.st_mode),
                              stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode), self.limits)
        if "/".join([*treal, tparts[-1]]).startswith(path + "/"):
            raise UnsafeLayerError(f"{where}: hardlink to {entry.linkname!r}, inside itself; refusing the layer")
        pfd = self.dirs.walk(parent, False, where)  # again: resolving the target may have evicted it from the cache
        if pfd is None:
            raise UnsafeLayerError(f"{where}: its directory disappeared while unpacking; refusing the layer")
        try:
            dst = os.lstat(base, dir_fd=pfd)
            if dst.st_ino == st.st_ino and dst.st_dev == st.st_dev:
                return  # already that file
        except FileNotFoundError:
            pass
        self.dirs.remove(pfd, base, keep_dir=False, path=path)
        os.link(tparts[-1], base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
        # containerd (archive/tar.go createTarFile) applies the hardlink header's owner, xattrs, mode and times to
        # the shared inode; a hardlink to a symlink must not be chmod-ed (chmod follows symlinks)
        self._meta_at(pfd, base, dataclasses.replace(entry, kind="symlink") if stat.S_ISLNK(st.st_mode) else entry)

    def finish(self) -> None:
        """Directory mtimes last, deepest first: creating children changed them while unpacking."""
        for path, mtime in sorted(self.dir_times.items(), key=lambda kv: -kv[0].count("/") - bool(kv[0])):
            try:
                fd = self.dirs.walk(path.split("/") if path else [], False, path)
            except UnsafeLayerError:
                continue  # replaced by a symlink or file later in the layer
            if fd is not None:
                os.utime(fd, ns=(mtime, mtime))



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
    if name is None:
        name = str(getattr(tar_stream, "name", None) or "layer")
    limits = limits or Limits()
    # a HashingReader that does not hash has a diff_id of its own (None), so TarReader does not hash either
    reader = TarReader(tar_stream if digest else HashingReader(tar_stream, hash=False), limits, name)
    res = apply_entries(reader, target, mode, limits, same_owner, name=name, where_offset=True)
    res.entries = reader.entries
    res.diff_id = reader.diff_id
    return res


def apply_entries(
    entries: Iterable[TarEntry],
    target: str | os.PathLike[str],
    mode: Mode = "merged",
    limits: Limits | None = None,
    same_owner: bool = True,
    *,
    name: str = "layer",
    where_offset: bool = False,
) -> ApplyResult:
    """Apply already-checked entries (what :class:`TarReader` yields, or entries read from a trusted tree, e.g. a
    published layer tree) to ``target``, exactly as :func:`apply_layer` applies a tar's members; entries with data
    are read with ``entry.read`` while they are applied. ``ApplyResult.diff_id`` is None."""
    if mode not in ("layer", "merged"):
        raise ValueError(f"mode must be 'layer' or 'merged', not {mode!r}")
    limits = limits or Limits()
    tgt = os.fspath(target)
    try:
        root_fd = os.open(tgt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise FailedPreconditionError(f"{name}: cannot open target directory {tgt}: {e.strerror}") from None
    applier = _Applier(root_fd, POLICIES[mode](tgt, same_owner), limits, same_owner, name)
    current: TarEntry | None = None
    count = 0
    try:
        for current in entries:
            count += 1
            applier.apply(current)
        current = None
        applier.finish()
    except CvmfsSnapError:
        raise
    except OSError as e:
        what = "finishing"
        if current is not None:
            what = f"entry {current.display}" + (f" (tar offset {current.offset})" if where_offset else "")
        raise FailedPreconditionError(
            f"{name}: {what}: cannot write under {tgt}: {e.strerror or e} ({e.filename or ''}); check free space, "
            "permissions and that the target filesystem supports the file types and xattrs of the image"
        ) from e
    finally:
        applier.close()
        os.close(root_fd)
    return ApplyResult(entries=count, size=applier.size, whiteouts=applier.index.normalized())
