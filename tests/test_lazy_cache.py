"""ChunkCache: bound and LRU, restart and crash recovery, per-layer release, page-cache hygiene."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.lazyfs import cachefiles
from cvmfs_snap.lazyfs.cache import SETTLE_SECONDS, ChunkCache
from cvmfs_snap.lazyfs.metrics import LazyMetrics

A = "a" * 64
B = "b" * 64


def chunk(i: int, n: int = 1000) -> tuple[str, bytes]:
    data = i.to_bytes(4, "big") * (n // 4)
    return hashlib.sha256(data).hexdigest(), data


def files(cache_dir: Path) -> list[Path]:
    return sorted(p for d in (cache_dir / "chunks").iterdir() for p in d.iterdir())


def new(tmp: Path, max_bytes: int = 10_000, **kw: object) -> ChunkCache:
    return ChunkCache(tmp / "cache", max_bytes, metrics=LazyMetrics(), **kw)  # type: ignore[arg-type]


def test_put_get_and_stats(tmp_path: Path) -> None:
    c = new(tmp_path)
    k, d = chunk(1)
    assert c.get(k) is None
    c.put(k, d, A)
    assert c.get("sha256:" + k) == d and c.contains(k)
    s = c.stats
    assert (s.hits, s.misses, s.evictions, s.bytes, s.entries) == (1, 1, 0, len(d), 1)
    assert c.metrics.registry.get_sample_value("cvmfs_snap_lazy_cache_hits_total") == 1
    assert c.metrics.registry.get_sample_value("cvmfs_snap_lazy_cache_bytes") == len(d)
    c.put(k, d, B)  # stored once, referenced by both layers
    assert len(files(c.directory)) == 1 and c.stats.bytes == len(d)


def test_bad_keys_are_refused_before_touching_the_disk(tmp_path: Path) -> None:
    c = new(tmp_path)
    for bad in ("../../etc/passwd", "sha256:" + "A" * 64, "sha512:" + "a" * 64, "a" * 63, ""):
        with pytest.raises(InvalidInputError):
            c.put(bad, b"x", A)
        with pytest.raises(InvalidInputError):
            c.get(bad)
    with pytest.raises(InvalidInputError):
        c.put(chunk(1)[0], b"x", "../layer")
    with pytest.raises(InvalidInputError):
        ChunkCache(tmp_path / "c2", 0)


def test_bound_holds_with_lru_eviction(tmp_path: Path) -> None:
    c = new(tmp_path, max_bytes=5000)
    keys = []
    for i in range(5):
        k, d = chunk(i)
        c.put(k, d, A)
        keys.append(k)
    assert c.get(keys[0]) is not None  # now the most recently used
    k5, d5 = chunk(5)
    c.put(k5, d5, A)
    assert c.stats.bytes <= 5000 and c.stats.evictions == 1
    assert c.metrics.registry.get_sample_value("cvmfs_snap_lazy_cache_evictions_total") == 1
    assert c.contains(keys[0]) and not c.contains(keys[1]) and c.contains(k5)
    for i in range(6, 40):  # much more than the bound
        c.put(*chunk(i), A)
        assert c.stats.bytes <= 5000
        assert sum(p.stat().st_size for p in files(c.directory)) == c.stats.bytes
    big_k, big = chunk(99, 6000)
    c.put(big_k, big, A)  # larger than the whole cache: not stored, nothing evicted for it
    assert not c.contains(big_k) and c.stats.entries == 5


def test_index_survives_a_restart(tmp_path: Path) -> None:
    c = new(tmp_path)
    stored = dict(chunk(i) for i in range(5))
    for k, d in stored.items():
        c.put(k, d, A)
    c.put(next(iter(stored)), stored[next(iter(stored))], B)
    c2 = new(tmp_path)
    assert c2.stats.bytes == c.stats.bytes and c2.stats.entries == 5
    assert all(c2.get(k) == d for k, d in stored.items())
    assert c2.layer_keys(A) == set(stored) and c2.layer_keys(B) == {next(iter(stored))}
    # a smaller bound at restart evicts the oldest first
    c3 = new(tmp_path, max_bytes=2000)
    assert c3.stats.bytes <= 2000 and c3.stats.evictions == 3


def test_leftovers_of_a_crash_are_cleaned_at_start(tmp_path: Path) -> None:
    c = new(tmp_path)
    k, d = chunk(1)
    c.put(k, d, A)
    (c.directory / "tmp" / f"{chunk(2)[0]}.123.1").write_bytes(b"half a chunk")
    orphan = chunk(3)[0]  # a chunk no layer references (e.g. a crash in the middle of a release)
    (c.directory / "chunks" / orphan[:2]).mkdir(exist_ok=True)
    (c.directory / "chunks" / orphan[:2] / orphan).write_bytes(b"orphan")
    with open(c.directory / "layers" / f"{A}.refs", "ab") as f:
        f.write(b"cut-off-li")  # the last line a crash cut short
    c2 = new(tmp_path)
    assert list((c2.directory / "tmp").iterdir()) == []
    assert [p.name for p in files(c2.directory)] == [k]
    assert c2.stats.entries == 1 and c2.get(k) == d


CRASHER = """
import hashlib, os, sys
from pathlib import Path
from cvmfs_snap.lazyfs import cachefiles
from cvmfs_snap.lazyfs.cache import SETTLE_SECONDS, ChunkCache
c = ChunkCache(Path(sys.argv[1]), 50_000_000)
i = 0
while True:
    data = os.urandom(100_000) + i.to_bytes(8, "big")
    c.put(hashlib.sha256(data).hexdigest(), data, sys.argv[2])
    c.put(hashlib.sha256(data).hexdigest(), data, sys.argv[3])
    i += 1
    if i == 20:
        print("ready", flush=True)
