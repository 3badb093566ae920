#!/usr/bin/env python3
"""Benchmark: lazy eStargz reads (``cvmfs_snap.lazyfs`` LayerReader + ChunkCache + BlobFetcher) from a loopback
docker-registry, against a plain HTTP download of the same blob.

The layer is generated here (nothing is downloaded): files of word-like text and random bytes (about 2:1
compressible overall), converted with our eStargz writer (default 4 MiB chunks) and pushed. Measured, each from a
cold chunk cache:

- plain HTTP download of the blob (httpx, streamed, bytes discarded), and download + gunzip of the whole stream;
- cold sequential read of every file in 128 KiB reads (what FUSE sends), with and without fdatasync of cache files,
  with two ratios to the plain download: time (download seconds / read seconds, the same blob's bytes both ways)
  and throughput (file bytes per second read / blob bytes per second downloaded: what the goal names);
- warm read of the same from the disk cache by a new reader (a restarted lazyfs process; memory tier cold);
- bytes fetched per byte read: one small file, 10 % of the files, all of them.

    python bench/lazy_read.py                 # 64 MiB of file data
    python bench/lazy_read.py --size-mib 256
    python bench/lazy_read.py --inflater zlib --tmp /dev/shm   # another inflater, caches in memory
    python bench/lazy_read.py --big-file --read-kib 1024   # lazy_fs.py's one 64 MiB file, read as FUSE sends it
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import trio  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lazy_fs import big_file  # noqa: E402
from cvmfs_snap.estargz import BuildOptions, build  # noqa: E402
from cvmfs_snap.fsutil import remove_tree_quietly  # noqa: E402
from cvmfs_snap.layer import gzipmember  # noqa: E402
from cvmfs_snap.lazyfs.cache import ChunkCache  # noqa: E402
from cvmfs_snap.lazyfs.metrics import LazyMetrics  # noqa: E402
from cvmfs_snap.lazyfs.reader import DEFAULT_READAHEAD, LayerReader, open_layer_reader  # noqa: E402
from cvmfs_snap.lazyfs.remote import BlobFetcher  # noqa: E402
from cvmfs_snap.oci.client import RegistryClient  # noqa: E402
from cvmfs_snap.oci.reference import ImageReference  # noqa: E402
from cvmfs_snap_devenv.images import Pusher, make_tar  # noqa: E402
from cvmfs_snap_devenv.registry import start_registry  # noqa: E402

READ = 128 * 1024  # --read-kib


def gen_files(total: int, seed: int = 7) -> dict[str, bytes]:
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 10))) for _ in range(5000)]
    files: dict[str, bytes] = {"etc/small.conf": b"small = true\n"}
    size = 0
    i = 0
    while size < total:
        n = min(rnd.choice((4_000, 60_000, 700_000, 3_000_000, 9_000_000)), total - size)
        data = rnd.randbytes(n) if i % 3 == 0 else b" ".join(rnd.choice(words) for _ in range(n // 6 + 1))[:n]
        files[f"data/d{i % 17}/f{i}"] = data
        size += n
        i += 1
    return files


def build_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    dirs = sorted({"/".join(p.split("/")[:k]) + "/" for p in files for k in range(1, p.count("/") + 1)})
    out = io.BytesIO()
    res = build(io.BytesIO(make_tar([*dirs, *files.items()])), out, BuildOptions())
    return out.getvalue(), res.toc_digest


async def read_all(r: LayerReader, names: list[str], files: dict[str, bytes]) -> int:
    n = 0
    for name in names:
        size = len(files[name])
        for off in range(0, size, READ):
            n += len(await r.read(name, off, READ))
    return n


def big_layer() -> dict[str, bytes]:
    """``lazy_fs.py``'s layer for the cold sequential read: one 64 MiB file (a third random bytes)."""
    return {"data/big.bin": big_file(random.Random(3))}


