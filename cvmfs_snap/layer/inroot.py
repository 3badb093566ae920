"""Directories below one root, opened so that nothing ever lands outside it: the in-root resolver.

Every directory is opened component by component from a file descriptor of the root with
``O_NOFOLLOW | O_DIRECTORY`` (openat-style), so a symlink on the way is never followed by the kernel.
:meth:`InRoot.resolve` follows symlinks *inside* the root the way containerd resolves a parent path on a merged
view (continuity's ``fs.RootPath``; securejoin, ``openat2(RESOLVE_IN_ROOT)``): each component is looked up with
``lstat`` from the root, a symlink's target is spliced in, an absolute target restarts at the root and ``..`` stops
at the root; more than :data:`MAX_SYMLINKS` symlinks in one path is an error (ELOOP). The result is a list of real
directories below the root, opened again with ``O_NOFOLLOW``, so a write lands inside the root whatever the
symlinks say.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable

from cvmfs_snap.errors import UnsafeLayerError
from cvmfs_snap.fsutil import remove_tree_at
from cvmfs_snap.layer.rules import not_a_directory_error

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_CACHE = 128
#: symlinks followed while resolving one path (Linux's MAXSYMLINKS); more is ELOOP
MAX_SYMLINKS = 40

#: builds the error for a symlink met where a real directory must be: (where, path below the root, " (to 'x')")
SymlinkError = Callable[[str, str, str], UnsafeLayerError]


def kind_of(mode: int) -> str:
    """The file type of an ``st_mode`` in words, for messages."""
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISREG, "regular file"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "non-directory"


class InRoot:
    """Directory fds below ``root_fd`` (borrowed from a small cache: never close them), reached without symlinks.

    ``symlink_error`` builds the error raised when :meth:`walk` meets a symlink. ``follow_symlinks``: whether
    :meth:`parent` resolves symlinks inside the root (merged trees) or refuses them (a layer stored on its own).
    """

    def __init__(self, root_fd: int, symlink_error: SymlinkError, follow_symlinks: bool) -> None:
        self.root_fd = root_fd
        self.symlink_error = symlink_error
        self.follow_symlinks = follow_symlinks
        self._dirs: OrderedDict[str, int] = OrderedDict()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def walk(self, parts: list[str], create: bool, where: str) -> int | None:
        """fd of the directory ``parts`` below the root, never through a symlink; None if missing (create=False).

        The fd is *borrowed* from a small cache (do not close it): tars list neighbours together, and re-opening
        every parent for every entry would double the syscalls. The cache is dropped whenever a directory is
        removed (:meth:`remove`), so a cached fd never stands for a path that now names something else.
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
                    nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)  # independent of the process umask, as containerd's MkdirAll
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.lstat(comp, dir_fd=fd)
                    sub = "/".join(parts[: i + 1])
                    if stat.S_ISLNK(st.st_mode):
                        try:
                            to = f" (to {os.readlink(comp, dir_fd=fd)!r})"
                        except OSError:
                            to = ""
                        raise self.symlink_error(where, sub, to) from None
                    raise not_a_directory_error(where, sub, kind_of(st.st_mode)) from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self._dirs[key] = fd
        if len(self._dirs) > _DIR_CACHE:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def parent(self, parts: list[str], create: bool, where: str) -> tuple[int, list[str]] | None:
        """fd and real path (components below the root) of the directory named by ``parts``; None if it does not
        exist and ``create`` is False. With ``follow_symlinks`` symlinks on the way are resolved inside the root
        (:meth:`resolve`), otherwise a symlink is refused. The fd is borrowed, as from :meth:`walk`."""
        if not self.follow_symlinks or not parts or "/".join(parts) in self._dirs:
            # a cached fd is a real directory reached without symlinks: no resolution needed
            fd = self.walk(parts, create, where)
            return None if fd is None else (fd, parts)
        real = self.resolve(parts, create, where)
        if real is None:
            return None
        fd = self.walk(real, create, where)
        return None if fd is None else (fd, real)

    def resolve(self, parts: list[str], create: bool, where: str) -> list[str] | None:
        """The real directories ``parts`` leads to, following symlinks but never above the root.

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
                pfd = self.walk(cur, False, where)
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
                    raise not_a_directory_error(where, sub, kind_of(st.st_mode), via)
            elif not create:
                return None
            cur.append(comp)
        return cur

    def remove(self, pfd: int, base: str, keep_dir: bool, path: str) -> bool:
        """Remove what is at ``base`` in directory ``pfd`` (a directory recursively) unless keep_dir and it is a
        directory.

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
