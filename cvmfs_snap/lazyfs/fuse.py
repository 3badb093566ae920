"""The FUSE kernel protocol, spoken on ``/dev/fuse`` for the lazy mount (docs/lazy.md, "Reads and the kernel's caches").

One read-only mount: a thread reads the requests and answers the metadata ones, and the READs whose bytes are in
memory already; any other READ runs as a task of the trio loop (its bytes may have to come from the registry). The
INIT answer is what pyfuse3 on libfuse 3.14 cannot give and what the lazy mount needs (bench/README.md, "Our own
FUSE loop"):

- **no-open mode**: ``OPEN`` and ``FLUSH`` are answered ENOSYS once, after which the kernel opens and closes files
  without asking (a warm ``open`` + ``read`` + ``close`` of a small file makes no request at all); reads carry the
  inode number in their header, so nothing needs a file handle, and the page cache is kept across opens;
- **no-opendir mode** likewise for directories (``OPENDIR`` answered ENOSYS): the kernel then caches listings (a
  warm ``readdir`` makes no request; the mount root's listing, which changes, is invalidated at each attach and
  detach), and lists with READDIRPLUS (a cold ``find`` instantiates the entries it lists: no LOOKUP per file
  afterwards); symlinks are cached;
- 1 MiB requests (``max_pages``), readahead asked for up to :data:`MAX_READAHEAD`.

Only what a read-only tree needs is implemented; every other request gets ENOSYS, which the kernel remembers where
it can. The mount is made with mount(2) and therefore needs root (CAP_SYS_ADMIN), as the lazy mount always had:
overlayfs on top of it needs root anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import UnavailableError

log = logging.getLogger(__name__)

ROOT_INODE = 1
#: the protocol minor we speak (7.36: ``flags2``); older kernels (< 7.29, Linux < 5.1: no no-opendir mode) are
#: refused at INIT
PROTO_MINOR = 36
MIN_KERNEL_MINOR = 29
#: largest READ the kernel sends (max_pages x 4 KiB), and the readahead the INIT answer allows
MAX_PAGES = 256
MAX_READAHEAD = 4 << 20
#: WRITE payload bound (we get none: read-only); /dev/fuse reads need a buffer this big plus headers
MAX_WRITE = 128 << 10
BUFFER_SIZE = MAX_WRITE + (64 << 10)
MAX_BACKGROUND = 16
CONGESTION_THRESHOLD = 12

# opcodes (include/uapi/linux/fuse.h)
LOOKUP, FORGET, GETATTR, READLINK, OPEN, READ, STATFS, RELEASE = 1, 2, 3, 5, 14, 15, 17, 18
GETXATTR, LISTXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 22, 23, 25, 26, 27, 28, 29
INTERRUPT, DESTROY, IOCTL, BATCH_FORGET, READDIRPLUS = 36, 38, 39, 42, 44
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})
OPCODE_NAMES = {LOOKUP: "lookup", FORGET: "forget", GETATTR: "getattr", READLINK: "readlink", OPEN: "open",
                READ: "read", STATFS: "statfs", RELEASE: "release", GETXATTR: "getxattr", LISTXATTR: "listxattr",
                FLUSH: "flush", INIT: "init", OPENDIR: "opendir", READDIR: "readdir", RELEASEDIR: "releasedir",
                INTERRUPT: "interrupt", DESTROY: "destroy", IOCTL: "ioctl", BATCH_FORGET: "batch_forget",
                READDIRPLUS: "readdirplus"}

# INIT flags we ask for (the kernel offers them; we keep those it offers)
ASYNC_READ = 1 << 0
DO_READDIRPLUS = 1 << 13
PARALLEL_DIROPS = 1 << 18
INIT_MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
EXPLICIT_INVAL_DATA = 1 << 25
INIT_EXT = 1 << 30
NO_OPEN_SUPPORT = 1 << 17
NO_OPENDIR_SUPPORT = 1 << 24
WANTED = ASYNC_READ | DO_READDIRPLUS | PARALLEL_DIROPS | INIT_MAX_PAGES | CACHE_SYMLINKS | EXPLICIT_INVAL_DATA

NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY, NOTIFY_STORE = 2, 3, 4

_IN = struct.Struct("<IIQQIIIHH")  # fuse_in_header: 40 bytes
_OUT = struct.Struct("<IiQ")  # fuse_out_header: 16 bytes
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: 88 bytes
_ENTRY_HEAD = struct.Struct("<QQQQII")  # fuse_entry_out before its attr: 40 bytes
_ATTR_HEAD = struct.Struct("<QII")  # fuse_attr_out before its attr: 16 bytes
_DIRENT = struct.Struct("<QQII")  # fuse_dirent before its name: 24 bytes
_READ_IN = struct.Struct("<QQI")  # fuse_read_in: fh, offset, size (then flags we ignore)
_GETXATTR_IN = struct.Struct("<II")
_U32PAIR = struct.Struct("<II")
_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (flags2 follows where INIT_EXT)
_INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # fuse_init_out: 64 bytes
_STATFS = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs: 80 bytes
_STORE = struct.Struct("<QQII")  # fuse_notify_store_out
_INVAL_ENTRY = struct.Struct("<QII")  # fuse_notify_inval_entry_out
_INVAL_INODE = struct.Struct("<Qqq")  # fuse_notify_inval_inode_out

_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
#: errors of a write to /dev/fuse that only say the request or entry is gone, or the mount
_GONE = frozenset({errno.ENOENT, errno.ENODEV, errno.EBADF})
_MNT_DETACH = 2


class FuseError(Exception):
    """An errno answered to the kernel for one request (not a failure of the mount)."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.errno = code


