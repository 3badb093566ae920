"""Mount :class:`cvmfs_snap.lazyfs.fs.LazyFS` inside the test process (its trio loop in a thread), with layers
served from eStargz blobs held in memory (:class:`BlobFiles`, a stand-in for the LayerReader that needs no
registry). For tests of the file system itself; the process with real readers is tested through
``cvmfs-snap lazyfs``."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio  # type: ignore[import-untyped]

from cvmfs_snap.estargz import EStargz, open_bytes
from cvmfs_snap.lazyfs.fs import LazyFS
from cvmfs_snap.lazyfs.fuse import Session
from cvmfs_snap.lazyfs.tree import build_tree


class BlobFiles:
    """Verified reads of a blob in memory; :meth:`corrupt` damages it (reads must then fail)."""

    def __init__(self, blob: bytes) -> None:
        self.blob = bytearray(blob)
        self.stargz: EStargz = open_bytes(bytes(blob))
        self.reads = 0
        self.ready = False
        self.ready_reads = 0

    async def read(self, path: str, offset: int, size: int) -> bytes:
        self.reads += 1
        return await trio.to_thread.run_sync(
            lambda: self.stargz.read_file(lambda o, n: bytes(self.blob[o:o + n]), path, offset, size))

    def read_ready(self, path: str, offset: int, size: int) -> bytes | None:
        """None (every read goes through ``read``, counted) unless ``ready`` is set: then the bytes, counted in
        ``ready_reads`` (a reader whose chunks are in memory)."""
        if not self.ready:
            return None
        self.ready_reads += 1
        return self.stargz.read_file(lambda o, n: bytes(self.blob[o:o + n]), path, offset, size)

    def corrupt(self, path: str) -> None:
        """Flip the compressed bytes of ``path``'s first chunk."""
        off, n = self.stargz.chunks_for(path, 0, 1)[0].blob_range
        for i in range(off + n // 4, off + n // 2 + 1):
            self.blob[i] ^= 0xFF


class MountedFS:
    def __init__(self, fs: LazyFS, mnt: Path, token: Any) -> None:
        self.fs, self.mnt, self.token = fs, mnt, token

    def add(self, layer_id: str, blob: bytes, *, store: bool = False) -> BlobFiles:
        files = BlobFiles(blob)
        tree = build_tree(files.stargz.toc)
        stored = list(files.stargz.toc.chunks) if store else []
        trio.from_thread.run_sync(lambda: self.fs.add_layer(layer_id, tree, files, stored), trio_token=self.token)
        return files

    def remove(self, layer_id: str) -> None:
        trio.from_thread.run_sync(lambda: self.fs.remove_layer(layer_id), trio_token=self.token)


@contextmanager
def mounted_lazyfs(mnt: Path) -> Iterator[MountedFS]:
    mnt.mkdir(parents=True, exist_ok=True)
    fs = LazyFS()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        session = fs.session = Session(fs, mnt, "cvmfs-snap-test")
        try:
            async with trio.open_nursery() as n:
                box["nursery"] = n
                ready.set()
                await session.serve()
        finally:
            fs.session = None
            session.close()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:
            box["error"] = e
            ready.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(20), "lazyfs mount did not start"
    if "error" in box:
        raise box["error"]
    try:
        yield MountedFS(fs, mnt, box["token"])
    finally:
        trio.from_thread.run_sync(box["nursery"].cancel_scope.cancel, trio_token=box["token"])
        t.join(20)
        if t.is_alive():
            subprocess.run(["umount", "-l", str(mnt)], check=False)