"""


def kill_while_writing(script: str, cache_dir: Path, *layers: str) -> None:
    """Run ``script`` on ``cache_dir`` in a process of its own and SIGKILL it 0.3 s after it says ``ready``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-c", script, str(cache_dir), *layers], stdout=subprocess.PIPE, env=env)
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_killed_writer_leaves_no_damaged_or_duplicated_chunk(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    kill_while_writing(CRASHER, cache_dir, A, B)
    c = ChunkCache(cache_dir, 50_000_000, metrics=LazyMetrics())
    on_disk = files(cache_dir)
    assert len(on_disk) == c.stats.entries >= 20
    for f in on_disk:  # every chunk file is whole: its name is its content's digest
        assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name
    assert list((cache_dir / "tmp").iterdir()) == []
    assert c.layer_keys(A) == {f.name for f in on_disk}
    c.release_layer(A)
    c.release_layer(B)
    assert files(cache_dir) == [] and c.stats.bytes == 0


def test_release_frees_only_what_no_other_layer_uses(tmp_path: Path) -> None:
    c = new(tmp_path)
    shared, only_a, only_b = chunk(1), chunk(2), chunk(3)
    c.put(*shared, A)
    c.put(*only_a, A)
    c.put(*only_b, B)
    assert c.get(shared[0], B) == shared[1]  # B reads the chunk A fetched: B references it now
    c.release_layer(A)
    assert not c.contains(only_a[0]) and c.contains(shared[0]) and c.contains(only_b[0])
    assert not (c.directory / "layers" / f"{A}.refs").exists()
    assert sorted(p.name for p in files(c.directory)) == sorted([shared[0], only_b[0]])
    c2 = new(tmp_path)  # and it stays released after a restart
    assert c2.stats.entries == 2 and c2.layer_keys(A) == set()
    c2.release_layer(B)
    assert files(c2.directory) == [] and c2.stats.bytes == 0


def _resident(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def test_cache_files_do_not_stay_in_the_page_cache(tmp_path: Path) -> None:
    c = new(tmp_path, max_bytes=100_000_000)
    k, d = chunk(7, 4 * 1024 * 1024)
    c.put(k, d, A)
    path = files(c.directory)[0]
    time.sleep(SETTLE_SECONDS + 0.2)
    c.put(*chunk(8), A)  # later writes drop the pages of earlier ones, once written back
    assert _resident(path) == 0
    with open(path, "rb") as f:  # a plain read brings the pages in ...
        f.read()
    assert _resident(path) > 0
    assert c.get(k) == d  # ... the cache's own read drops them again
    assert _resident(path) == 0
    k9, d9 = chunk(9, 1024 * 1024)
    c.put(k9, d9, A)
    c.settle()  # at shutdown: everything written is dropped
    assert all(_resident(p) == 0 for p in files(c.directory))


def test_synchronous_writes_drop_pages_at_once(tmp_path: Path) -> None:
    c = new(tmp_path, max_bytes=100_000_000, sync=True)
    c.put(*chunk(7, 4 * 1024 * 1024), A)
    assert _resident(files(c.directory)[0]) == 0


def test_memory_tier_is_bounded_and_forgets_dropped_chunks(tmp_path: Path) -> None:
    c = new(tmp_path, memory_bytes=2500)
    k1, d1 = chunk(1)
    k2, d2 = chunk(2)
    k3, d3 = chunk(3)
    c.put(k1, d1, A)
    for k, d in ((k1, d1), (k2, d2), (k3, d3)):
        c.put_hot(k, d)
    assert c.get_hot(k1) is None and c.get_hot(k3) == d3  # 3000 bytes > 2500: the oldest went
    assert c.get_hot(k1, B) is None
    c.put_hot(k1, d1)
    assert c.get_hot(k1, B) == d1 and k1 in c.layer_keys(B)  # B references it now
    c.release_layer(A)
    c.release_layer(B)
    assert c.get_hot(k1) is None  # released chunks leave memory too


def test_reservations_for_spool_files_and_unpacked_copies_count_in_the_bound(tmp_path: Path) -> None:
    """The bound covers chunks + the other files of the lazy path (spool, unpacked copies): reserving evicts LRU
    chunks, a reservation that cannot fit is refused, and chunks never push the total past the bound."""
    c = new(tmp_path, max_bytes=10_000)
    for i in range(8):
        c.put(*chunk(i), A)
    for i in range(8, 10):
        c.put(*chunk(i), B)
    assert c.stats.bytes == 10_000
    assert c.reserve("spool:x", 3500)  # evicts the 4 least recently used chunks
    assert c.stats.reserved == 3500 and c.stats.bytes == 6000 and c.stats.evictions == 4
    assert sum(p.stat().st_size for p in files(c.directory)) + 3500 <= 10_000
    for i in range(20, 30):  # more chunks: evicted among themselves, the reservation stays
        c.put(*chunk(i), A)
        assert c.stats.bytes + c.stats.reserved <= 10_000
    big_k, big = chunk(98, 7000)
    c.put(big_k, big, A)  # fits the bound alone, not next to the reservation: not stored
    assert not c.contains(big_k)
    assert not c.reserve("spool:y", 6600)  # 3500 + 6600 > 10000: refused, nothing evicted for it
    assert c.reserved("spool:y") is None and c.stats.bytes == 6000
    c.unreserve("spool:x")
    assert c.stats.reserved == 0
    # an unpacked copy must fit next to its own layer's chunks: they are not evicted for it
    c2 = new(tmp_path / "two", max_bytes=10_000)
    for i in range(4):
        c2.put(*chunk(i), B)  # 4000 bytes of layer B
    for i in range(4, 8):
        c2.put(*chunk(i), A)  # 4000 of A
    assert not c2.reserve("unpacked:b", 6500, keep_layer=B)  # 4000 + 6500 > 10000
    assert c2.reserve("unpacked:b", 5000, keep_layer=B)  # evicts A's chunks, keeps B's
    assert len(c2.layer_keys(B)) == 4 and c2.stats.bytes + c2.stats.reserved <= 10_000
    # a copy found on disk at start counts whatever it costs
    assert c2.reserve("unpacked:old", 9000, force=True) and c2.stats.bytes == 0
    assert c2.stats.reserved == 14_000


# ---------------------------------------------------------------------- packs of small chunks
def packs_of(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "packs").iterdir())


def on_disk(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in [*files(cache_dir), *packs_of(cache_dir)])


def test_small_chunks_are_packed_read_together_and_survive_a_restart(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    c = new(tmp_path, max_bytes=10_000_000)
    small = dict(chunk(i, 2000) for i in range(50))
    big_k, big = chunk(99, cachefiles.PACK_CHUNK_MAX + 4)
    c.put_many([*small.items(), (big_k, big)], A)
    assert [p.name for p in files(c.directory)] == [big_k]  # larger than PACK_CHUNK_MAX: a chunk file
    assert len(packs_of(c.directory)) == 1  # the 50 small ones: one pack
    assert c.stats.entries == 51 and c.stats.bytes == on_disk(c.directory)
    opened: list[Path] = []
    read_pack = cachefiles.read_pack

    def counted(path: Path, slots: list[cachefiles.Slot]) -> dict[str, bytes]:
        opened.append(path)
        return read_pack(path, slots)

    monkeypatch.setattr(cachefiles, "read_pack", counted)
    got = c.get_many([*small, big_k, chunk(100)[0]], B)
    assert got == {**small, big_k: big} and len(opened) == 1  # the pack read once for all 50
    assert c.stats.misses == 1 and c.stats.hits == 51
    assert c.layer_keys(B) == {*small, big_k}
    c.put_many(list(small.items()), B)  # stored already: nothing written again
    assert len(packs_of(c.directory)) == 1
    c2 = new(tmp_path, max_bytes=10_000_000)
    assert c2.stats.entries == 51 and c2.stats.bytes == c.stats.bytes
    assert c2.get_many(list(small)) == small and c2.layer_keys(A) == {*small, big_k}


def test_packs_are_evicted_whole_and_released_with_their_last_chunk(tmp_path: Path) -> None:
    c = new(tmp_path, max_bytes=30_000)
    batches = [dict(chunk(10 * b + i, 1000) for i in range(8)) for b in range(6)]  # 8 KB + index per pack
    for batch in batches[:3]:
        c.put_many(list(batch.items()), A)
    assert len(packs_of(c.directory)) == 3 and c.stats.evictions == 0
    c.get(next(iter(batches[0])))  # the first pack is now the most recently used
    c.put_many(list(batches[3].items()), A)  # past the bound: the least recently used pack goes, whole
    assert c.stats.bytes <= 30_000 and c.stats.bytes == on_disk(c.directory)
    assert all(c.contains(k) for k in batches[0]) and not any(c.contains(k) for k in batches[1])
    assert c.stats.evictions == 8
    # release: a pack stays while another layer uses one of its chunks, and goes with that chunk's release
    shared = next(iter(batches[2]))
    assert c.get(shared, B) is not None
    c.release_layer(A)
    assert c.contains(shared) and not any(c.contains(k) for k in batches[2] if k != shared)
    assert len(packs_of(c.directory)) == 1 and c.stats.bytes == on_disk(c.directory)
    assert new(tmp_path, max_bytes=30_000).get(shared) == batches[2][shared]  # also after a restart
    c.release_layer(B)
    assert packs_of(c.directory) == [] and c.stats.bytes == 0 and c.stats.entries == 0


def test_an_unpacked_copy_keeps_the_packs_of_its_layer(tmp_path: Path) -> None:
    c = new(tmp_path, max_bytes=40_000)
    mixed = dict(chunk(i, 1000) for i in range(8))
    c.put_many(list(mixed.items()), A)
    c.get(next(iter(mixed)), B)  # one of A's packed chunks is B's too
    c.put_many([chunk(20 + i, 1000) for i in range(8)], A)
    c.put_many([chunk(40 + i, 1000) for i in range(8)], A)
    assert c.reserve("unpacked:b", 25_000, keep_layer=B)
    assert all(c.contains(k) for k in mixed)  # B's chunk keeps its whole pack
    assert c.stats.bytes + c.stats.reserved <= 40_000


def test_damaged_packs_are_removed_at_start(tmp_path: Path) -> None:
    c = new(tmp_path, max_bytes=10_000_000)
    for b in range(3):
        c.put_many([chunk(10 * b + i, 1000) for i in range(5)], A)
    cut, flipped, whole = packs_of(c.directory)
    cut.write_bytes(cut.read_bytes()[:-3])  # a trailer cut short
    data = bytearray(flipped.read_bytes())
    data[-20] ^= 1  # a byte of the index: its crc no longer matches
    flipped.write_bytes(bytes(data))
    (c.directory / "packs" / "stray.pack").write_bytes(b"not a pack at all")
    (c.directory / "packs" / "other-file").write_bytes(b"x")
    c2 = new(tmp_path, max_bytes=10_000_000)
    assert packs_of(c2.directory) == [whole]
    assert c2.stats.entries == 5 and c2.stats.bytes == whole.stat().st_size
    assert c2.get_many([chunk(20 + i, 1000)[0] for i in range(5)]) == dict(chunk(20 + i, 1000) for i in range(5))


PACK_CRASHER = """
import hashlib, os, sys
from pathlib import Path
from cvmfs_snap.lazyfs.cache import ChunkCache
c = ChunkCache(Path(sys.argv[1]), 50_000_000)
i = 0
while True:
    items = []
    for _ in range(100):
        data = os.urandom(2000) + i.to_bytes(8, "big")
        items.append((hashlib.sha256(data).hexdigest(), data))
        i += 1
    c.put_many(items, sys.argv[2])
    if i == 2000:
        print("ready", flush=True)
"""


def test_killed_pack_writer_leaves_only_whole_packs(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    kill_while_writing(PACK_CRASHER, cache_dir, A)
    c = ChunkCache(cache_dir, 50_000_000, metrics=LazyMetrics())
    keys = c.layer_keys(A)
    assert len(keys) == c.stats.entries >= 2000 and list((cache_dir / "tmp").iterdir()) == []
    got = c.get_many(sorted(keys))
    assert len(got) == len(keys) and all(hashlib.sha256(d).hexdigest() == k for k, d in got.items())
    assert c.stats.bytes == on_disk(cache_dir)
    c.release_layer(A)
    assert packs_of(cache_dir) == [] and files(cache_dir) == [] and c.stats.bytes == 0


def test_a_chunk_stored_both_packed_and_as_a_file_is_indexed_once(tmp_path: Path) -> None:
    c = new(tmp_path, max_bytes=10_000_000)
    items = [chunk(i, 1000) for i in range(4)]
    c.put_many(items, A)
    k, d = items[0]
    (c.directory / "chunks" / k[:2]).mkdir(exist_ok=True)
    (c.directory / "chunks" / k[:2] / k).write_bytes(d)  # as if also written as a chunk file before a crash
    c2 = new(tmp_path, max_bytes=10_000_000)
    assert c2.stats.entries == 4 and files(c2.directory) == [] and c2.stats.bytes == on_disk(c2.directory)
    assert c2.get(k) == d
    c2.release_layer(A)
    assert packs_of(c2.directory) == [] and c2.stats.bytes == 0