@dataclass(frozen=True, slots=True)
class Attr:
    """The attributes of one inode as the kernel caches them (``timeout`` seconds, entries and attributes alike;
    ``ino`` 0 in an entry answer is a negative entry, cached as long)."""

    ino: int
    mode: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    mtime_ns: int = 0
    timeout: float = 0.0

    def pack(self) -> bytes:
        s, ns = divmod(self.mtime_ns, 1_000_000_000)
        return _ATTR.pack(self.ino, self.size, (self.size + 511) // 512, s, s, s, ns, ns, ns, self.mode, self.nlink,
                          self.uid, self.gid, self.rdev, 4096, 0)


@dataclass(frozen=True, slots=True)
class StatFs:
    blocks: int = 0
    files: int = 0
    bsize: int = 4096
    namelen: int = 255


class Operations(Protocol):
    """What the loop asks of the file system; a :class:`FuseError` answers its errno, any other exception EIO."""

    def init(self) -> None: ...
    def lookup(self, parent: int, name: bytes) -> Attr: ...
    def getattr(self, ino: int) -> Attr: ...
    def readlink(self, ino: int) -> bytes: ...
    def readdir(self, ino: int, start: int) -> Iterable[tuple[bytes, Attr]]:
        """Entries from index ``start`` on (no ``.``/``..``)."""
        ...
    def read_now(self, ino: int, offset: int, size: int) -> bytes | memoryview | None:
        """The answer to a READ if it is at hand (called in the FUSE thread: no I/O, no waiting), else None."""
        ...
    def read(self, ino: int, offset: int, size: int) -> Awaitable[bytes | memoryview]: ...
    def getxattr(self, ino: int, name: bytes) -> bytes: ...
    def listxattr(self, ino: int) -> Sequence[bytes]: ...
    def statfs(self) -> StatFs: ...


def _timeout(t: float) -> tuple[int, int]:
    s = int(t)
    return s, int((t - s) * 1e9)


def entry_out(a: Attr) -> bytes:
    s, ns = _timeout(a.timeout)
    return _ENTRY_HEAD.pack(a.ino, 0, s, s, ns, ns) + a.pack()


def _dirent(name: bytes, a: Attr, off: int) -> bytes:
    rec = _DIRENT.pack(a.ino, off, len(name), (a.mode >> 12) & 0o17) + name
    return rec + b"\0" * (-len(rec) % 8)


