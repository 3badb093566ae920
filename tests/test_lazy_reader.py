"""LayerReader: verified reads through a real docker-registry (and misbehaving proxies), the chunk cache,
prefetch of the landmark set and the background fetch; blobs built by our writer and by Go's estargz."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import IntegrityError, InvalidInputError, UnavailableError
from cvmfs_snap.lazyfs import cachefiles
from cvmfs_snap.lazyfs.cache import ChunkCache
from cvmfs_snap.lazyfs.metrics import LazyMetrics
from cvmfs_snap.lazyfs.reader import TAIL_READ, LayerReader, ReadActivity, open_layer_reader
from cvmfs_snap.lazyfs.remote import BlobFetcher
from cvmfs_snap.oci.client import RegistryClient
from cvmfs_snap.oci.reference import ImageReference
from cvmfs_snap_devenv.registry import Registry
from tests.support.range_proxies import Behaviour, PushedLayer, push_estargz, range_proxy

CHUNK = 64 * 1024


def content() -> dict[str, bytes]:
    files = {f"data/blob{i}": os.urandom(300_000) for i in range(8)}  # ~2.4 MB of incompressible data
    files["etc/small.conf"] = b"answer = 42\n"
    files["bin/tool"] = os.urandom(100_000) + b"\0" * 100_000
    files["empty"] = b""
    return files


@pytest.fixture(scope="module")
def layer(registry: Registry) -> PushedLayer:
    return push_estargz(registry.host, "lazy/reader", content(), chunk_size=CHUNK,
                        prioritized=("etc/small.conf", "bin/tool"))


def make_fetcher(client: RegistryClient, host: str, layer: PushedLayer, cls: type[BlobFetcher] = BlobFetcher,
                 **kw: Any) -> BlobFetcher:
    ref = ImageReference.parse(f"{host}/{layer.ref.split('/', 1)[1]}")
    return cls(client, ref, layer.digest, layer.size, backoff=0.01, metrics=LazyMetrics(), **kw)


async def open_reader(client: RegistryClient, host: str, layer: PushedLayer, cache: ChunkCache,
                      cls: type[BlobFetcher] = BlobFetcher, activity: ReadActivity | None = None,
                      **kw: Any) -> LayerReader:
    f = make_fetcher(client, host, layer, cls, **kw)
    return await open_layer_reader(f, cache, digest=layer.digest, size=layer.size, toc_digest=layer.toc_digest,
                                   metrics=LazyMetrics(), activity=activity)


def new_cache(tmp: Path, max_bytes: int = 1 << 30, **kw: Any) -> ChunkCache:
    return ChunkCache(tmp / "cache", max_bytes, metrics=LazyMetrics(), **kw)


def test_reads_return_the_files_bytes_and_fetch_only_what_they_need(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    cache = new_cache(tmp_path)

    async def main() -> None:
        with range_proxy(registry.url) as proxy:
            r = await open_reader(client, proxy.host, layer, cache)
            # footer and TOC in one range request: the blob's last TAIL_READ bytes
            assert [(rng, n) for rng, _, n in proxy.blob_gets] == [
                (f"bytes={layer.size - TAIL_READ}-{layer.size - 1}", TAIL_READ)]
            toc_bytes = proxy.bytes_sent
            assert await r.read("etc/small.conf", 0, 4096) == b"answer = 42\n"
            assert proxy.bytes_sent - toc_bytes < 0.02 * layer.size
            blob = layer.files["data/blob3"]
            for off, n in [(0, 10), (CHUNK - 5, 10), (3 * CHUNK, 2 * CHUNK + 7), (len(blob) - 3, 100),
                           (len(blob), 10), (0, len(blob))]:
                assert await r.read("/data/blob3", off, n) == blob[off:off + n]
            assert await r.read("empty", 0, 100) == b""
            with pytest.raises(InvalidInputError):
                await r.read("data", 0, 10)  # a directory
            with pytest.raises(InvalidInputError):
                await r.read("no/such", 0, 10)
            assert 0 < r.fetched_fraction() < 0.3 and not r.is_complete()

    trio.run(main)


def test_a_toc_larger_than_the_tail_read_costs_one_more_request(registry: Registry, client: RegistryClient,
                                                                 tmp_path: Path) -> None:
    files = {f"d/{os.urandom(12).hex()}": os.urandom(8) for _ in range(3000)}  # names that do not compress
    big = push_estargz(registry.host, "lazy/bigtoc", files)
    assert big.size > 2 * TAIL_READ

    async def main() -> None:
        with range_proxy(registry.url) as proxy:
            r = await open_reader(client, proxy.host, big, new_cache(tmp_path))
            assert len(proxy.blob_gets) == 2  # the tail, then the TOC's start
            toc_offset = r.stargz.footer.toc_offset
            assert big.size - toc_offset > TAIL_READ
            assert proxy.blob_gets[1][0] == f"bytes={toc_offset}-{big.size - TAIL_READ - 1}"
            name = sorted(files)[1234]
            assert await r.read(name, 0, 100) == files[name]

    trio.run(main)


def test_a_restarted_reader_serves_from_the_cache_without_the_registry(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    async def first() -> None:
        r = await open_reader(client, registry.host, layer, new_cache(tmp_path))
        assert await r.read("bin/tool", 0, 200_000) == layer.files["bin/tool"]

    async def second() -> None:
        with range_proxy(registry.url) as proxy:
            r = await open_reader(client, proxy.host, layer, new_cache(tmp_path))  # a new process, same cache
            assert await r.read("bin/tool", 1000, 150_000) == layer.files["bin/tool"][1000:151_000]
            assert proxy.blob_gets == []  # TOC and chunks both came from the cache

    trio.run(first)
    trio.run(second)


def test_wrong_toc_digest_is_refused(client: RegistryClient, layer: PushedLayer, registry: Registry,
                                     tmp_path: Path) -> None:
    async def main() -> None:
        f = make_fetcher(client, registry.host, layer)
        with pytest.raises(IntegrityError, match="TOC digest"):
            await open_layer_reader(f, new_cache(tmp_path), digest=layer.digest, size=layer.size,
                                    toc_digest="sha256:" + "0" * 64)

    trio.run(main)


def test_corrupted_bytes_are_fetched_again_or_give_an_error_never_wrong_data(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    blob = layer.files["data/blob1"]

    async def main() -> None:
        with range_proxy(registry.url) as proxy:
            r = await open_reader(client, proxy.host, layer, cache)
            proxy.behaviour.corrupt = 1  # one bad answer: the chunk is fetched again
            assert await r.read("data/blob1", 0, 1000) == blob[:1000]
            proxy.behaviour.corrupt = -1  # always bad: EIO (IntegrityError), nothing cached
            with pytest.raises(IntegrityError, match="data/blob1"):
                await r.read("data/blob1", 3 * CHUNK, 1000)
            chunk = r.stargz.chunks_for("data/blob1", 3 * CHUNK, 1)[0]
            assert not cache.contains(chunk.entry.chunk_digest)
            proxy.behaviour.corrupt = 0
            assert await r.read("data/blob1", 3 * CHUNK, 1000) == blob[3 * CHUNK:3 * CHUNK + 1000]

    trio.run(main)


def test_a_chunk_damaged_on_disk_is_discarded_and_fetched_again(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    cache = new_cache(tmp_path, memory_bytes=0)  # no memory tier: the second read goes to the disk
    blob = layer.files["data/blob2"]

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, cache)
        assert await r.read("data/blob2", 0, 100) == blob[:100]
        await r.settle()  # the chunk's write to the disk cache runs after the read
        key = r.stargz.chunks_for("data/blob2", 0, 1)[0].entry.chunk_digest.split(":")[1]
        path = cache.directory / "chunks" / key[:2] / key
        damaged = bytearray(path.read_bytes())
        damaged[10] ^= 1
        path.write_bytes(bytes(damaged))
        before = r.bytes_fetched
        assert await r.read("data/blob2", 0, 100) == blob[:100]
        assert r.bytes_fetched > before
        await r.settle()
        assert path.read_bytes() == blob[:CHUNK]

    trio.run(main)


def test_a_chunk_damaged_in_a_pack_is_discarded_and_fetched_again(registry: Registry, client: RegistryClient,
                                                                   tmp_path: Path) -> None:
    files = {f"etc/f{i:02d}": os.urandom(500 + i) for i in range(30)}
    layer = push_estargz(registry.host, "lazy/packed", files, chunk_size=CHUNK)
    names = sorted(files)

    async def main() -> None:
        cache = new_cache(tmp_path, memory_bytes=0)  # no memory tier: every read goes to the disk
        r = await open_reader(client, registry.host, layer, cache)
        r.readahead_bytes = 0
        await r.prefetch(0)  # nothing: the bound is 0
        await r._load([ref for n in names for ref in r.stargz.chunks_for(n)], hot=False)  # as background does
        (pack,) = list((cache.directory / "packs").iterdir())  # all 30 small chunks in one pack
        data = bytearray(pack.read_bytes())
        where = data.find(files[names[3]])
        data[where + 7] ^= 1
        pack.write_bytes(bytes(data))
        before = r.bytes_fetched
        assert await r.read(names[3], 0, 4096) == files[names[3]]  # refetched, never the damaged bytes
        assert r.bytes_fetched > before
        await r.settle()
        for n in names:  # the damaged pack went whole; its chunks come back from the registry when read
            assert await r.read(n, 0, 4096) == files[n]
        await r.settle()
        assert not pack.exists() and cache.stats.entries == len(names) + 1  # and the TOC

    trio.run(main)


def test_unreachable_registry_gives_unavailable(client: RegistryClient, layer: PushedLayer, registry: Registry,
                                                tmp_path: Path) -> None:
    async def main() -> None:
        with range_proxy(registry.url) as proxy:
            r = await open_reader(client, proxy.host, layer, new_cache(tmp_path), retries=1)
            proxy.behaviour.drop = -1
            with pytest.raises(UnavailableError):
                await r.read("data/blob4", 0, 10)

    trio.run(main)


def test_prefetch_fetches_the_landmark_set_within_its_bound(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    async def main() -> None:
        r = await open_reader(client, registry.host, layer, new_cache(tmp_path / "a"))
        assert r.stargz.prefetch[:2] == ["etc/small.conf", "bin/tool"] or "bin/tool" in r.stargz.prefetch
        await r.prefetch(64 * 1024 * 1024)
        with range_proxy(registry.url) as proxy:
            r.fetcher = make_fetcher(client, proxy.host, layer)
            assert await r.read("bin/tool", 0, 200_000) == layer.files["bin/tool"]
            assert await r.read("etc/small.conf", 0, 100) == b"answer = 42\n"
            assert proxy.blob_gets == []  # all prefetched
            assert await r.read("data/blob0", 0, 10) == layer.files["data/blob0"][:10]
            assert len(proxy.blob_gets) == 1  # not in the landmark set
        small = await open_reader(client, registry.host, layer, new_cache(tmp_path / "b"))
        before = small.bytes_fetched
        await small.prefetch(1000)  # bound: only what fits (the small file), not the tool's chunks
        assert small.bytes_fetched - before < 1000
        assert small.fetched_fraction() < 0.01

    trio.run(main)


class GatedFetcher(BlobFetcher):
    """The real fetcher, with a gate in front of ranges the test names (to hold a real read while it waits)."""

    gate: trio.Event
    hold: tuple[int, int] | None = None

    async def fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if self.hold is not None and self.hold in ranges:
            await self.gate.wait()
        return await super().fetch(ranges)

    async def stream(self, ranges: Sequence[tuple[int, int]], deliver: Callable[[int, bytes], None]) -> None:
        if self.hold is not None and self.hold in ranges:
            await self.gate.wait()
        await super().stream(ranges, deliver)


def test_background_fetch_completes_and_pauses_while_reads_wait(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    cache = new_cache(tmp_path)

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, cache, GatedFetcher)
        f = r.fetcher
        assert isinstance(f, GatedFetcher)
        f.gate = trio.Event()
        f.hold = r.stargz.chunks_for("data/blob7", 0, 1)[0].blob_range
        got: list[bytes] = []
        async with trio.open_nursery() as n:
            async def read() -> None:
                got.append(await r.read("data/blob7", 0, 100))
            n.start_soon(read)
            await trio.sleep(0.05)
            assert r.activity.waiting == 1
            start = f.requests
            r.start_background(n)
            await trio.sleep(0.5)
            assert f.requests == start and r.background_state == "running"  # paused: a read is waiting
            f.gate.set()
            with trio.fail_after(60):
                while r.background_state == "running":
                    await trio.sleep(0.05)
        assert got == [layer.files["data/blob7"][:100]]
        assert r.background_state == "done" and r.is_complete() and r.fetched_fraction() == 1.0
        assert r.metrics.registry.get_sample_value("cvmfs_snap_lazy_background_fraction",
                                                   {"layer": layer.digest}) == 1.0
        with range_proxy(registry.url) as proxy:
            r.fetcher = make_fetcher(client, proxy.host, layer)
            for name, data in layer.files.items():
                assert await r.read(name, 0, len(data) + 1) == data
            assert proxy.blob_gets == []
        # the whole blob was fetched about once: background batches do not refetch what reads got
        assert f.bytes_fetched < 1.2 * layer.size

    trio.run(main)


def test_cache_bound_holds_while_reading_more_than_it(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    bound = 500_000
    cache = new_cache(tmp_path, max_bytes=bound)

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, cache)
        for name, data in layer.files.items():
            assert await r.read(name, 0, len(data)) == data
            assert cache.stats.bytes <= bound
        await r.settle()  # readahead still storing (and evicting) would race the count below
        assert cache.stats.evictions > 0
        du = sum(p.stat().st_size for d in (cache.directory / "chunks").iterdir() for p in d.iterdir())
        du += sum(p.stat().st_size for p in (cache.directory / "packs").iterdir())
        assert du <= bound

    trio.run(main)


def test_release_frees_the_layers_chunks(client: RegistryClient, layer: PushedLayer, registry: Registry,
                                         tmp_path: Path) -> None:
    cache = new_cache(tmp_path)

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, cache)
        await r.read("data/blob5", 0, 300_000)
        await r.settle()  # the chunks' writes run after the read
        assert cache.stats.entries > 1
        r.close()
        cache.release_layer(layer.digest)
        assert cache.stats.entries == 0 and cache.stats.bytes == 0

    trio.run(main)


def test_blob_built_by_go_estargz_reads_the_same(client: RegistryClient, registry: Registry,
                                                 tmp_path: Path) -> None:
    files = {"a/one": os.urandom(200_000), "a/two": b"two\n" * 1000, "three": b"3"}
    (tmp_path / "go").mkdir()
    layer = push_estargz(registry.host, "lazy/go", files, chunk_size=CHUNK, prioritized=("three",),
                         go=tmp_path / "go")

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, new_cache(tmp_path))
        await r.prefetch(1 << 20)
        for name, data in files.items():
            assert await r.read(name, 0, len(data)) == data
            assert await r.read(name, 7, 70_001) == data[7:70_008]

    trio.run(main)


def test_readahead_follows_sequential_reads_and_stays_within_a_file_read_alone(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    blob = layer.files["data/blob6"]

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, new_cache(tmp_path))
        r.readahead_bytes = 1 << 20
        chunks = r.stargz.chunks_for("data/blob6")
        for off in range(0, 2 * CHUNK, 16 * 1024):  # sequential reads of the file's first two chunks
            assert await r.read("data/blob6", off, 16 * 1024) == blob[off:off + 16 * 1024]
        await r.settle()  # readahead runs in its own tasks
        cached = [r.cache.contains(c.entry.chunk_digest) for c in chunks]
        assert all(cached), cached  # the rest of the file came ahead of the reads
        # ... but nothing of the files stored after it: this file was read alone
        nxt = r.stargz.chunks_for("data/blob7", 0, 1)[0]
        assert not r.cache.contains(nxt.entry.chunk_digest)
        requests = r.fetcher.requests
        assert await r.read("data/blob6", len(blob) - 100, 100) == blob[-100:]
        assert r.fetcher.requests == requests

    trio.run(main)


def test_concurrent_reads_of_a_cold_chunk_fetch_and_decode_it_once(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    blob = layer.files["data/blob0"]

    async def main() -> None:
        with range_proxy(registry.url) as proxy:
            r = await open_reader(client, proxy.host, layer, cache)
            r.readahead_bytes = 0
            before = len(proxy.blob_gets)
            got: list[bytes] = []

            async def one(off: int) -> None:
                got.append(bytes(await r.read("data/blob0", off, 1000)))
            async with trio.open_nursery() as n:
                for i in range(8):
                    n.start_soon(one, i * 4096)
            assert sorted(got) == sorted(blob[i * 4096:i * 4096 + 1000] for i in range(8))
            assert len(proxy.blob_gets) - before == 1
            # the TOC lookup and the first read's chunk lookup missed; the other reads waited for that one
            assert cache.stats.misses == 2 and cache.stats.hits == 7 and r.fetcher.requests == 2  # tail, chunk

    trio.run(main)


def test_zstd_chunked_blob_reads_the_same(client: RegistryClient, registry: Registry, tmp_path: Path) -> None:
    files = {"z/one": os.urandom(150_000) + b"z" * 100_000, "z/two": b"two\n" * 5000}
    layer = push_estargz(registry.host, "lazy/zstd", files, chunk_size=CHUNK, compression="zstd")

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, new_cache(tmp_path))
        assert r.stargz.footer.compression == "zstd"
        for name, data in files.items():
            assert await r.read(name, 0, len(data)) == data
            assert await r.read(name, CHUNK - 3, 10) == data[CHUNK - 3:CHUNK + 7]

    trio.run(main)


def test_layer_on_a_registry_ignoring_range_is_read_from_one_spooled_download(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    async def main() -> None:
        with range_proxy(registry.url, Behaviour(ignore_range=True)) as proxy:
            r = await open_reader(client, proxy.host, layer, new_cache(tmp_path), spool_dir=tmp_path / "spool")
            for name, data in layer.files.items():
                assert await r.read(name, 0, len(data)) == data
            whole = [g for g in proxy.blob_gets if g[1] == 200]
            # one probe (closed unread) + one download for the footer, the TOC and every chunk
            assert len(whole) == 2 and r.fetcher.bytes_fetched == layer.size
            r.close()
            assert list((tmp_path / "spool").iterdir()) == []

    trio.run(main)


def test_background_of_one_layer_pauses_while_a_read_of_another_waits(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    other = push_estargz(registry.host, "lazy/other", {"o/x": os.urandom(400_000)}, chunk_size=CHUNK)
    cache = new_cache(tmp_path)
    shared = ReadActivity()

    async def main() -> None:
        a = await open_reader(client, registry.host, layer, cache, GatedFetcher, activity=shared)
        b = await open_reader(client, registry.host, other, cache, activity=shared)
        fa = a.fetcher
        assert isinstance(fa, GatedFetcher)
        fa.gate = trio.Event()
        fa.hold = a.stargz.chunks_for("data/blob7", 0, 1)[0].blob_range
        async with trio.open_nursery() as n:
            async def read() -> None:
                await a.read("data/blob7", 0, 100)
            n.start_soon(read)
            await trio.sleep(0.05)
            start = b.fetcher.requests
            b.start_background(n)
            await trio.sleep(0.5)
            assert b.fetcher.requests == start  # layer b waits for layer a's read
            fa.gate.set()
            with trio.fail_after(60):
                while b.background_state == "running":
                    await trio.sleep(0.05)
        assert b.is_complete()

    trio.run(main)


def test_prefetch_from_a_failing_registry_raises_unavailable(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    async def main() -> None:
        with range_proxy(registry.url) as proxy:
            r = await open_reader(client, proxy.host, layer, new_cache(tmp_path), retries=0)
            proxy.behaviour.drop = -1
            with pytest.raises(UnavailableError):  # the error itself, not wrapped in an exception group
                await r.prefetch(64 * 1024 * 1024)

    trio.run(main)


def test_spooled_blob_goes_once_the_layer_is_cached_and_comes_back_if_needed(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    cache = new_cache(tmp_path, memory_bytes=0)

    async def main() -> None:
        with range_proxy(registry.url, Behaviour(ignore_range=True)) as proxy:
            r = await open_reader(client, proxy.host, layer, cache, spool_dir=tmp_path / "spool")
            async with trio.open_nursery() as n:
                r.start_background(n)
            assert r.background_state == "done" and r.is_complete()
            assert list((tmp_path / "spool").iterdir()) == []  # complete: the spool file is gone
            cache.release_layer(layer.digest)  # e.g. evicted: the next read downloads the blob again
            assert await r.read("bin/tool", 0, 10) == layer.files["bin/tool"][:10]
            assert len(list((tmp_path / "spool").iterdir())) == 1

    trio.run(main)


def test_readahead_stays_within_its_window_of_the_reads(registry: Registry, client: RegistryClient,
                                                        tmp_path: Path) -> None:
    big = os.urandom(40 * CHUNK)
    layer = push_estargz(registry.host, "lazy/bigfile", {"big": big}, chunk_size=CHUNK)

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, new_cache(tmp_path))
        r.readahead_bytes = 4 * CHUNK
        for off in range(0, CHUNK, 4096):  # 16 sequential reads inside the first chunk
            assert await r.read("big", off, 4096) == big[off:off + 4096]
        await r.settle()
        chunks = r.stargz.chunks_for("big")
        cached = sum(r.cache.contains(c.entry.chunk_digest) for c in chunks)
        assert 2 <= cached <= 1 + 5, cached  # the chunk read and at most a window (+1 partial chunk) ahead

    trio.run(main)


def test_small_files_read_in_order_are_read_ahead_from_the_disk_cache(registry: Registry, client: RegistryClient,
                                                                      tmp_path: Path) -> None:
    files = {f"usr/share/f{i:03d}": os.urandom(1000 + i) for i in range(200)}
    layer = push_estargz(registry.host, "lazy/smallfiles", files, chunk_size=CHUNK)
    names = sorted(files)

    async def fill() -> None:
        r = await open_reader(client, registry.host, layer, new_cache(tmp_path))
        for n in names:
            assert await r.read(n, 0, 4096) == files[n]
        await r.settle()

    async def restarted() -> None:
        cache = new_cache(tmp_path)  # a new process: the disk cache has every chunk, the memory tier none
        r = await open_reader(client, registry.host, layer, cache)
        loads: list[int] = []
        from_disk = r._from_disk

        def counted(keys: list[str], hot: bool) -> dict[str, bytes]:
            loads.append(len(keys))
            return from_disk(keys, hot)

        r._from_disk = counted  # type: ignore[method-assign]
        for n in names:
            assert await r.read(n, 0, 4096) == files[n]
            await trio.sleep(0)
        await r.settle()
        assert r.fetcher.requests == 0  # everything came from the disk cache (the TOC too),
        assert sum(loads) == len(names) and len(loads) <= 20, loads  # ... one thread hop per window, not per file

    trio.run(fill)
    trio.run(restarted)


class GatedCache(ChunkCache):
    """A chunk cache on a disk that takes as long as ``gate`` stays shut to store a chunk (a slow cache dir)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.armed = False
        self.waiting = 0

    def put_many(self, items: list[tuple[str, bytes]], layer: str) -> None:
        if self.armed:
            self.waiting += 1
            self.gate.wait(30)
        super().put_many(items, layer)


