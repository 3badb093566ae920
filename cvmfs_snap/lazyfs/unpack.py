"""The node-local unpacked copy of a completely fetched lazy layer, for new containers (native read speed).

:func:`unpack_layer` writes the layer's tree (:mod:`cvmfs_snap.lazyfs.tree`, the same view the FUSE mount gives:
whiteouts as char 0/0, ``trusted.overlay.opaque``, hardlinks, xattrs, owners, modes, times) into
``<dest>.tmp-<pid>`` and renames it to ``dest`` once whole, so a crash leaves no half copy under the final name
(leftover ``*.tmp-*`` directories are removed at the process's start). File data comes from the layer's reader:
every chunk is in the cache already, verified again on its way out. Running containers keep their FUSE mounts;
the lazy source gives new ones the copy (``check`` answers its path).

The copy counts in the lazy cache bound (:meth:`~cvmfs_snap.lazyfs.cache.ChunkCache.reserve`): the process reserves
:func:`copy_size` before writing it and skips a copy that would not fit; a copy found at start counts with its
:func:`disk_usage`.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import trio  # type: ignore[import-untyped]

from cvmfs_snap import fsutil
from cvmfs_snap.fsutil import remove_tree
from cvmfs_snap.lazyfs.fs import LayerFiles
from cvmfs_snap.lazyfs.tree import Node, Tree

log = logging.getLogger(__name__)

PIECE = 4 << 20
#: file system block: a copy's files are counted in whole blocks, each directory as one
BLOCK = 4096


def copy_size(tree: Tree) -> int:
    """The disk space an unpacked copy of ``tree`` takes, near enough (each inode once, whole blocks)."""
    total = 0
    for n in tree.nodes:
        if n.is_reg:
            total += -(-n.size // BLOCK) * BLOCK
        elif n.is_dir:
            total += BLOCK
    return total


def disk_usage(top: Path) -> int:
    """Bytes allocated to the tree at ``top`` (hardlinks once; 0 if it is gone), without recursion."""
    return fsutil.disk_usage(top).size


def _meta(path: str, n: Node) -> None:
    if not stat.S_ISLNK(n.mode):
        os.chown(path, n.uid, n.gid)
        os.chmod(path, stat.S_IMODE(n.mode))
    else:
        os.lchown(path, n.uid, n.gid)
    for k, v in (n.xattrs or {}).items():
        os.setxattr(path, k, v, follow_symlinks=False)


def _make(path: str, n: Node) -> None:
    if n.is_dir:
        os.mkdir(path, 0o700)
    elif stat.S_ISLNK(n.mode):
        os.symlink(n.target, path)
    elif stat.S_ISCHR(n.mode) or stat.S_ISBLK(n.mode) or stat.S_ISFIFO(n.mode):
        os.mknod(path, stat.S_IFMT(n.mode) | 0o600, n.rdev)
    _meta(path, n)


async def unpack_layer(tree: Tree, files: LayerFiles, dest: Path) -> None:
    """Write ``tree`` to ``dest`` (see the module docstring). Errors propagate; the temporary copy is removed."""
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    await trio.to_thread.run_sync(lambda: remove_tree(tmp))
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        await trio.to_thread.run_sync(os.mkdir, tmp, 0o700)
        first: dict[int, str] = {}  # node index -> first path (hardlinks)
        dirs: list[tuple[str, Node]] = [(str(tmp), tree.nodes[0])]
        for rel, idx in tree.walk():
            path = os.path.join(tmp, rel)
            n = tree.nodes[idx]
            if idx in first and not n.is_dir:
                await trio.to_thread.run_sync(os.link, first[idx], path)
                continue
            first[idx] = path
            if n.is_reg:
                await _write_file(path, n, files)
            else:
                await trio.to_thread.run_sync(_make, path, n)
                if n.is_dir:
                    dirs.append((path, n))
                elif not stat.S_ISLNK(n.mode):
                    await trio.to_thread.run_sync(_times, path, n)

        def finish() -> None:
            for p, d in reversed(dirs):  # children first: writing into a directory changes its mtime
                _meta(p, d)
                _times(p, d)
            os.rename(tmp, dest)

        await trio.to_thread.run_sync(finish)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lambda: remove_tree(tmp))
        raise


def _times(path: str, n: Node) -> None:
    os.utime(path, ns=(n.mtime_ns, n.mtime_ns), follow_symlinks=False)


async def _write_file(path: str, n: Node, files: LayerFiles) -> None:
    fd = await trio.to_thread.run_sync(lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        off = 0
        while off < n.size:
            data = await files.read(n.path, off, min(PIECE, n.size - off))
            if not data:
                raise OSError(f"short read of {n.path} at {off}")
            await trio.to_thread.run_sync(os.pwrite, fd, data, off)
            off += len(data)
    finally:
        os.close(fd)
    await trio.to_thread.run_sync(_meta, path, n)
    await trio.to_thread.run_sync(_times, path, n)
