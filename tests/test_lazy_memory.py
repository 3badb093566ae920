"""Resident memory of the node's two long-running processes (issue 9's RSS goal; the numbers live in
bench/README.md, measured by bench/lazy_pull.py and bench/lazy_fs.py): what they import, and what a lazy layer's
TOC costs once parsed."""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

from cvmfs_snap.estargz import open_bytes
from cvmfs_snap.lazyfs import cache as cache_module
from cvmfs_snap.lazyfs.cache import ChunkCache
from cvmfs_snap.lazyfs.tree import build_tree
from cvmfs_snap.procmem import release_free_heap
from cvmfs_snap_devenv.images import make_tar
from tests.support.estargz import to_estargz

ROOT = Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent("""
    import atexit, json, sys
    def probe():
        heavy = sorted({k.split(".")[0] for k, m in sys.modules.items() if m is not None
                        and k.split(".")[0] in ("trio", "anyio", "rich", "click", "pygments", "h2", "hpack",
                                                "pyfuse3", "grpc", "httpx", "pydantic", "ssl",
                                                "prometheus_client")}
                       | {k for k, m in sys.modules.items() if m is not None and k in (
                          "cvmfs_snap.layer.apply", "cvmfs_snap.layer.compression", "cvmfs_snap.layer.tarstream",
                          "cvmfs_snap.estargz.reader", "cvmfs_snap.estargz.writer", "tarfile", "zlib_ng", "isal")})
        sys.stderr.write("PROBE " + json.dumps(heavy) + "\\n")
    atexit.register(probe)
    sys.argv = ["cvmfs-snap", *sys.argv[1:]]
    from cvmfs_snap.cli import main
    main()
""")


@pytest.mark.parametrize(("command", "expected"), [
    # no trio (the control client is blocking), no FUSE, no layer codecs nor eStargz reader and writer (it never
    # decodes a layer: cvmfs_snap.layer and cvmfs_snap.estargz import those on first use)
    # and no HTTP client, ssl or prometheus_client (the lazyfs process reads the registry; metrics are off), no
    # pydantic (cvmfs_snap.validation checks the TOML and the layout's records with msgspec, about 1 MiB)
    ("snapshotter", ["grpc"]),
    # no pydantic (msgspec spells Limits' constraints), no writer nor layer application; the reader needs
    # the tar header decoder, its chunks the gzip inflaters (isal, zlib-ng); no prometheus_client without
    # --metrics-address
    ("lazyfs", ["cvmfs_snap.estargz.reader", "cvmfs_snap.layer.tarstream", "httpx", "isal", "ssl", "trio",
                "zlib_ng"]),
])
def test_process_imports_only_what_it_uses(command: str, expected: list[str]) -> None:
    """The process as the console script starts it (``--help`` ends it once its subcommand module is imported):
    httpx's own command line (click, rich, pygments), HTTP/2 and anyio are not loaded, the daemon has no trio and
    the lazyfs process no pydantic (7 MiB); neither loads the layer codecs or the eStargz writer (1.4 MiB in the
    daemon, 0.7 in the lazyfs process); the daemon has no HTTP client, ssl, prometheus_client (11 MiB) or pydantic
    (6 MiB) either."""
    r = subprocess.run([sys.executable, "-c", PROBE, command, "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, r.stderr[-3000:]
    assert json.loads(line[len("PROBE "):]) == expected


LATER_SSL = textwrap.dedent("""
    import sys
    sys.argv = ["cvmfs-snap", "snapshotter", "--help"]
    from cvmfs_snap.cli import main
    try:
        main()
    except SystemExit:
        pass
    assert "ssl" not in sys.modules, "ssl was imported with the daemon"
    import asyncio.sslproto
    assert asyncio.sslproto.ssl is None  # grpc's asyncio got no ssl
    from cvmfs_snap.snapshotter import missreport  # the publish-on-miss reporter: httpx, ssl, prometheus_client
    import ssl
    ssl.create_default_context()
    print("LATER", missreport.__name__)
""")


def test_daemon_imports_ssl_when_it_needs_it() -> None:
    """ssl is kept out of the daemon's import (grpc's asyncio would load it and libcrypto for nothing) but not out
    of the process: the publish-on-miss reporter, imported when configured, gets it as usual."""
    r = subprocess.run([sys.executable, "-c", LATER_SSL], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LATER cvmfs_snap.snapshotter.missreport" in r.stdout


def _small_files_layer(n: int) -> tuple[bytes, str]:
    rnd = random.Random(5)
    files = [(f"usr/share/d{i // 100:03d}/f{i:05d}.txt", rnd.randbytes(rnd.randint(200, 3000))) for i in range(n)]
    dirs = sorted({name.rpartition("/")[0] + "/" for name, _ in files} | {"usr/", "usr/share/"})
    blob, res = to_estargz(make_tar([*dirs, *files]))
    return blob, res.toc_digest


def test_parsed_toc_and_tree_are_compact() -> None:
    """What an attached layer keeps per file: its parsed TOC (no raw JSON, repeated values shared) and its inode
    tree, under 1000 bytes a file together (about 1500 before: raw JSON kept, one object per repeated value)."""
    n = 3000
    blob, toc_digest = _small_files_layer(n)
    gc.collect()
    tracemalloc.start()
    try:
        es = open_bytes(blob, toc_digest=toc_digest)
        tree = build_tree(es.toc)
        gc.collect()
        snap = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    # what the parse and the tree keep, whatever module allocated it, but not what other threads allocate meanwhile
    mine = ("estargz", "lazyfs", "layer", "json")
    held = sum(st.size for st in snap.statistics("filename")
               if any(f"/{m}/" in st.traceback[0].filename for m in mine))
    assert es.toc_json is None
    assert len(tree.nodes) > n
    regs = [e for e in es.toc.entries if e.type == "reg"]
    assert len(regs) == n + 1  # and the landmark file
    assert len({id(e.type) for e in regs}) == 1
    assert len({id(e.modtime) for e in regs}) == len({e.modtime for e in regs})
    assert all(e.chunk_digest is e.digest for e in regs)  # one chunk each: one string, not two
    assert all(es.toc.chunks[e.name][0] is e for e in regs)
    assert held / n < 1000, f"{held / n:.0f} bytes per file"
    assert open_bytes(blob, keep_toc_json=True).toc_json  # still there for those who ask


def test_chunk_cache_index_stays_small(tmp_path: Path) -> None:
    """The cache's in-memory index: one reference per chunk is a shared layer name, not a set per chunk."""
    cache = ChunkCache(tmp_path / "cache", 1 << 30, memory_bytes=0)
    layer_a, layer_b = "a" * 64, "b" * 64
    keys = [f"{i:064x}" for i in range(2000)]
    gc.collect()
    tracemalloc.start()
    try:
        for k in keys:
            cache.put(k, b"x", layer_a)
        cache.settle()  # (the list of chunks whose pages are dropped later is not index)
        gc.collect()
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, cache_module.__file__)])
    finally:
        tracemalloc.stop()
    held = sum(st.size for st in snap.statistics("filename"))  # what the cache's own code keeps (no other thread)
    assert held / len(keys) < 200, f"{held / len(keys):.0f} bytes per chunk"  # 318 with a set per chunk
    cache.put(keys[0], b"x", layer_b)  # shared by two layers now
    assert cache.layer_keys(layer_b) == {keys[0]}
    cache.release_layer(layer_a)
    assert cache.get(keys[0]) == b"x" and cache.get(keys[1]) is None
    cache.release_layer(layer_b)
    assert cache.get(keys[0]) is None