def test_small_chunks_that_wait_for_the_writer_share_a_pack_and_are_read_back_together(
        client: RegistryClient, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"usr/lib/f{i:03d}": os.urandom(700 + i) for i in range(60)}
    layer = push_estargz(registry.host, "lazy/packwrites", files, chunk_size=CHUNK)
    names = sorted(files)
    cache = GatedCache(tmp_path / "cache", 1 << 30, metrics=LazyMetrics())

    async def fill() -> None:
        r = await open_reader(client, registry.host, layer, cache)
        cache.armed = True  # the writer's first write gets stuck: what is read meanwhile waits for it
        timer = threading.Timer(30, cache.gate.set)  # a safety net only
        timer.start()
        try:
            for n in names:
                assert await r.read(n, 0, 4096) == files[n]
            assert cache.waiting == 1  # one writer task, stuck once, not a write per chunk
        finally:
            cache.gate.set()
            timer.cancel()
        await r.settle()

    async def restarted() -> None:
        c2 = new_cache(tmp_path)
        r = await open_reader(client, registry.host, layer, c2)
        opened: list[Path] = []
        read_pack, read_whole = cachefiles.read_pack, cachefiles.read_whole

        def pack(path: Path, slots: list[cachefiles.Slot]) -> dict[str, bytes]:
            opened.append(path)
            return read_pack(path, slots)

        def whole(path: Path) -> bytes | None:
            opened.append(path)
            return read_whole(path)

        monkeypatch.setattr(cachefiles, "read_pack", pack)
        monkeypatch.setattr(cachefiles, "read_whole", whole)
        for n in names:
            assert await r.read(n, 0, 4096) == files[n]
            await trio.sleep(0)
        assert r.fetcher.requests == 0 and c2.stats.entries == len(names) + 1  # and the TOC
        assert len(opened) <= 8, opened  # a few files read, not one per small file

    trio.run(fill)
    packs = list((cache.directory / "packs").iterdir())
    loose = [p for d in (cache.directory / "chunks").iterdir() for p in d.iterdir()]
    # the TOC, and the chunks of the first write (before it got stuck): all the others in one pack
    assert len(packs) <= 2 and len(loose) <= 2, (packs, loose)
    trio.run(restarted)


