"""LayerReader.read_ready (cvmfs_snap/lazyfs/reader.py), what the FUSE thread answers a READ with when the bytes are
in memory already: the same bytes as ``read``, None whenever ``read`` would need I/O or has an error to give, from
another thread too; the readahead such a read continues still starts."""

from __future__ import annotations

import threading
from pathlib import Path

import trio  # type: ignore[import-untyped]

from cvmfs_snap.lazyfs.reader import open_layer_reader
from cvmfs_snap.oci.client import RegistryClient
from cvmfs_snap_devenv.registry import Registry
from tests.support.range_proxies import PushedLayer, range_proxy
from tests.test_lazy_reader import CHUNK, layer, make_fetcher, new_cache, open_reader

__all__ = ["layer"]  # the module fixture


def test_read_ready_answers_from_memory_only(client: RegistryClient, layer: PushedLayer, registry: Registry,
                                             tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    blob = layer.files["data/blob2"]

    async def main() -> None:
        with range_proxy(registry.url) as proxy:
            r = await open_reader(client, proxy.host, layer, cache)
            assert r.read_ready("etc/small.conf", 0, 4096) is None  # no read yet: not in memory
            assert await r.read("etc/small.conf", 0, 4096) == b"answer = 42\n"
            gets = len(proxy.blob_gets)
            got: list[object] = []
            t = threading.Thread(target=lambda: got.append(r.read_ready("etc/small.conf", 0, 4096)))
            t.start()
            t.join()
            assert got == [b"answer = 42\n"] and len(proxy.blob_gets) == gets  # from another thread, no request
            assert bytes(await r.read("data/blob2", CHUNK, 10)) == blob[CHUNK:CHUNK + 10]
            ready = r.read_ready("data/blob2", CHUNK + 5, 100)
            assert ready is not None and bytes(ready) == blob[CHUNK + 5:CHUNK + 105]
            assert r.read_ready("data/blob2", CHUNK - 10, 20) is None  # half of it in a chunk not read yet
            assert r.read_ready("data", 0, 10) is None  # a directory: read() gives the error
            assert r.read_ready("no/such", 0, 10) is None
            assert r.read_ready("empty", 0, 10) == b""

    trio.run(main)


def test_reads_answered_from_memory_keep_the_readahead_going(client: RegistryClient, layer: PushedLayer,
                                                            registry: Registry, tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    blob = layer.files["data/blob5"]  # 300,000 bytes: chunks 0-4, stored in order

    async def main() -> None:
        with range_proxy(registry.url) as proxy:
            f = make_fetcher(client, proxy.host, layer)
            r = await open_layer_reader(f, cache, digest=layer.digest, size=layer.size,
                                        toc_digest=layer.toc_digest, readahead_bytes=8 * CHUNK)
            for pos in (0, CHUNK):  # two reads in order start the readahead
                assert bytes(await r.read("data/blob5", pos, CHUNK)) == blob[pos:pos + CHUNK]
            for pos in range(2 * CHUNK, len(blob), CHUNK):
                await trio.sleep(0.01)  # the readahead it started runs, then
                await r.settle()
                ready = r.read_ready("data/blob5", pos, CHUNK)  # each answered from memory only: had these not
                assert ready is not None, pos  # continued the readahead, the next chunk would not be there
                assert bytes(ready) == blob[pos:pos + CHUNK]

    trio.run(main)
