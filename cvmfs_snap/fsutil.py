"""Tree walks and removals whose depth is bounded by nothing but the disk.

Python 3.11's ``shutil.rmtree``, ``os.walk``, ``os.fwalk`` and ``Path.rglob`` recurse once per directory level and
fail past about 1,000 levels; a hostile layer or a container can make trees far deeper than that. Everything here
is iterative, holds O(1) file descriptors whatever the depth (it climbs back with ``..`` and checks that it landed
where it came from), never follows a symlink, and works below ``PATH_MAX`` limits because it only ever opens single
names relative to a directory fd.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FailedPreconditionError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Frame:
    name: str  # this directory's name in its parent ("" for the top)
    dev: int
    ino: int
    pending: list[str] = field(default_factory=list)  # subdirectories still to visit, last first


def _open_dir(name: str, dir_fd: int | None) -> tuple[int, os.stat_result]:
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _climb(fd: int, expect: _Frame, top: str) -> int:
    """Open the parent of ``fd`` and check it is the directory we descended from (nobody moved it meanwhile)."""
    parent, st = _open_dir("..", fd)
    if (st.st_dev, st.st_ino) != (expect.dev, expect.ino):
        os.close(parent)
        raise FailedPreconditionError(f"{top}: a directory was moved while the tree was being walked; try again")
    return parent


def _split(fd: int) -> tuple[list[str], list[str]]:
    """Names in directory ``fd``: (subdirectories, everything else). Symlinks to directories count as non-dirs."""
    dirs: list[str] = []
    other: list[str] = []
    with os.scandir(fd) as it:
        for e in it:
            (dirs if e.is_dir(follow_symlinks=False) else other).append(e.name)
    return dirs, other


def walk_fd(
    top: str | os.PathLike[str], *, dir_fd: int | None = None
) -> Iterator[tuple[str, int, list[str], list[str]]]:
    """Walk ``top`` top-down, like ``os.fwalk`` without recursion.

    Yields ``(relpath, dirfd, dirnames, filenames)``: ``relpath`` is the directory below ``top`` ("" for ``top``),
    ``dirfd`` an fd of it that is valid only until the next step, ``dirnames`` its subdirectories (remove names from
    the list to prune them), ``filenames`` everything else (files, symlinks, devices, ...). Symlinks are never
    followed; ``top`` itself must be a directory, not a symlink.
    """
    top_s = os.fspath(top)
    fd, st = _open_dir(top_s, dir_fd)
    stack: list[_Frame] = []
    rel: list[str] = []
    try:
        frame = _Frame("", st.st_dev, st.st_ino)
        while True:
            dirs, files = _split(fd)
            yield "/".join(rel), fd, dirs, files
            frame.pending = list(reversed(dirs))
            stack.append(frame)
            # next directory: the first pending child of the deepest frame that has one
            while stack:
                cur = stack[-1]
                if cur.pending:
                    name = cur.pending.pop()
                    try:
                        child, cst = _open_dir(name, fd)
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # vanished or replaced since it was listed
                    except OSError as e:
                        if e.errno == errno.ELOOP:  # replaced by a symlink
                            continue
                        raise
                    os.close(fd)
                    fd = child
                    rel.append(name)
                    frame = _Frame(name, cst.st_dev, cst.st_ino)
                    break
                stack.pop()
                if not stack:
                    return
                parent = _climb(fd, stack[-1], top_s)
                os.close(fd)
                fd = parent
                rel.pop()
            else:
                return
    finally:
        os.close(fd)


def walk(top: str | os.PathLike[str]) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(top, followlinks=False)`` without recursion: yields ``(dirpath, dirnames, filenames)``.

    Paths are joined from ``top``; for trees deeper than ``PATH_MAX`` use :func:`walk_fd`, whose fds always work.
    """
    top_s = os.fspath(top)
    for rel, _fd, dirs, files in walk_fd(top_s):
        yield (os.path.join(top_s, rel) if rel else top_s), dirs, files


def _remove_contents(fd: int, top: str) -> None:
    """Empty the directory ``fd`` (depth-first, iteratively); ``fd`` stays open and is the caller's."""
    st = os.fstat(fd)
    root = _Frame("", st.st_dev, st.st_ino)
    stack: list[_Frame] = []
    cur_fd = os.dup(fd)
    frame = root
    try:
        while True:
            dirs, others = _split(cur_fd)
            for name in others:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=cur_fd)
            frame.pending = dirs
            stack.append(frame)
            while True:
                cur = stack[-1]
                if cur.pending:
                    name = cur.pending[-1]
                    try:
                        child, cst = _open_dir(name, cur_fd)
                    except FileNotFoundError:
                        cur.pending.pop()
                        continue
                    except OSError as e:
                        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                            raise
                        cur.pending.pop()  # became a symlink or a file: unlink it, never follow it
                        os.unlink(name, dir_fd=cur_fd)
                        continue
                    os.close(cur_fd)
                    cur_fd = child
                    frame = _Frame(name, cst.st_dev, cst.st_ino)
                    break
                # ``cur`` is empty now: climb and remove it from its parent
                stack.pop()
                if not stack:
                    return
                parent = _climb(cur_fd, stack[-1], top)
                os.close(cur_fd)
                cur_fd = parent
                name = stack[-1].pending.pop()
                try:
                    os.rmdir(name, dir_fd=cur_fd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno != errno.ENOTEMPTY:
                        raise
                    stack[-1].pending.append(name)  # something was created meanwhile: go down again
    finally:
        os.close(cur_fd)


def remove_tree_at(dir_fd: int | None, name: str, *, missing_ok: bool = True) -> None:
    """Remove ``name`` (relative to ``dir_fd``, or a path when ``dir_fd`` is None) whatever it is, however deep.

    A symlink is removed, never followed. A missing ``name`` is fine unless ``missing_ok`` is False.
    """
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd, _ = _open_dir(name, dir_fd)
    try:
        _remove_contents(fd, name)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(path: str | os.PathLike[str], *, missing_ok: bool = True) -> None:
    """``shutil.rmtree(path)`` without recursion (see :func:`remove_tree_at`)."""
    remove_tree_at(None, os.fspath(path), missing_ok=missing_ok)


def remove_tree_quietly(path: str | os.PathLike[str]) -> bool:
    """Best-effort :func:`remove_tree` (``ignore_errors=True``); returns whether ``path`` is gone."""
    with contextlib.suppress(OSError, FailedPreconditionError):
        remove_tree(path)
    return not os.path.lexists(path)


def make_deep_tree(base: Path, depth: int, name: str = "d") -> Path:
    """Create ``depth`` nested directories below ``base`` using fds (for tests of deep trees); returns ``base``."""
    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base, _DIR_FLAGS)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("x")
    finally:
        os.close(fd)
    return base


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


def disk_usage(path: Path) -> Usage:
    """Blocks and distinct inodes below ``path`` (like containerd's fs.DiskUsage: hard links counted once).

    Walks with directory fds (:func:`walk_fd`), so any depth works."""
    size = 0
    seen: set[tuple[int, int]] = set()

    def add(st: os.stat_result) -> None:
        nonlocal size
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512

    try:
        for _rel, fd, _dirs, files in walk_fd(path):  # every subdirectory is visited (and counted) by the walk
            add(os.fstat(fd))
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    add(os.lstat(name, dir_fd=fd))
    except FileNotFoundError:
        pass
    return Usage(size=size, inodes=len(seen))