def test_a_read_does_not_wait_for_the_cache_write(client: RegistryClient, layer: PushedLayer, registry: Registry,
                                                  tmp_path: Path) -> None:
    cache = GatedCache(tmp_path / "cache", 1 << 30, metrics=LazyMetrics())
    blob = layer.files["data/blob2"]

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, cache)
        cache.armed = True  # the TOC is stored; now the chunks' writes get stuck
        timer = threading.Timer(30, cache.gate.set)  # a safety net only: the reads below must not need it
        timer.start()
        try:
            got = [bytes(await r.read("data/blob2", off, 16 * 1024)) for off in range(0, len(blob), 16 * 1024)]
        finally:
            timer.cancel()
        assert not cache.gate.is_set() and cache.waiting > 0  # served while the writes were still stuck
        assert b"".join(got) == blob
        again = await r.read("data/blob2", 100, 1000)  # served from the chunks on their way to the disk
        assert again == blob[100:1100] and r.fetcher.requests >= 1
        requests = r.fetcher.requests
        cache.gate.set()
        await r.settle()
        assert r.fetcher.requests == requests
        chunks = r.stargz.chunks_for("data/blob2")
        assert all(cache.contains(c.entry.chunk_digest) for c in chunks)

    trio.run(main)


def test_a_slow_cache_disk_slows_reads_instead_of_filling_memory(client: RegistryClient, layer: PushedLayer,
                                                                 registry: Registry, tmp_path: Path) -> None:
    cache = GatedCache(tmp_path / "cache", 1 << 30, metrics=LazyMetrics())
    names = [n for n in layer.files if n.startswith("data/")]

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, cache)
        r.readahead_bytes = 4 * CHUNK
        r.writes.max_bytes = 2 * CHUNK
        cache.armed = True
        got: dict[str, bytes] = {}
        finished = trio.Event()

        async def read_all() -> None:
            for n in names:
                got[n] = bytes(await r.read(n, 0, len(layer.files[n])))
            finished.set()

        timer = threading.Timer(30, cache.gate.set)  # a safety net only
        timer.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                await trio.sleep(1)
                assert not finished.is_set()  # the reads wait for the stuck writes...
                assert r.writes.pending_bytes <= r.writes.max_bytes + 10 * CHUNK  # ... instead of holding every chunk
                cache.gate.set()
        finally:
            timer.cancel()
        assert got == {n: layer.files[n] for n in names}

    trio.run(main)