def main() -> int:
    global READ
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="cold and warm reads: best of this many")
    ap.add_argument("--inflater", choices=list(gzipmember.BACKENDS), default=gzipmember.INFLATER)
    ap.add_argument("--readahead-mib", type=float, default=DEFAULT_READAHEAD / 2**20)
    ap.add_argument("--tmp", type=Path, default=None, help="work directory (chunk caches; default: $TMPDIR)")
    ap.add_argument("--big-file", action="store_true", help="the one 64 MiB file of lazy_fs.py's cold read")
    ap.add_argument("--read-kib", type=int, default=128, help="bytes per read (FUSE: 128, or 1024 with "
                    "the mount's 4 MiB readahead)")
    args = ap.parse_args()
    READ = args.read_kib * 1024
    gzipmember.use_inflater(args.inflater)
    readahead = int(args.readahead_mib * 2**20)
    print(f"inflater {gzipmember.INFLATER}, readahead {readahead / 2**20:g} MiB")
    tmp = Path(tempfile.mkdtemp(prefix="bench-lazy-", dir=args.tmp))
    try:
        files = big_layer() if args.big_file else gen_files(args.size_mib * 1024 * 1024)
        blob, toc_digest = build_layer(files)
        data_bytes = sum(map(len, files.values()))
        print(f"layer: {len(files)} files, {data_bytes / 2**20:.1f} MiB of file data, blob {len(blob) / 2**20:.1f} MiB")
        with start_registry(tmp / "registry") as reg:
            p = Pusher(reg.url)
            digest = p.blob("bench/lazy", blob)
            p.close()
            url = f"{reg.url}/v2/bench/lazy/blobs/{digest}"
            # plain download (best of 3), and download + gunzip
            best = best_gz = 1e9
            plain = httpx.Client()  # one connection, kept: the download is as fast as httpx gets
            for _ in range(max(3, args.runs)):
                t0 = time.perf_counter()
                with plain.stream("GET", url) as resp:
                    for _chunk in resp.iter_raw():
                        pass
                best = min(best, time.perf_counter() - t0)
                t0 = time.perf_counter()
                d = zlib.decompressobj(31)
                with plain.stream("GET", url) as resp:
                    for c in resp.iter_raw():
                        d.decompress(c)
                        while d.unused_data:  # next gzip member
                            rest = d.unused_data
                            d = zlib.decompressobj(31)
                            d.decompress(rest)
                best_gz = min(best_gz, time.perf_counter() - t0)
            print(f"plain HTTP download:          {best:6.2f} s  {len(blob) / best / 2**20:7.1f} MiB/s of blob")
            print(f"plain download + gunzip:      {best_gz:6.2f} s  {data_bytes / best_gz / 2**20:7.1f} MiB/s of data")

            ref = ImageReference.parse(f"{reg.host}/bench/lazy:x")
            # sequential = in the order the layer stores the files (as the tar lists them)
            names = [n for n in files if files[n]]
            with RegistryClient() as client:
                async def cold(cache_dir: Path, sync: bool) -> tuple[float, float, int, int]:
                    cache = ChunkCache(cache_dir, 4 << 30, metrics=LazyMetrics(), sync=sync)
                    f = BlobFetcher(client, ref, digest, len(blob), metrics=LazyMetrics(), spool_dir=cache_dir)
                    t0, c0 = time.perf_counter(), time.process_time()
                    r = await open_layer_reader(f, cache, digest=digest, size=len(blob), toc_digest=toc_digest,
                                                metrics=LazyMetrics(), readahead_bytes=readahead)
                    n = await read_all(r, names, files)
                    t, c = time.perf_counter() - t0, time.process_time() - c0
                    await r.settle()
                    return t, c, n, f.bytes_fetched

                for sync in (True, False):
                    runs = []
                    for i in range(args.runs):
                        d = tmp / f"cache-{sync}-{i}"
                        runs.append(trio.run(cold, d, sync))
                        if i:
                            remove_tree_quietly(d)
                    t, cpu, n, fetched = min(runs)
                    assert n == data_bytes
                    print(f"cold lazy read ({'fdatasync' if sync else 'default  '}): {t:6.2f} s (CPU {cpu:.2f} s) "
                          f"{n / t / 2**20:7.1f} MiB/s of data; time ratio {best / t:.2f}x, throughput ratio "
                          f"{(n / t) / (len(blob) / best):.2f}x of the plain download, {best_gz / t:.2f}x "
                          f"download+gunzip; fetched {fetched / len(blob):.3f} of the blob")

                async def warm() -> tuple[float, float]:
                    cache = ChunkCache(tmp / "cache-True-0", 4 << 30, metrics=LazyMetrics())
                    f = BlobFetcher(client, ref, digest, len(blob), metrics=LazyMetrics())
                    t0, c0 = time.perf_counter(), time.process_time()
                    r = await open_layer_reader(f, cache, digest=digest, size=len(blob), toc_digest=toc_digest,
                                                metrics=LazyMetrics(), readahead_bytes=readahead)
                    await read_all(r, names, files)
                    assert f.bytes_fetched == 0
                    return time.perf_counter() - t0, time.process_time() - c0

                t, cpu = min(trio.run(warm) for _ in range(args.runs))
                print(f"warm read from the disk cache: {t:6.2f} s (CPU {cpu:.2f} s) {data_bytes / t / 2**20:7.1f} "
                      "MiB/s of data")

                async def partial(which: list[str]) -> tuple[int, int]:
                    d = tmp / f"cache-p{len(which)}"
                    cache = ChunkCache(d, 4 << 30, metrics=LazyMetrics())
                    f = BlobFetcher(client, ref, digest, len(blob), metrics=LazyMetrics())
                    r = await open_layer_reader(f, cache, digest=digest, size=len(blob), toc_digest=toc_digest,
                                                metrics=LazyMetrics())
                    toc = f.bytes_fetched
                    n = await read_all(r, which, files)
                    r.close()
                    await r.settle()  # the last chunks' cache writes run after the reads
                    remove_tree_quietly(d)
                    toc_bytes.append(toc)
                    return n, f.bytes_fetched - toc

                if args.big_file:
                    plain.close()
                    return 0
                toc_bytes: list[int] = []
                print("bytes fetched per byte read (chunk data; the footer + TOC come on top, once):")
                rnd = random.Random(1)
                for label, which in (("one small file", ["etc/small.conf"]),
                                     ("10% of the files", rnd.sample(names, max(1, len(names) // 10))),
                                     ("all files", names)):
                    n, fetched = trio.run(partial, which)
                    print(f"  {label:18s}: read {n:>10d} B, fetched {fetched:>10d} B = {fetched / max(n, 1):7.2f} "
                          f"per byte read, {100 * fetched / len(blob):6.2f} % of the blob")
                print(f"  footer + TOC: {toc_bytes[0]} B ({100 * toc_bytes[0] / len(blob):.3f} % of the blob)")
        plain.close()
        return 0
    finally:
        remove_tree_quietly(tmp)


if __name__ == "__main__":
    sys.exit(main())
