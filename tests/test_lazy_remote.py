"""BlobFetcher against a real docker-registry, directly and through misbehaving proxies (support/range_proxies)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import InvalidInputError, UnavailableError
from cvmfs_snap.lazyfs.metrics import LazyMetrics
from cvmfs_snap.lazyfs.remote import BlobFetcher
from cvmfs_snap.oci.auth import CredentialStore
from cvmfs_snap.oci.client import RegistryClient
from cvmfs_snap.oci.ranges import _take, merge_ranges
from cvmfs_snap.oci.reference import ImageReference
from cvmfs_snap_devenv.registry import Registry, start_registry
from tests.support.range_proxies import Behaviour, PushedLayer, push_estargz, range_proxy
from tests.support.token_issuer import start_token_issuer


@pytest.fixture(scope="module")
def layer(registry: Registry) -> PushedLayer:
    files = {f"d/f{i}": os.urandom(20_000) + bytes([i]) * 30_000 for i in range(12)}
    return push_estargz(registry.host, "lazy/remote", files, chunk_size=16 * 1024)


def fetcher(client: RegistryClient, host: str, layer: PushedLayer, **kw: Any) -> BlobFetcher:
    ref = ImageReference.parse(f"{host}/{layer.ref.split('/', 1)[1]}")
    kw.setdefault("backoff", 0.01)
    kw.setdefault("metrics", LazyMetrics())
    return BlobFetcher(client, ref, layer.digest, layer.size, **kw)


def run(fn: Callable[[], Any]) -> Any:
    return trio.run(fn)


RANGES = [(100, 50), (300, 10), (20_000, 5000), (60_000, 100), (60_150, 10)]


def test_merge_spans_joins_near_ranges_up_to_the_gap_and_the_span_limit() -> None:
    assert merge_ranges([(0, 10), (15, 5), (100, 1)], gap=5) == [(0, 20), (100, 101)]
    assert merge_ranges([(0, 10), (16, 5)], gap=5) == [(0, 10), (16, 21)]
    assert merge_ranges([(50, 10), (0, 100)], gap=0) == [(0, 100)]  # overlap always merges
    assert merge_ranges([(0, 10), (12, 10)], gap=5, max_span=15) == [(0, 10), (12, 22)]
    assert merge_ranges([(0, 0), (5, 0)], gap=100) == []


def test_fetch_returns_the_blob_bytes_and_merges_near_ranges(client: RegistryClient, layer: PushedLayer,
                                                              registry: Registry) -> None:
    with range_proxy(registry.url) as proxy:
        f = fetcher(client, proxy.host, layer)
        got = run(lambda: f.fetch(RANGES))
        assert got == [layer.blob[o:o + n] for o, n in RANGES]
        # 100..310 merge (gap < 64 KiB), and so do the rest: one span, one request
        assert len(proxy.blob_gets) == 1 and "," not in proxy.blob_gets[0][0]
        g = fetcher(client, proxy.host, layer, merge_gap=0)
        assert run(lambda: g.fetch(RANGES)) == got
        assert len(proxy.blob_gets) == 2 and proxy.blob_gets[1][0].count(",") == 4  # one multi-range request
        with pytest.raises(InvalidInputError):
            run(lambda: f.fetch([(layer.size - 1, 2)]))


def test_identical_concurrent_fetches_are_collapsed(client: RegistryClient, layer: PushedLayer,
                                                   registry: Registry) -> None:
    with range_proxy(registry.url) as proxy:
        f = fetcher(client, proxy.host, layer)
        results: list[list[bytes]] = []

        async def main() -> None:
            async def one(r: list[tuple[int, int]]) -> None:
                results.append(await f.fetch(r))
            async with trio.open_nursery() as n:
                for _ in range(6):
                    n.start_soon(one, [(1000, 20_000)])
                await trio.sleep(0)  # (trio runs new tasks in any order) one of them has started its fetch
                n.start_soon(one, [(2000, 100)])  # inside the same span: waits for it too

        run(main)
        assert len(proxy.blob_gets) == 1, proxy.blob_gets
        assert f.requests == 1
        assert sorted(map(len, (r[0] for r in results))) == [100] + [20_000] * 6
        assert all(r[0] in (layer.blob[1000:21_000], layer.blob[2000:2100]) for r in results)


def test_registry_ignoring_range_downloads_the_blob_once_to_a_spool_file(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    with range_proxy(registry.url, Behaviour(ignore_range=True)) as proxy:
        f = fetcher(client, proxy.host, layer, spool_dir=tmp_path)

        async def main() -> list[list[bytes]]:
            return [await f.fetch(RANGES), await f.fetch([(5, 5)]), await f.fetch([(layer.size - 10, 10)])]

        got = run(main)
        assert got[0] == [layer.blob[o:o + n] for o, n in RANGES]
        assert got[1] == [layer.blob[5:10]] and got[2] == [layer.blob[-10:]]
        whole = [g for g in proxy.blob_gets if g[1] == 200]
        # the probe that found Range ignored was closed unread; then exactly one download, spooled (not in memory)
        assert len(whole) == 2 and f.requests == 1
        assert f.bytes_fetched == layer.size
        spool = tmp_path / (layer.digest.split(":")[1] + ".blob")
        no_spool = fetcher(client, proxy.host, layer)
        with pytest.raises(UnavailableError, match="ignores HTTP Range requests and no spool directory"):
            run(lambda: no_spool.fetch([(0, 10)]))
        assert spool.read_bytes() == layer.blob
        f.close()
        assert not spool.exists()


def test_registry_refusing_multi_range_gets_single_ranges(client: RegistryClient, layer: PushedLayer,
                                                          registry: Registry) -> None:
    with range_proxy(registry.url, Behaviour(multi="400")) as proxy:
        f = fetcher(client, proxy.host, layer, merge_gap=0)
        assert run(lambda: f.fetch(RANGES)) == [layer.blob[o:o + n] for o, n in RANGES]
        statuses = [s for _, s, _ in proxy.blob_gets]
        assert statuses[0] == 400 and statuses[1:] == [206] * 5


def test_force_single_range_for_registries_answering_multi_range_with_the_whole_blob(
        client: RegistryClient, layer: PushedLayer, registry: Registry) -> None:
    with range_proxy(registry.url, Behaviour(multi="whole")) as proxy:
        f = fetcher(client, proxy.host, layer, merge_gap=0, force_single_range=True)
        assert run(lambda: f.fetch(RANGES)) == [layer.blob[o:o + n] for o, n in RANGES]
        assert all("," not in rng and status == 206 for rng, status, _ in proxy.blob_gets)
        assert len(proxy.blob_gets) == 5
        assert proxy.bytes_sent == sum(e - s for s, e in merge_ranges(RANGES))


def test_connection_dropped_mid_body_is_retried(client: RegistryClient, layer: PushedLayer,
                                               registry: Registry) -> None:
    with range_proxy(registry.url, Behaviour(drop=1)) as proxy:
        f = fetcher(client, proxy.host, layer)
        assert run(lambda: f.fetch([(0, 30_000)])) == [layer.blob[:30_000]]
        assert len(proxy.blob_gets) >= 2 and proxy.blob_gets[0][2] == 15_000


def test_a_registry_that_keeps_failing_gives_unavailable(client: RegistryClient, layer: PushedLayer,
                                                       registry: Registry) -> None:
    with range_proxy(registry.url, Behaviour(drop=-1)) as proxy:
        f = fetcher(client, proxy.host, layer, retries=2)
        with pytest.raises(UnavailableError, match="after 3 attempts"):
            run(lambda: f.fetch([(0, 30_000)]))
        assert f.bytes_fetched == 0


def test_fetched_bytes_metric_counts_per_layer(client: RegistryClient, layer: PushedLayer,
                                               registry: Registry) -> None:
    m = LazyMetrics()
    f = fetcher(client, registry.host, layer, metrics=m)
    run(lambda: f.fetch([(0, 1000)]))
    assert m.registry.get_sample_value("cvmfs_snap_lazy_fetched_bytes_total", {"layer": layer.digest}) == 1000
    assert m.registry.get_sample_value("cvmfs_snap_lazy_fetch_seconds_count") == 1




def test_redirected_blob_url_is_reused_and_refreshed_when_it_expires(
        client: RegistryClient, layer: PushedLayer, registry: Registry) -> None:
    with range_proxy(registry.url, Behaviour(redirect=True, storage_uses=3)) as proxy:
        f = fetcher(client, proxy.host, layer)

        async def main() -> list[bytes]:
            return [(await f.fetch([(i * 10_000, 100)]))[0] for i in range(5)]

        got = run(main)
        assert got == [layer.blob[i * 10_000:i * 10_000 + 100] for i in range(5)]
        # 5 chunks: the registry was asked twice (first use, then after the signed URL expired), storage 6 times
        # (3 uses, one 403, then 2 with the new URL): one round trip per chunk, not two
        assert proxy.registry_gets == 2, proxy.blob_gets
        assert proxy.storage_gets == 6


def test_fetch_from_a_token_auth_registry_and_no_secret_in_logs_or_errors(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "Lazy-pa55-Secret"
    root = tmp_path / "reg"
    with start_registry(root) as anon:
        layer = push_estargz(anon.host, "private/lazy", {"f": os.urandom(50_000)}, chunk_size=16 * 1024)
    caplog.set_level(logging.DEBUG)
    with start_token_issuer(root / "issuer", users={"alice": secret}) as issuer, \
            start_registry(root, issuer.registry_auth_config()) as reg:
        cfg = tmp_path / "config.json"
        auth = base64.b64encode(f"alice:{secret}".encode()).decode()
        cfg.write_text(json.dumps({"auths": {f"http://{reg.host}": {"auth": auth}}}))
        with RegistryClient(credentials=CredentialStore.from_docker_config(cfg), timeout=10, retries=1,
                            backoff_base=0.01) as c:
            f = fetcher(c, reg.host, layer)
            assert run(lambda: f.fetch([(0, 100), (30_000, 100)])) == [layer.blob[:100], layer.blob[30_000:30_100]]
            assert run(lambda: f.fetch([(5000, 10)])) == [layer.blob[5000:5010]]
            assert issuer.hits == 1
        with RegistryClient(timeout=10, retries=1, backoff_base=0.01) as anonymous:
            g = fetcher(anonymous, reg.host, layer)
            with pytest.raises(UnavailableError, match="credentials") as ei:
                run(lambda: g.fetch([(0, 100)]))
            assert g.requests == 0
    for text in (caplog.text, str(ei.value)):
        assert secret not in text and auth not in text


def test_spool_file_counts_in_the_cache_bound(client: RegistryClient, layer: PushedLayer, registry: Registry,
                                              tmp_path: Path) -> None:
    """A whole blob spooled from a registry that ignores Range is reserved in the chunk cache's bound (chunks
    evicted for it) and freed with the file; one that cannot fit is refused at once, with a clear message."""
    from cvmfs_snap.lazyfs.cache import ChunkCache
    from cvmfs_snap.lazyfs.remote import SpoolTooLargeError

    with range_proxy(registry.url, Behaviour(ignore_range=True)) as proxy:
        cache = ChunkCache(tmp_path / "cache", layer.size + 10_000, metrics=LazyMetrics())
        for i in range(5):
            data = bytes([i]) * 4000
            cache.put(hashlib.sha256(data).hexdigest(), data, "c" * 64)
        f = fetcher(client, proxy.host, layer, spool_dir=tmp_path / "spool", space=cache)
        assert run(lambda: f.fetch([(5, 5)])) == [layer.blob[5:10]]
        spool = tmp_path / "spool" / (layer.digest.split(":")[1] + ".blob")
        assert spool.stat().st_size == layer.size
        st = cache.stats
        assert st.reserved == layer.size and st.bytes + st.reserved <= cache.max_bytes and st.evictions >= 3
        f.close()
        assert not spool.exists() and cache.stats.reserved == 0

        small = ChunkCache(tmp_path / "small", layer.size - 1, metrics=LazyMetrics())
        g = fetcher(client, proxy.host, layer, spool_dir=tmp_path / "spool2", space=small)
        gets = len(proxy.blob_gets)
        with pytest.raises(SpoolTooLargeError, match="does not fit whole in the lazy cache bound") as e:
            run(lambda: g.fetch([(5, 5)]))
        assert "cache-size" in str(e.value)
        assert len(proxy.blob_gets) <= gets + 1  # at most the one probe: no retries, no download
        assert small.stats.reserved == 0 and not any((tmp_path / "spool2").glob("*"))


PIECES = [(0, 10_000), (10_000, 10_000), (20_000, 10_000), (30_000, 10_000)]


def stream(f: BlobFetcher, ranges: list[tuple[int, int]], got: list[tuple[int, bytes]] | None = None
           ) -> list[tuple[int, bytes]]:
    """``f.stream(ranges)``: (index, bytes) in the order delivered (into ``got``, kept when it raises)."""
    out: list[tuple[int, bytes]] = [] if got is None else got

    async def main() -> None:
        await f.stream(ranges, lambda i, data: out.append((i, data)))

    run(main)
    return out


def test_stream_hands_on_each_range_as_it_arrives_and_asks_again_only_for_the_rest(
        client: RegistryClient, layer: PushedLayer, registry: Registry) -> None:
    with range_proxy(registry.url, Behaviour(drop=1)) as proxy:  # the first answer is cut after 20,000 bytes
        f = fetcher(client, proxy.host, layer)
        got = stream(f, PIECES)
        assert got == [(i, layer.blob[o:o + n]) for i, (o, n) in enumerate(PIECES)]
        assert proxy.blob_gets == [("bytes=0-39999", 206, 20_000), ("bytes=20000-39999", 206, 20_000)]
        assert f.bytes_fetched == 40_000 and f.requests == 2


def test_stream_delivers_the_ranges_that_arrived_before_a_transfer_failed(
        client: RegistryClient, layer: PushedLayer, registry: Registry) -> None:
    with range_proxy(registry.url, Behaviour(drop=-1)) as proxy:
        f = fetcher(client, proxy.host, layer, retries=0)
        got: list[tuple[int, bytes]] = []
        with pytest.raises(UnavailableError, match="after 1 attempts"):
            stream(f, PIECES, got)
        assert got == [(0, layer.blob[:10_000]), (1, layer.blob[10_000:20_000])]  # before the body's end
        assert len(proxy.blob_gets) == 1


def test_stream_merges_near_ranges_into_spans_and_serves_a_registry_ignoring_range_from_the_spool(
        client: RegistryClient, layer: PushedLayer, registry: Registry, tmp_path: Path) -> None:
    ranges = [(60_000, 100), (100, 50), (300, 10), (0, 0)]
    with range_proxy(registry.url) as proxy:
        f = fetcher(client, proxy.host, layer, merge_gap=1000)
        assert sorted(stream(f, ranges)) == [(i, layer.blob[o:o + n]) for i, (o, n) in enumerate(ranges)]
        assert sorted(g[0] for g in proxy.blob_gets) == ["bytes=100-309", "bytes=60000-60099"]  # at once
    with range_proxy(registry.url, Behaviour(ignore_range=True)) as proxy:
        f = fetcher(client, proxy.host, layer, spool_dir=tmp_path)
        assert sorted(stream(f, ranges)) == [(i, layer.blob[o:o + n]) for i, (o, n) in enumerate(ranges)]
        assert f.bytes_fetched == layer.size and (tmp_path / (layer.digest[7:] + ".blob")).exists()


def test_streamed_ranges_reuse_the_redirected_blob_url_and_refresh_it(
        client: RegistryClient, layer: PushedLayer, registry: Registry) -> None:
    with range_proxy(registry.url, Behaviour(redirect=True, storage_uses=3)) as proxy:
        f = fetcher(client, proxy.host, layer)
        got = [stream(f, [(i * 10_000, 100), (i * 10_000 + 200, 50)]) for i in range(5)]
        assert got == [[(0, layer.blob[i * 10_000:i * 10_000 + 100]),
                        (1, layer.blob[i * 10_000 + 200:i * 10_000 + 250])] for i in range(5)]
        assert proxy.registry_gets == 2 and proxy.storage_gets == 6  # as for fetch: one round trip per span


def test_streamed_pieces_are_cut_from_the_received_blocks_exactly() -> None:
    """``ranges._take``: each piece's bytes from blocks as the socket hands them over (pieces straddling blocks,
    gaps between pieces, pieces within one block), copied once; a piece that is exactly one block is that block."""
    rnd = random.Random(5)
    body = rnd.randbytes(300_000)
    for _ in range(50):
        pieces, pos = [], 0
        while pos < len(body) - 10:
            pos += rnd.choice((0, 0, rnd.randint(1, 3000)))  # gaps between merged pieces
            if pos >= len(body):
                break
            n = min(rnd.choice((1, 100, 5000, 70_000)), len(body) - pos)
            pieces.append((pos, n))
            pos += n
        start = pieces[0][0]  # the body of one request from the first piece's start to the last one's end
        wire = body[start:pieces[-1][0] + pieces[-1][1]]
        cuts = sorted(rnd.sample(range(1, len(wire)), min(40, len(wire) - 1)))
        blocks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
        held: list[bytes | memoryview] = []
        pos, got, i, out = start, 0, 0, []
        for b in blocks:
            held.append(b)
            got += len(b)
            while i < len(pieces) and pieces[i][0] + pieces[i][1] <= start + got:
                data, held, pos = _take(held, pos, pieces[i])
                out.append(bytes(data))
                i += 1
        assert out == [body[o:o + n] for o, n in pieces]
    block = b"x" * 1000
    data, rest, pos = _take([block], 0, (0, 1000))
    assert data is block and rest == [] and pos == 1000
