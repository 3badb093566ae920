#!/usr/bin/env python3
"""Benchmark: the lazy read path for many small files, in process (LayerReader + ChunkCache, no FUSE).

The file-heavy layer of ``lazy_fs.py`` (``small_files``: N files of 200-4000 random bytes, 200 per directory)
is converted with our eStargz writer and pushed to a loopback docker-registry. A first reader fetches every
chunk into a chunk cache; then, for each run, kernel caches are dropped (``drop_caches``, as ``lazy_fs.py``'s
cold workload; needs root, else ``--no-drop-caches``) and a fresh ChunkCache + LayerReader (a restarted lazyfs
process) reads every file once in the order ``find`` sees them through the mount (sorted names, which is the
blob order), each in one read of its size as FUSE sends it. Reported: wall and CPU seconds, per file.

    python bench/lazy_files.py                     # 5,000 files
    python bench/lazy_files.py --files 20000
    python bench/lazy_files.py --profile out.prof  # cProfile of one cold pass
"""

from __future__ import annotations

import argparse
import cProfile
import os
import sys
import tempfile
import time
from pathlib import Path

import trio  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lazy_fs import drop_caches, layer_blob, small_files  # noqa: E402
from cvmfs_snap.fsutil import remove_tree_quietly  # noqa: E402
from cvmfs_snap.lazyfs.cache import ChunkCache  # noqa: E402
from cvmfs_snap.lazyfs.metrics import LazyMetrics  # noqa: E402
from cvmfs_snap.lazyfs.reader import LayerReader, open_layer_reader  # noqa: E402
from cvmfs_snap.lazyfs.remote import BlobFetcher  # noqa: E402
from cvmfs_snap.oci.client import RegistryClient  # noqa: E402
from cvmfs_snap.oci.reference import ImageReference  # noqa: E402
from cvmfs_snap_devenv.images import Pusher  # noqa: E402
from cvmfs_snap_devenv.registry import start_registry  # noqa: E402


async def read_every(r: LayerReader, files: dict[str, bytes], names: list[str]) -> None:
    for name in names:
        data = await r.read(name, 0, len(files[name]))
        if len(data) != len(files[name]):
            raise SystemExit(f"{name}: {len(data)} bytes read, {len(files[name])} expected")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3, help="cold passes (best of)")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--tmp", type=Path, default=None, help="work directory (the chunk cache; default $TMPDIR)")
    ap.add_argument("--profile", type=Path, default=None, help="write a cProfile of one more cold pass here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lazyfiles-", dir=args.tmp))
    try:
        files = small_files(args.files, 1)
        names = sorted(files)
        blob, toc_digest = layer_blob(files)
        print(f"layer: {len(files)} files, {sum(map(len, files.values())) / 2**20:.1f} MiB, blob "
              f"{len(blob) / 2**20:.1f} MiB")
        with start_registry(tmp / "registry") as reg:
            p = Pusher(reg.url)
            digest = p.blob("bench/lazyfiles", blob)
            p.close()
            ref = ImageReference.parse(f"{reg.host}/bench/lazyfiles:x")
            cdir = tmp / "cache"
            with RegistryClient() as client:
                async def one(check: bool) -> tuple[float, float, int]:
                    cache = ChunkCache(cdir, 4 << 30, metrics=LazyMetrics())
                    f = BlobFetcher(client, ref, digest, len(blob), metrics=LazyMetrics(), spool_dir=cdir)
                    r = await open_layer_reader(f, cache, digest=digest, size=len(blob), toc_digest=toc_digest,
                                                metrics=LazyMetrics())
                    t0, c0 = time.perf_counter(), time.process_time()
                    await read_every(r, files, names)
                    t, c = time.perf_counter() - t0, time.process_time() - c0
                    r.close()
                    await r.settle()
                    await trio.to_thread.run_sync(cache.settle)
                    if check:
                        for name in names[:: max(1, len(names) // 50)]:
                            assert bytes(await r.read(name, 0, len(files[name]))) == files[name], name
                    return t, c, f.bytes_fetched

                t, c, fetched = trio.run(one, True)
                print(f"first pass (fetch everything): {t:.2f} s, CPU {c:.2f} s, {fetched} bytes fetched")
                rows = []
                for _ in range(args.runs):
                    if not args.no_drop_caches:
                        drop_caches()
                    rows.append(trio.run(one, False))
                for _, _, fetched in rows:
                    assert fetched == 0, "a cold pass fetched from the registry"
                t, c, _ = min(rows)
                n = len(names)
                print(f"cold pass{'' if args.no_drop_caches else ' (drop_caches)'}, best of {len(rows)}: "
                      f"{t:.3f} s = {t / n * 1e6:.0f} us/file, CPU {c:.3f} s = {c / n * 1e6:.0f} us/file "
                      f"(all: {', '.join(f'{r[0]:.3f}/{r[1]:.3f}' for r in rows)}); load {os.getloadavg()[0]:.2f}")
                if args.profile:
                    if not args.no_drop_caches:
                        drop_caches()
                    prof = cProfile.Profile()
                    prof.enable()
                    trio.run(one, False)
                    prof.disable()
                    prof.dump_stats(str(args.profile))
                    print(f"profile written to {args.profile}")
        return 0
    finally:
        remove_tree_quietly(tmp)


if __name__ == "__main__":
    sys.exit(main())