def test_idle_hot_chunks_leave_memory(tmp_path: Path) -> None:
    """The memory tier keeps what is being read, not what was read once: chunks unused for the idle time are
    dropped by trim_hot (the lazyfs process calls it every HOT_IDLE_SECONDS), recently used ones stay."""
    cache = ChunkCache(tmp_path / "cache", 1 << 30, memory_bytes=1 << 20)
    old, new = "1" * 64, "2" * 64
    cache.put_hot(old, b"o" * 1000)
    cache.put_hot(new, b"n" * 1000)
    assert cache.trim_hot(idle=60.0) == 0 and cache.hot_bytes == 2000
    time.sleep(0.6)
    assert cache.get_hot(new) == b"n" * 1000  # a use refreshes it
    assert cache.trim_hot(idle=0.4) == 1000
    assert cache.get_hot(old) is None and cache.get_hot(new) == b"n" * 1000 and cache.hot_bytes == 1000
    time.sleep(0.6)
    assert cache.trim_hot(idle=0.4) == 1000 and cache.hot_bytes == 0


def _rss_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1])
    return 0


def test_free_heap_goes_back_to_the_system() -> None:
    """After a burst of chunk-sized objects (a few KB: heap, not mmap) is freed, with a few survivors pinning the
    heap's top, release_free_heap gives the free pages back (the lazyfs process calls it once reads stop)."""
    burst = [bytes(3000) + i.to_bytes(4, "little") for i in range(20_000)]  # ~60 MB
    keep = burst[::500]  # survivors spread over the heap: nothing is trimmed at its top alone
    del burst
    gc.collect()
    before = _rss_kib()
    assert release_free_heap()
    after = _rss_kib()
    assert before - after > 20 * 1024, (before, after)
    assert len(keep) == 40
