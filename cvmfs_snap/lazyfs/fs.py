"""ONE pyfuse3 file system for every lazy layer of the node: a directory per layer under the mount root.

``<mount>/<layer id>/`` is layer ``id``'s tree (:mod:`cvmfs_snap.lazyfs.tree`), read-only. Inode numbers are
``layer seq << 32 | node index`` (the mount root is 1), so one number never means two things: a layer attached
again gets a new ``seq``.

Kernel caching is used fully, the trees being immutable: entries, attributes and negative lookups inside a layer
are cached for :data:`LONG_TIMEOUT` (overlayfs looks names up in every lower layer; the misses are cached too),
files are opened with ``keep_cache`` (warm reads come from the page cache, never through Python), and the data of
prefetched files is pushed into the page cache with ``notify_store`` when the kernel first looks such a file up
(the container's first read then needs no round trip). Only the mount root, whose entries come and go as layers
attach and detach, is cached briefly, and each attach/detach invalidates its entry.

File contents come from a :class:`LayerFiles` (the layer's :class:`~cvmfs_snap.lazyfs.reader.LayerReader`);
any error it raises is EIO for that read, never wrong bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyfuse3
import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import CvmfsSnapError
from cvmfs_snap.lazyfs.tree import Node, Tree

log = logging.getLogger(__name__)

ROOT_INODE: int = pyfuse3.ROOT_INODE
#: seconds the kernel keeps entries and attributes of layer trees (immutable; detach invalidates the root entry)
LONG_TIMEOUT = 365 * 86400.0
#: seconds for the mount root's own entries (layers come and go)
ROOT_TIMEOUT = 1.0
#: prefetched files up to this size are pushed into the page cache when first looked up
STORE_MAX = 4 << 20
SEQ_SHIFT = 32
_INDEX_MASK = (1 << SEQ_SHIFT) - 1


class LayerFiles(Protocol):
    """What the file system needs of a layer's contents (LayerReader's ``read``: bytes or a view of them)."""

    async def read(self, path: str, offset: int, size: int) -> bytes | memoryview: ...


@dataclass(slots=True)
class MountedLayer:
    id: str
    seq: int
    tree: Tree
    files: LayerFiles
    #: TOC paths of prefetched files whose data is pushed with notify_store at their first lookup
    store: set[str] = field(default_factory=set)


def _attrs(ino: int, n: Node, timeout: float) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.generation = 0
    a.entry_timeout = timeout
    a.attr_timeout = timeout
    a.st_mode = n.mode
    a.st_nlink = n.nlink
    a.st_uid = n.uid
    a.st_gid = n.gid
    a.st_rdev = n.rdev
    a.st_size = n.size if not n.is_dir else 4096
    a.st_blksize = 4096
    a.st_blocks = (a.st_size + 511) // 512
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = n.mtime_ns
    return a


def fuse_error(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class LazyFS(pyfuse3.Operations):
    """The operations of the one mount (see the module docstring)."""

    enable_writeback_cache = False

    def __init__(self) -> None:
        super().__init__()
        self.layers: dict[str, MountedLayer] = {}
        self._by_seq: dict[int, MountedLayer] = {}
        self._next_seq = 1
        self._root = Node(mode=stat.S_IFDIR | 0o755, nlink=2)
        self.mounted = False
        self.nursery: trio.Nursery | None = None
        #: the mount point (set before mounting): its kernel readahead is raised once the INIT handshake is done
        self.mnt: Path | None = None
        self.read_errors = 0

    # ------------------------------------------------------------------ layers
    def add_layer(self, layer_id: str, tree: Tree, files: LayerFiles, store: Iterable[str] = ()) -> MountedLayer:
        """Show ``tree`` at ``<mount>/<layer_id>`` (replacing a layer of that id)."""
        self.remove_layer(layer_id)
        layer = MountedLayer(layer_id, self._next_seq, tree, files, set(store))
        self._next_seq += 1
        self.layers[layer_id] = layer
        self._by_seq[layer.seq] = layer
        return layer  # unknown names at the root are never cached: nothing to invalidate

    def remove_layer(self, layer_id: str) -> MountedLayer | None:
        layer = self.layers.pop(layer_id, None)
        if layer is not None:
            self._by_seq.pop(layer.seq, None)
            self._invalidate(layer_id)
        return layer

    def _invalidate(self, layer_id: str) -> None:
        if not self.mounted:
            return
        try:
            pyfuse3.invalidate_entry_async(ROOT_INODE, os.fsencode(layer_id), ignore_enoent=True)
        except OSError as e:  # the kernel forgot the entry already
            log.debug("invalidating %s: %s", layer_id, e)

    def _node(self, ino: int) -> tuple[MountedLayer | None, Node]:
        if ino == ROOT_INODE:
            return None, self._root
        layer = self._by_seq.get(ino >> SEQ_SHIFT)
        idx = ino & _INDEX_MASK
        if layer is None or idx >= len(layer.tree.nodes):
            raise fuse_error(errno.ESTALE)  # a detached layer's inode
        return layer, layer.tree.nodes[idx]

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        a = _attrs(ROOT_INODE, self._root, ROOT_TIMEOUT)
        a.st_nlink = 2 + len(self.layers)
        return a

    # ------------------------------------------------------------------ metadata
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
                     ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE:
            if name in (b".", b".."):
                return self._root_attrs()
            layer = self.layers.get(os.fsdecode(name))
            if layer is None:
                raise fuse_error(errno.ENOENT)  # not cached: a layer may be attached in a moment
            return _attrs(layer.seq << SEQ_SHIFT, layer.tree.nodes[0], LONG_TIMEOUT)
        layer, node = self._node(parent_inode)
        assert layer is not None
        if node.entries is None:
            raise fuse_error(errno.ENOTDIR)
        if name == b".":
            return _attrs(parent_inode, node, LONG_TIMEOUT)
        if name == b"..":
            raise fuse_error(errno.ENOENT)  # the kernel resolves ".." itself
        idx = node.entries.get(name)
        if idx is None:
            miss = pyfuse3.EntryAttributes()
            miss.st_ino = 0
            miss.entry_timeout = LONG_TIMEOUT  # cached: the tree never changes
            return miss
        child = layer.tree.nodes[idx]
        ino = layer.seq << SEQ_SHIFT | idx
        if layer.store and child.is_reg and child.path in layer.store:
            layer.store.discard(child.path)
            if self.nursery is not None and 0 < child.size <= STORE_MAX:
                self.nursery.start_soon(self._store, layer, ino, child)
        return _attrs(ino, child, LONG_TIMEOUT)

    async def _store(self, layer: MountedLayer, ino: int, node: Node) -> None:
        """Push a prefetched file's data into the kernel's page cache (best effort)."""
        try:
            data = await layer.files.read(node.path, 0, node.size)
            await trio.sleep(0)  # let the lookup's answer reach the kernel first: it must know the inode
            pyfuse3.notify_store(ino, 0, data if isinstance(data, bytes) else bytes(data))
        except (CvmfsSnapError, OSError) as e:
            log.debug("notify_store of %s in layer %s: %s", node.path, layer.id, e)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._root_attrs()
        _, node = self._node(inode)
        return _attrs(inode, node, LONG_TIMEOUT)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        _, node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise fuse_error(errno.EINVAL)
        return node.target

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # nothing to free: nodes live as long as their layer

    # ------------------------------------------------------------------ directories
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT_INODE:
            _, node = self._node(inode)
            if node.entries is None:
                raise fuse_error(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == ROOT_INODE:
            for i, lid in enumerate(sorted(self.layers)):
                if i < start_id:
                    continue
                top = self.layers[lid]
                a = _attrs(top.seq << SEQ_SHIFT, top.tree.nodes[0], LONG_TIMEOUT)
                if not pyfuse3.readdir_reply(token, os.fsencode(lid), a, i + 1):
                    return
            return
        layer, node = self._node(fh)
        assert layer is not None and node.entries is not None
        names = node.names
        for i in range(start_id, len(names)):
            idx = node.entries[names[i]]
            a = _attrs(layer.seq << SEQ_SHIFT | idx, layer.tree.nodes[idx], LONG_TIMEOUT)
            if not pyfuse3.readdir_reply(token, names[i], a, i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    def init(self) -> None:
        # called while the kernel's INIT is answered, and that answer sets the readahead back to the kernel's
        # default: raise it in a task that runs once the answer has gone
        if self.mnt is not None and self.nursery is not None:
            self.nursery.start_soon(trio.to_thread.run_sync, set_read_ahead, self.mnt)

    # ------------------------------------------------------------------ files
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        _, node = self._node(inode)
        if not node.is_reg:
            raise fuse_error(errno.EISDIR if node.is_dir else errno.EINVAL)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise fuse_error(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        # pyfuse3 replies with any buffer (PyObject_GetBuffer); its stub says bytes
        layer, node = self._node(fh)
        assert layer is not None
        if off >= node.size or size <= 0:
            return b""
        try:
            return await layer.files.read(node.path, off, min(size, node.size - off))
        except CvmfsSnapError as e:
            self.read_errors += 1
            log.warning("read of %s in lazy layer %s failed (EIO to the reader): %s", node.path, layer.id, e)
            raise fuse_error(errno.EIO) from None

    async def release(self, fh: int) -> None:
        return None

    # ------------------------------------------------------------------ xattrs, statfs
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        _, node = self._node(inode)
        value = (node.xattrs or {}).get(name)
        if value is None:
            raise fuse_error(errno.ENODATA)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        _, node = self._node(inode)
        return list(node.xattrs or ())

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(layer.tree.file_bytes for layer in self.layers.values()) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = sum(len(layer.tree.nodes) for layer in self.layers.values()) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s


#: the mount's kernel readahead (KiB): the kernel's default of 128 KiB splits a sequential read into 128 KiB FUSE
#: requests, one trip through the process each; with more, it sends 1 MiB requests (``max_pages``), several at once
READ_AHEAD_KB = 4096


def set_read_ahead(mnt: Path, kb: int = READ_AHEAD_KB) -> int | None:
    """Set the kernel readahead of the FUSE mount at ``mnt`` (``read_ahead_kb`` of its backing device, which
    the FUSE INIT reply can only lower); the value now in force, None where it cannot be set (logged). The
    device comes from /proc/self/mountinfo: a stat of the mount would wait for this very process to answer."""
    want = str(mnt).encode().replace(b"\\", b"\\134").replace(b" ", b"\\040").replace(b"\t", b"\\011")
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            devs = [line.split()[2].decode() for line in f if line.split()[4] == want]
        if not devs:
            raise OSError(f"{mnt} is not in /proc/self/mountinfo")
        knob = Path(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb")
        knob.write_text(f"{kb}\n")
        return int(knob.read_text())
    except (OSError, ValueError) as e:
        log.warning("cannot set the readahead of the lazy mount %s (%s): sequential reads go through the process "
                    "in 128 KiB requests", mnt, e)
        return None


def mount_options(fsname: str = "cvmfs-snap-lazy") -> set[str]:
    """The mount's options: read-only, permissions checked by the kernel from the tree's modes, open to every
    user (containers run as any uid)."""
    return {*pyfuse3.default_options, f"fsname={fsname}", "subtype=cvmfs-snap", "ro", "allow_other"}
