"""ONE FUSE file system for every lazy layer of the node: a directory per layer under the mount root.

``<mount>/<layer id>/`` is layer ``id``'s tree (:mod:`cvmfs_snap.lazyfs.tree`), read-only, served by our own FUSE
loop (:mod:`cvmfs_snap.lazyfs.fuse`). Inode numbers are ``layer seq << 32 | node index`` (the mount root is 1), so
one number never means two things: a layer attached again gets a new ``seq``.

Kernel caching is used fully, the trees being immutable: entries, attributes and negative lookups inside a layer
are cached for :data:`LONG_TIMEOUT` (overlayfs looks names up in every lower layer; the misses are cached too),
files are opened without asking the process (no-open mode: the page cache is kept, warm reads and opens never reach
Python), a layer's directory listings are cached, and the data of prefetched files is pushed into the page cache
with ``notify_store`` when the kernel first looks such a file up (the container's first read then needs no round
trip). Only the mount root, whose entries come and go as layers attach and detach, is cached briefly, and each
attach/detach invalidates its entry.

File contents come from a :class:`LayerFiles` (the layer's :class:`~cvmfs_snap.lazyfs.reader.LayerReader`);
any error it raises is EIO for that read, never wrong bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import CvmfsSnapError
from cvmfs_snap.lazyfs.fuse import ROOT_INODE, Attr, FuseError, Session, StatFs
from cvmfs_snap.lazyfs.tree import Node, Tree

log = logging.getLogger(__name__)

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

    def read_ready(self, path: str, offset: int, size: int) -> bytes | memoryview | None:
        """The same bytes if they are in memory already (no I/O, no waiting, any thread), else None."""
        ...


@dataclass(slots=True)
class MountedLayer:
    id: str
    seq: int
    tree: Tree
    files: LayerFiles
    #: TOC paths of prefetched files whose data is pushed with notify_store at their first lookup
    store: set[str] = field(default_factory=set)


def _attrs(ino: int, n: Node, timeout: float) -> Attr:
    return Attr(ino, n.mode, n.nlink, n.uid, n.gid, n.rdev, n.size if not n.is_dir else 4096, n.mtime_ns, timeout)


def fuse_error(code: int) -> FuseError:
    return FuseError(code)


class LazyFS:
    """The operations of the one mount (see the module docstring; :class:`cvmfs_snap.lazyfs.fuse.Operations`).

    The metadata operations run in the FUSE thread, ``read`` and the layer changes in the trio thread: the
    metadata ones only read the layer maps, which the trio thread replaces entries of (atomic under the GIL)."""

    def __init__(self) -> None:
        self.layers: dict[str, MountedLayer] = {}
        self._by_seq: dict[int, MountedLayer] = {}
        self._next_seq = 1
        self._root = Node(mode=stat.S_IFDIR | 0o755, nlink=2)
        #: the FUSE connection, once mounted (notify_store, invalidations, the mount point, tasks)
        self.session: Session | None = None
        self.read_errors = 0

    @property
    def mounted(self) -> bool:
        return self.session is not None

    # ------------------------------------------------------------------ layers
    def add_layer(self, layer_id: str, tree: Tree, files: LayerFiles, store: Iterable[str] = ()) -> MountedLayer:
        """Show ``tree`` at ``<mount>/<layer_id>`` (replacing a layer of that id)."""
        replaced = self._drop(layer_id)
        layer = MountedLayer(layer_id, self._next_seq, tree, files, set(store))
        self._next_seq += 1
        self.layers[layer_id] = layer
        self._by_seq[layer.seq] = layer
        # unknown names at the root are never cached: only the listing (and a replaced layer's entry) to invalidate
        self._invalidate(layer_id if replaced is not None else None)
        return layer

    def remove_layer(self, layer_id: str) -> MountedLayer | None:
        layer = self._drop(layer_id)
        if layer is not None:
            self._invalidate(layer_id)
        return layer

    def _drop(self, layer_id: str) -> MountedLayer | None:
        layer = self.layers.pop(layer_id, None)
        if layer is not None:
            self._by_seq.pop(layer.seq, None)
        return layer

    def _invalidate(self, layer_id: str | None) -> None:
        """The kernel's entry of ``layer_id`` (if given) and its cached listing of the root (no-opendir mode), here
        and now: the kernel may wait for the root directory's lock, which a request may hold, but the requests
        are answered by the FUSE thread, not this one. Quiet where the kernel has neither or the mount is gone."""
        session = self.session
        if session is None:
            return
        try:
            if layer_id is not None:
                session.invalidate_entry(ROOT_INODE, os.fsencode(layer_id))
            session.invalidate_inode(ROOT_INODE)
        except OSError as e:
            log.debug("invalidating the mount root's entries: %s", e)

    def _node(self, ino: int) -> tuple[MountedLayer | None, Node]:
        if ino == ROOT_INODE:
            return None, self._root
        layer = self._by_seq.get(ino >> SEQ_SHIFT)
        idx = ino & _INDEX_MASK
        if layer is None or idx >= len(layer.tree.nodes):
            raise fuse_error(errno.ESTALE)  # a detached layer's inode
        return layer, layer.tree.nodes[idx]

    def _root_attrs(self) -> Attr:
        n = self._root
        return Attr(ROOT_INODE, n.mode, 2 + len(self.layers), size=4096, timeout=ROOT_TIMEOUT)

    # ------------------------------------------------------------------ metadata
    def init(self) -> None:
        # called while the kernel's INIT is answered, and that answer sets the readahead back to the kernel's
        # default: raise it in a task that runs once the answer has gone
        if self.session is not None:
            self.session.spawn(trio.to_thread.run_sync, set_read_ahead, self.session.mnt)

    def lookup(self, parent: int, name: bytes) -> Attr:
        if parent == ROOT_INODE:
            if name in (b".", b".."):
                return self._root_attrs()
            layer = self.layers.get(os.fsdecode(name))
            if layer is None:
                raise fuse_error(errno.ENOENT)  # not cached: a layer may be attached in a moment
            return _attrs(layer.seq << SEQ_SHIFT, layer.tree.nodes[0], LONG_TIMEOUT)
        layer, node = self._node(parent)
        assert layer is not None
        if node.entries is None:
            raise fuse_error(errno.ENOTDIR)
        if name == b".":
            return _attrs(parent, node, LONG_TIMEOUT)
        if name == b"..":
            raise fuse_error(errno.ENOENT)  # the kernel resolves ".." itself
        idx = node.entries.get(name)
        if idx is None:
            return Attr(0, timeout=LONG_TIMEOUT)  # a negative entry, cached: the tree never changes
        child = layer.tree.nodes[idx]
        ino = layer.seq << SEQ_SHIFT | idx
        self._maybe_store(layer, ino, child)
        return _attrs(ino, child, LONG_TIMEOUT)

    def _maybe_store(self, layer: MountedLayer, ino: int, child: Node) -> None:
        if layer.store and child.is_reg and child.path in layer.store:
            layer.store.discard(child.path)
            if self.session is not None and 0 < child.size <= STORE_MAX:
                self.session.spawn(self._store, layer, ino, child)  # (called from the FUSE thread)

    async def _store(self, layer: MountedLayer, ino: int, node: Node) -> None:
        """Push a prefetched file's data into the kernel's page cache (best effort)."""
        session = self.session
        try:
            data = await layer.files.read(node.path, 0, node.size)
            await trio.sleep(0)  # let the lookup's answer reach the kernel first: it must know the inode
            if session is not None:  # from a thread: the kernel takes the inode's page locks
                await trio.to_thread.run_sync(session.notify_store, ino, 0, data)
        except (CvmfsSnapError, OSError) as e:
            log.debug("notify_store of %s in layer %s: %s", node.path, layer.id, e)

    def getattr(self, ino: int) -> Attr:
        if ino == ROOT_INODE:
            return self._root_attrs()
        _, node = self._node(ino)
        return _attrs(ino, node, LONG_TIMEOUT)

    def readlink(self, ino: int) -> bytes:
        _, node = self._node(ino)
        if not stat.S_ISLNK(node.mode):
            raise fuse_error(errno.EINVAL)
        return node.target

    # ------------------------------------------------------------------ directories
    def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, Attr]]:
        if ino == ROOT_INODE:  # (layers come and go in the trio thread meanwhile)
            for lid, top in sorted(self.layers.copy().items())[start:]:
                yield os.fsencode(lid), _attrs(top.seq << SEQ_SHIFT, top.tree.nodes[0], ROOT_TIMEOUT)
            return
        layer, node = self._node(ino)
        assert layer is not None and node.entries is not None
        names, entries, nodes, base = node.names, node.entries, layer.tree.nodes, layer.seq << SEQ_SHIFT
        for i in range(start, len(names)):
            idx = entries[names[i]]
            child = nodes[idx]
            self._maybe_store(layer, base | idx, child)  # READDIRPLUS makes the kernel know it, as a lookup does
            yield names[i], _attrs(base | idx, child, LONG_TIMEOUT)

    # ------------------------------------------------------------------ files
    def read_now(self, ino: int, off: int, size: int) -> bytes | memoryview | None:
        layer, node = self._node(ino)
        if layer is None or not node.is_reg:
            return None  # (read() answers the error)
        if off >= node.size or size <= 0:
            return b""
        return layer.files.read_ready(node.path, off, min(size, node.size - off))

    async def read(self, ino: int, off: int, size: int) -> bytes | memoryview:
        layer, node = self._node(ino)
        if layer is None or not node.is_reg:
            raise fuse_error(errno.EISDIR if node.is_dir else errno.EINVAL)
        if off >= node.size or size <= 0:
            return b""
        try:
            return await layer.files.read(node.path, off, min(size, node.size - off))
        except CvmfsSnapError as e:
            self.read_errors += 1
            log.warning("read of %s in lazy layer %s failed (EIO to the reader): %s", node.path, layer.id, e)
            raise fuse_error(errno.EIO) from None

    # ------------------------------------------------------------------ xattrs, statfs
    def getxattr(self, ino: int, name: bytes) -> bytes:
        _, node = self._node(ino)
        value = (node.xattrs or {}).get(name)
        if value is None:
            raise fuse_error(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> Sequence[bytes]:
        _, node = self._node(ino)
        return list(node.xattrs or ())

    def statfs(self) -> StatFs:
        layers = list(self.layers.values())  # (layers come and go in the trio thread meanwhile)
        return StatFs(blocks=sum(layer.tree.file_bytes for layer in layers) // 4096,
                      files=sum(len(layer.tree.nodes) for layer in layers) + 1)


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