def _dirent_plus(name: bytes, a: Attr, off: int) -> bytes:
    return entry_out(a) + _dirent(name, a, off)  # (the entry part is 128 bytes: the record stays 8-aligned)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(mnt: Path, fsname: str, subtype: str) -> int:
    """Mount a read-only FUSE file system at ``mnt``; the /dev/fuse descriptor that serves it (non-blocking)."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise UnavailableError(f"lazyfs: cannot open /dev/fuse ({e.strerror}): load the fuse module "
                               "(modprobe fuse)") from None
    data = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other"
    if _libc().mount(fsname.encode(), os.fsencode(mnt), f"fuse.{subtype}".encode(),
                     _MS_RDONLY | _MS_NOSUID | _MS_NODEV, data.encode()) != 0:
        code = ctypes.get_errno()
        os.close(fd)
        hint = ": the lazy mount needs root (CAP_SYS_ADMIN)" if code == errno.EPERM else ""
        raise UnavailableError(f"lazyfs: cannot mount FUSE at {mnt}: {os.strerror(code)}{hint}")
    return fd


def unmount(mnt: Path) -> None:
    """Detach the mount at ``mnt`` (lazy: files still open keep working until closed); quiet if it is gone."""
    if _libc().umount2(os.fsencode(mnt), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):
            log.warning("lazyfs: cannot unmount %s: %s", mnt, os.strerror(code))


class Session:
    """One mounted FUSE connection and its request loop (:meth:`serve`)."""

    def __init__(self, ops: Operations, mnt: Path, fsname: str = "cvmfs-snap-lazy", subtype: str = "cvmfs-snap"
                 ) -> None:
        self.ops, self.mnt = ops, mnt
        self.fd = mount(mnt, fsname, subtype)
        #: requests received, by opcode
        self.counts: Counter[int] = Counter()
        self.kernel_flags = 0
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def request_counts(self) -> dict[str, int]:
        """Requests received so far, by name (``op<N>`` for those we do not implement)."""
        return {OPCODE_NAMES.get(op, f"op{op}"): n for op, n in sorted(self.counts.items())}

    # ------------------------------------------------------------------ replies
    def _reply(self, unique: int, body: bytes | memoryview = b"") -> None:
        self._write([_OUT.pack(16 + len(body), 0, unique), body])

    def _error(self, unique: int, code: int) -> None:
        self._write([_OUT.pack(16, -code, unique)])

    def _write(self, parts: list[bytes | memoryview]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as e:  # ENOENT: the request was interrupted; ENODEV: unmounted
            if e.errno not in _GONE:
                log.warning("lazyfs: answering the kernel failed: %s", e)

    def _notify(self, code: int, parts: list[bytes | memoryview], quiet: bool = False) -> None:
        """Write a notification (``code`` in the error field, unique 0) of ``parts``; ``quiet``: nothing raised
        where the kernel has no such entry or the mount is gone."""
        try:
            os.writev(self.fd, [_OUT.pack(16 + sum(len(p) for p in parts), code, 0), *parts])
        except OSError as e:
            if not quiet or e.errno not in _GONE:
                raise

    def notify_store(self, ino: int, offset: int, data: bytes | memoryview) -> None:
        """Put ``data`` into ``ino``'s page cache at ``offset``. It may wait for the inode's page locks, which a
        READ waiting for the trio loop holds: call it from a worker thread, never from the loop or the FUSE
        thread."""
        self._notify(NOTIFY_STORE, [_STORE.pack(ino, offset, len(data), 0), data])

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Drop the kernel's entry ``name`` of directory ``parent`` (quiet where the kernel has none, or the mount
        is gone). It may wait for the directory's lock, which a request the FUSE thread has yet to answer may
        hold: never call it from the FUSE thread."""
        self._notify(NOTIFY_INVAL_ENTRY, [_INVAL_ENTRY.pack(parent, len(name), 0), name, b"\0"], quiet=True)

    def invalidate_inode(self, ino: int) -> None:
        """Drop the kernel's attributes and cached pages of ``ino`` (a directory: its cached listing); quiet and
        never from the FUSE thread, as :meth:`invalidate_entry`."""
        self._notify(NOTIFY_INVAL_INODE, [_INVAL_INODE.pack(ino, 0, -1)], quiet=True)

    # ------------------------------------------------------------------ the loop
    async def serve(self) -> None:
        """Answer requests until the mount goes away (unmounted from outside: returns) or the task is cancelled.

        The requests are read by a thread of their own, which answers the metadata ones and the READs whose bytes
        are in memory (``Operations.read_now``) and waits in the kernel while there is nothing to do; the other
        READs are handed to this trio loop, a task each."""
        async with trio.open_nursery() as nursery:
            self._nursery, self._token = nursery, trio.lowlevel.current_trio_token()
            nursery.start_soon(self._stop_on_cancel)
            await trio.to_thread.run_sync(self._loop)
            nursery.cancel_scope.cancel()

    async def _stop_on_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            os.write(self._wake_w, b"x")

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start ``fn(*args)`` as a task of the loop's trio run (from any thread; dropped once it has ended)."""
        token, nursery = self._token, self._nursery
        if token is None or nursery is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(nursery.start_soon, fn, *args)

    def _loop(self) -> None:
        token, nursery = self._token, self._nursery
        assert token is not None and nursery is not None
        fd, buf, read_now = self.fd, bytearray(BUFFER_SIZE), self.ops.read_now
        view, counts = memoryview(buf), self.counts
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                if any(f == self._wake_r for f, _ in poller.poll()):
                    return
                continue
            except OSError as e:
                if e.errno == errno.ENODEV:  # unmounted
                    return
                if e.errno in (errno.EINTR, errno.ENOENT):
                    continue
                raise
            _, op, unique, nodeid, _, _, _, _, _ = _IN.unpack_from(buf)
            counts[op] += 1
            if op == READ:
                _, offset, size = _READ_IN.unpack_from(buf, 40)
                try:
                    data = read_now(nodeid, offset, size)
                except Exception:  # (read() answers the error)
                    data = None
                if data is not None:
                    self._reply(unique, data)
                    continue
                try:
                    token.run_sync_soon(nursery.start_soon, self._read, unique, nodeid, offset, size)
                except trio.RunFinishedError:
                    return
            elif op not in NO_REPLY:
                self._dispatch(op, unique, nodeid, view[40:n])
                if op == INIT:
                    token.run_sync_soon(self.ops.init)  # once the kernel has the answer

    async def _read(self, unique: int, ino: int, offset: int, size: int) -> None:
        try:
            data = await self.ops.read(ino, offset, size)
        except FuseError as e:
            self._error(unique, e.errno)
        except Exception:
            log.exception("lazyfs: read of inode %d failed", ino)
            self._error(unique, errno.EIO)
        else:
            self._reply(unique, data)

    def _dispatch(self, op: int, unique: int, nodeid: int, body: memoryview) -> None:
        handler = self._handlers.get(op)
        if handler is None:
            self._error(unique, errno.ENOSYS)
            return
        try:
            out = handler(self, nodeid, body)
        except FuseError as e:
            self._error(unique, e.errno)
        except Exception:
            log.exception("lazyfs: FUSE request %d on inode %d failed", op, nodeid)
            self._error(unique, errno.EIO)
        else:
            if isinstance(out, int):
                self._error(unique, out)
            else:
                self._reply(unique, out)

    # ------------------------------------------------------------------ handlers: bytes to answer, or an errno
    def _init(self, _: int, body: memoryview) -> bytes | int:
        major, minor, _ra, flags = _INIT_IN.unpack_from(body)
        if major != 7 or minor < MIN_KERNEL_MINOR:
            log.error("lazyfs: the kernel speaks FUSE %d.%d; this needs 7.%d or later (Linux 5.1+)", major, minor,
                      MIN_KERNEL_MINOR)
            return errno.EPROTO
        if flags & (NO_OPEN_SUPPORT | NO_OPENDIR_SUPPORT) != NO_OPEN_SUPPORT | NO_OPENDIR_SUPPORT:
            log.error("lazyfs: the kernel's FUSE cannot open files and directories without asking the process "
                      "(FUSE_NO_OPEN_SUPPORT, FUSE_NO_OPENDIR_SUPPORT: Linux 5.1+)")
            return errno.EPROTO
        self.kernel_flags = flags
        return _INIT_OUT.pack(7, min(minor, PROTO_MINOR), MAX_READAHEAD, flags & WANTED, MAX_BACKGROUND,
                              CONGESTION_THRESHOLD, MAX_WRITE, 1, MAX_PAGES, 0, 0, 0)

    def _lookup(self, parent: int, body: memoryview) -> bytes | int:
        return entry_out(self.ops.lookup(parent, bytes(body[:-1])))

    def _getattr(self, ino: int, _: memoryview) -> bytes | int:
        a = self.ops.getattr(ino)
        s, ns = _timeout(a.timeout)
        return _ATTR_HEAD.pack(s, ns, 0) + a.pack()

    def _readlink(self, ino: int, _: memoryview) -> bytes | int:
        return self.ops.readlink(ino)

    def _open(self, ino: int, _: memoryview) -> bytes | int:
        return errno.ENOSYS  # no-open mode (see the module docstring)

    def _opendir(self, ino: int, _: memoryview) -> bytes | int:
        return errno.ENOSYS  # no-opendir mode: listings are cached, directories opened without a request

    def _listing(self, ino: int, body: memoryview, plus: bool) -> bytes:
        _, start, size = _READ_IN.unpack_from(body)
        out: list[bytes] = []
        used = 0
        pack = _dirent_plus if plus else _dirent
        for i, (name, a) in enumerate(self.ops.readdir(ino, start), start + 1):
            rec = pack(name, a, i)
            if used + len(rec) > size:
                break
            out.append(rec)
            used += len(rec)
        return b"".join(out)

    def _readdir(self, ino: int, body: memoryview) -> bytes | int:
        return self._listing(ino, body, False)

    def _readdirplus(self, ino: int, body: memoryview) -> bytes | int:
        return self._listing(ino, body, True)

    def _ok(self, _: int, __: memoryview) -> bytes | int:
        return b""

    def _ioctl(self, _: int, __: memoryview) -> bytes | int:
        return errno.ENOTTY  # (``isatty`` of a file opened on the mount itself; overlayfs never passes one down)

    def _getxattr(self, ino: int, body: memoryview) -> bytes | int:
        size, _ = _GETXATTR_IN.unpack_from(body)
        value = self.ops.getxattr(ino, bytes(body[8:]).split(b"\0", 1)[0])
        if size == 0:
            return _U32PAIR.pack(len(value), 0)
        return value if len(value) <= size else errno.ERANGE

    def _listxattr(self, ino: int, body: memoryview) -> bytes | int:
        size, _ = _GETXATTR_IN.unpack_from(body)
        names = b"".join(n + b"\0" for n in self.ops.listxattr(ino))
        if size == 0:
            return _U32PAIR.pack(len(names), 0)
        return names if len(names) <= size else errno.ERANGE

    def _statfs(self, _: int, __: memoryview) -> bytes | int:
        s = self.ops.statfs()
        return _STATFS.pack(s.blocks, 0, 0, s.files, 0, s.bsize, s.namelen, s.bsize, 0)

    _handlers: dict[int, Callable[[Session, int, memoryview], bytes | int]] = {
        INIT: _init, LOOKUP: _lookup, GETATTR: _getattr, READLINK: _readlink, OPEN: _open, OPENDIR: _opendir,
        READDIR: _readdir, READDIRPLUS: _readdirplus, RELEASEDIR: _ok, RELEASE: _ok, DESTROY: _ok,
        GETXATTR: _getxattr, LISTXATTR: _listxattr, STATFS: _statfs, IOCTL: _ioctl,
    }

    def close(self, *, unmount_it: bool = True) -> None:
        """Unmount (detached) and close the connection; pending requests fail with ENOTCONN."""
        if self._closed:
            return
        self._closed = True
        if unmount_it:
            unmount(self.mnt)
        for fd in (self.fd, self._wake_r, self._wake_w):
            os.close(fd)