def test_sequential_readahead_is_topped_up_in_large_requests(registry: Registry, client: RegistryClient,
                                                             tmp_path: Path) -> None:
    big = os.urandom(48 * CHUNK)
    layer = push_estargz(registry.host, "lazy/bigseq", {"big": big}, chunk_size=CHUNK)

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, new_cache(tmp_path))
        r.readahead_bytes = 8 * CHUNK
        before = r.fetcher.requests
        for off in range(0, len(big), 32 * 1024):
            assert await r.read("big", off, 32 * 1024) == big[off:off + 32 * 1024]
        await r.settle()
        # not one request per chunk (48): the window is refilled once half of it has been read
        assert r.fetcher.requests - before <= 20, r.fetcher.requests - before

    trio.run(main)


def test_chunks_on_their_way_to_the_cache_count_as_fetched(client: RegistryClient, layer: PushedLayer,
                                                           registry: Registry, tmp_path: Path) -> None:
    cache = GatedCache(tmp_path / "cache", 1 << 30, metrics=LazyMetrics())

    async def main() -> None:
        r = await open_reader(client, registry.host, layer, cache)
        r.readahead_bytes = 0
        cache.armed = True
        timer = threading.Timer(30, cache.gate.set)  # a safety net only
        timer.start()
        try:
            blob = layer.files["data/blob4"]
            assert await r.read("data/blob4", 0, len(blob)) == blob
            assert not cache.gate.is_set()
            assert r.fetched_fraction() > 0.05  # `cvmfs-snap status` right after the read sees it fetched
        finally:
            cache.gate.set()
            timer.cancel()
        await r.settle()

    trio.run(main)
