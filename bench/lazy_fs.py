#!/usr/bin/env python3
"""Benchmark: the lazy FUSE mount (``cvmfs-snap lazyfs``) against native trees, on a loopback docker-registry.

Layers are generated here (nothing is downloaded), converted with our eStargz writer and pushed; the real
``cvmfs-snap lazyfs`` process attaches them. Measured (needs root and /dev/fuse):

- **cold sequential read**: the 64 MiB file read through the FUSE mount of a second ``lazyfs`` process (no
  background fetch, so only the reads fetch), kernel caches dropped and the layer attached afresh each time (its
  chunk cache empty), against a plain HTTP download of the same blob (httpx, bytes discarded); both ratios the
  goal could mean are printed (see bench/README.md);
- **warm read vs the page cache**: a 64 MiB file read through the FUSE mount after one full read (its pages are in
  the page cache, kept by ``keep_cache``), against the same file on a native tree, also cached;
- **file-heavy workload**: ``find`` + read of 20,000 small files, through an overlayfs mount of the lazy layer and
  of a native copy; "cold" = kernel caches dropped (``drop_caches``; the lazy layer's chunks are in its local cache,
  as on a node that started the container before), "warm" = run again right after;
- warm ``open`` + ``read`` + ``close`` of each of those files in this process (the file systems' own cost, without
  ``find`` and ``cat``'s ``exec``s);
- the same workload on the node-local **unpacked copy** the process makes once the background fetch has the whole
  layer (what new containers get on a long-lived node);
- **RSS of the lazyfs process** with 20 lazy layers attached (each ~1000 files), besides the two above (RSS and
  PSS from ``/proc/PID/smaps_rollup``: PSS shares the interpreter's and libraries' pages with other processes).

    python bench/lazy_fs.py                # the full run
    python bench/lazy_fs.py --files 5000   # a smaller file-heavy tree
    python bench/lazy_fs.py --no-drop-caches
    python bench/lazy_fs.py --rss-only     # memory only: attach the 20 layers, read every file once, no timing
    python bench/lazy_fs.py --cold-only --tmp /dev/shm   # the cold sequential read only
"""

from __future__ import annotations

import argparse
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cvmfs_snap.estargz import BuildOptions, build  # noqa: E402
from cvmfs_snap.fsutil import remove_tree_quietly, walk  # noqa: E402
from cvmfs_snap.lazyfs import control  # noqa: E402
from cvmfs_snap_devenv.images import Pusher, make_tar  # noqa: E402
from cvmfs_snap_devenv.registry import start_registry  # noqa: E402

MIB = 1 << 20
FILE_MIB = 64


def layer_blob(files: dict[str, bytes]) -> tuple[bytes, str]:
    dirs = sorted({"/".join(p.split("/")[:k]) + "/" for p in files for k in range(1, p.count("/") + 1)})
    out = io.BytesIO()
    res = build(io.BytesIO(make_tar([*dirs, *files.items()])), out, BuildOptions())
    return out.getvalue(), res.toc_digest


def big_file(rnd: random.Random) -> bytes:
    """FILE_MIB MiB: a third random bytes, the rest word-like text (about 2:1 compressible overall)."""
    n = FILE_MIB * MIB
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 10))) for _ in range(5000)]
    text = b" ".join(rnd.choice(words) for _ in range((n - n // 3) // 6 + 1))
    return (rnd.randbytes(n // 3) + text)[:n]


def small_files(n: int, seed: int) -> dict[str, bytes]:
    rnd = random.Random(seed)
    return {f"usr/share/d{i // 200:03d}/f{i:05d}.txt": rnd.randbytes(rnd.randint(200, 4000)) for i in range(n)}


def write_native(files: dict[str, bytes], dest: Path) -> None:
    for name, data in files.items():
        p = dest / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workload(tree: Path, pid: int | None = None) -> tuple[float, float]:
    """Wall seconds of ``find`` + ``cat`` of every file, and CPU seconds the lazyfs process ``pid`` spent."""
    c0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.perf_counter()
    subprocess.run(f"find {tree} -type f -print0 | xargs -0 cat > /dev/null", shell=True, check=True)
    return time.perf_counter() - t0, (cpu_seconds(pid) - c0 if pid else 0.0)


def tree_files(root: Path) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in walk(root) for f in files)


def open_read_close(paths: list[str]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.read(fd, 1 << 16)
        os.close(fd)
    return time.perf_counter() - t0


def warm_per_file(lazy: Path, native: Path, reps: int = 9) -> str:
    """Warm ``open`` + ``read`` + ``close`` of every file, in this process (no ``find``, no ``exec`` of ``cat``:
    only the file systems' own cost), lazy and native alternating; per file, best and median."""
    a, b = tree_files(lazy), tree_files(native)
    open_read_close(a), open_read_close(b)
    ra, rb = [], []
    for _ in range(reps):
        ra.append(open_read_close(a))
        rb.append(open_read_close(b))
    ra.sort()
    rb.sort()
    med = reps // 2
    return (f"warm open+read+close per file, in process: lazy {ra[0] / len(a) * 1e6:.2f} us (median "
            f"{ra[med] / len(a) * 1e6:.2f}), native {rb[0] / len(b) * 1e6:.2f} us (median {rb[med] / len(b) * 1e6:.2f})"
            f" = {ra[0] / rb[0]:.3f}x best, {ra[med] / rb[med]:.3f}x median")


def requests(sock: Path) -> dict[str, int]:
    """The lazyfs process's FUSE requests so far, by name."""
    return dict(control.call(sock, {"op": "health"}, timeout=30)["fuse_requests"])


def diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def read_file(p: Path) -> float:
    t0 = time.perf_counter()
    with open(p, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    return time.perf_counter() - t0


def start_lazyfs(root: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A ``cvmfs-snap lazyfs`` process on ``root``, answering its control socket."""
    root.mkdir(exist_ok=True)
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "cvmfs_snap.cli", "lazyfs", "--root", str(root), *extra],
                                stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for _ in range(600):
        try:
            control.call(root / "control.sock", {"op": "health"}, timeout=2)
            return proc
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"lazyfs on {root} did not answer (see {log})")


def attach(sock: Path, lid: str, blob: bytes, toc: str, digest: str, host: str) -> Path:
    ans = control.call(sock, {"op": "attach", "id": lid, "digest": digest, "size": len(blob), "toc_digest": toc,
                              "image_ref": f"{host}/bench/lazyfs:x", "hosts_dir": None, "credentials": None},
                       timeout=120)
    return Path(str(ans["path"]))


def read_ahead_kb(mnt: Path, kb: int | None = None) -> int:
    """The kernel readahead of the FUSE mount at ``mnt`` (its bdi's ``read_ahead_kb``), set to ``kb`` first."""
    st = os.stat(mnt)
    knob = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    if kb is not None:
        knob.write_text(f"{kb}\n")
    return int(knob.read_text())


def cold_read(tmp: Path, blob: bytes, toc: str, digest: str, host: str, name: str, runs: int,
              ra_kb: int | None = None) -> None:
    """Cold sequential read of file ``name`` of the layer through FUSE vs a plain download of its blob."""
    url = f"http://{host}/v2/bench/lazyfs/blobs/{digest}"
    with httpx.Client() as c:
        def download() -> float:
            t0 = time.perf_counter()
            with c.stream("GET", url) as resp:
                for _ in resp.iter_raw():
                    pass
            return time.perf_counter() - t0
        dl = min(download() for _ in range(runs))
    root = tmp / "lazy-cold"
    proc = start_lazyfs(root, tmp / "lazyfs-cold.log", "--no-background-fetch", "--no-unpacked-copy")
    sock = root / "control.sock"
    try:
        rows = []
        for i in range(runs):
            path = attach(sock, f"cold{i}", blob, toc, digest, host) / name
            if i == 0 and ra_kb is not None:  # after an attach: the process has answered the kernel's INIT
                read_ahead_kb(root / "mnt", ra_kb)
            file_bytes = path.stat().st_size
            drop_caches()
            c0 = cpu_seconds(proc.pid)
            t = read_file(path)
            rows.append((t, cpu_seconds(proc.pid) - c0))
            control.call(sock, {"op": "detach", "id": f"cold{i}"}, timeout=60)  # its chunks leave the cache
        ra = read_ahead_kb(root / "mnt")
        t, cpu = min(rows)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"plain HTTP download of the {len(blob) / MIB:.1f} MiB blob: {dl:.3f} s, {len(blob) / dl / MIB:.0f} MiB/s")
    print(f"{file_bytes / MIB:.0f} MiB file, cold sequential read through FUSE: {t:.3f} s (lazyfs CPU {cpu:.2f} s), "
          f"{file_bytes / t / MIB:.0f} MiB/s of file data; time ratio (download time / read time) {dl / t:.2f}x, "
          f"throughput ratio (file bytes/s read / blob bytes/s downloaded) {(file_bytes / t) / (len(blob) / dl):.2f}x"
          f" (best of {runs}; all: {', '.join(f'{r:.3f}' for r, _ in rows)} s; FUSE readahead {ra} KiB)")


def memory(pid: int) -> str:
    """``RSS x MiB (PSS y MiB)`` of a process, from its smaps_rollup."""
    got = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            got[key] = int(rest.split()[0]) / 1024
    return f"RSS {got.get('Rss', 0):.1f} MiB (PSS {got.get('Pss', 0):.1f} MiB)"


def overlay(lower: Path, target: Path, empty: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}:{empty}", str(target)], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tmp", type=Path, default=None, help="work directory (lazyfs roots, caches; default $TMPDIR)")
    ap.add_argument("--cold-only", action="store_true", help="only the cold sequential read of the 64 MiB file")
    ap.add_argument("--read-ahead-kb", type=int, default=None,
                    help="set the FUSE mount's kernel readahead (read_ahead_kb of its bdi) for the cold read")
    ap.add_argument("--rss-only", action="store_true",
                    help="attach the layers, read every file of the file-heavy one once, report memory; no timing")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lazyfs-", dir=args.tmp))
    mounts: list[Path] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        rnd = random.Random(3)
        big = {"data/big.bin": big_file(rnd)}
        if args.cold_only:
            blob, toc = layer_blob(big)
            with start_registry(tmp / "registry") as reg:
                p = Pusher(reg.url)
                digest = p.blob("bench/lazyfs", blob)
                p.close()
                cold_read(tmp, blob, toc, digest, reg.host, "data/big.bin", args.runs, args.read_ahead_kb)
            return 0
        many = small_files(args.files, 1)
        extra = [small_files(1000, 100 + i) for i in range(max(0, args.layers - 2))]
        blobs = [layer_blob(big), layer_blob(many), *(layer_blob(f) for f in extra)]
        write_native(big, tmp / "native-big")
        write_native(many, tmp / "native-many")
        lroot = tmp / "lazy"
        with start_registry(tmp / "registry") as reg:
            p = Pusher(reg.url)
            digests = [p.blob("bench/lazyfs", b) for b, _ in blobs]
            p.close()
            cold_read(tmp, *blobs[0], digests[0], reg.host, "data/big.bin", args.runs, args.read_ahead_kb)
            proc = start_lazyfs(lroot, tmp / "lazyfs.log")
            sock = lroot / "control.sock"
            print(f"lazyfs after start, no layer: {memory(proc.pid)}")
            paths = [attach(sock, digest[7:], blob, toc, digest, reg.host)
                     for (blob, toc), digest in zip(blobs, digests, strict=True)]
            print(f"lazyfs with {len(paths)} lazy layers attached ({sum(len(f) for f in extra) + len(many) + 1}"
                  f" files): {memory(proc.pid)}")
            if args.rss_only:
                workload(paths[1])
                print(f"lazyfs after reading the {len(many)} files of one layer: {memory(proc.pid)}")
                read_file(paths[0] / "data/big.bin")
                print(f"lazyfs after reading its 64 MiB file too: {memory(proc.pid)}")
                time.sleep(25)  # idle: the memory tier's idle chunks are dropped (every 10 s)
                print(f"lazyfs 25 s later (idle): {memory(proc.pid)}")
                return 0

            # warm read vs the page cache
            lazy_big, native_big = paths[0] / "data/big.bin", tmp / "native-big/data/big.bin"
            size = lazy_big.stat().st_size
            read_file(lazy_big)
            read_file(native_big)
            lw = min(read_file(lazy_big) for _ in range(args.runs))
            nw = min(read_file(native_big) for _ in range(args.runs))
            print(f"64 MiB file, warm: lazy {size / lw / MIB:8.1f} MiB/s, native page cache "
                  f"{size / nw / MIB:8.1f} MiB/s = {nw / lw:.2f}x")

            # file-heavy workload through overlayfs
            empty = tmp / "empty"
            empty.mkdir()
            lz, nt = tmp / "ovl-lazy", tmp / "ovl-native"
            overlay(paths[1], lz, empty)
            mounts.append(lz)
            overlay(tmp / "native-many", nt, empty)
            mounts.append(nt)
            workload(lz)  # first pass fetches every chunk from the registry (not what is measured)
            # the background fetch of the 20 layers and their unpacked copies would share the 2 cores with the
            # timed runs: wait for them, so that only the lazy path is measured (a long-lived node's steady state)
            t0 = time.monotonic()
            while not all(la["complete"] and la["unpacked"]
                          for la in control.call(sock, {"op": "list"}, timeout=30)["layers"]):
                assert time.monotonic() - t0 < 900, "background fetch not done within 15 minutes"
                time.sleep(0.5)
            print(f"background fetch and unpacked copies of the {len(paths)} layers done after "
                  f"{time.monotonic() - t0:.1f} s more (the timed runs below do not compete with them)")
            # lazy and native alternate, so that a change of load weighs on both; each warm run follows its cold one
            runs: dict[str, tuple[list[tuple[float, float]], list[tuple[float, float]]]] = {"lazy": ([], []),
                                                                                           "native": ([], [])}
            for _ in range(args.runs):
                for label, tree in (("lazy", lz), ("native", nt)):
                    if not args.no_drop_caches:
                        drop_caches()
                    r0 = requests(sock)
                    runs[label][0].append(workload(tree, proc.pid))
                    r1 = requests(sock)
                    runs[label][1].append(workload(tree, proc.pid))
                    r2 = requests(sock)
                    if label == "lazy":
                        cold_req, warm_req = diff(r0, r1), diff(r1, r2)
            print(f"FUSE requests of the last cold run: {cold_req}; of the last warm run: {warm_req}")
            for label, (c, w) in runs.items():
                print(f"  {label}: cold {', '.join(f'{t:.2f}' for t, _ in c)} s; "
                      f"warm {', '.join(f'{t:.2f}' for t, _ in w)} s")
            rows = [(label, min(c), min(w)) for label, (c, w) in runs.items()]
            (_, (lc, lcc), (lwm, lwc)), (_, (nc, _), (nwm, _)) = rows
            print(f"find + read of {args.files} small files: cold lazy {lc:.2f} s vs native {nc:.2f} s = "
                  f"{lc / nc:.2f}x; warm lazy {lwm:.2f} s vs native {nwm:.2f} s = {lwm / nwm:.2f}x"
                  + (" (caches not dropped)" if args.no_drop_caches else "")
                  + f"; lazyfs process CPU: cold {lcc:.2f} s, warm {lwc:.2f} s")
            print(warm_per_file(lz, nt))
            print(f"lazyfs after the workloads: {memory(proc.pid)}")
            # once the background fetch has everything, new containers get the node-local unpacked copy
            lid = digests[1][7:]
            deadline = time.monotonic() + 600
            while not control.call(sock, {"op": "check", "id": lid})["unpacked"]:
                assert time.monotonic() < deadline, "no unpacked copy within 10 minutes"
                time.sleep(0.5)
            up = tmp / "ovl-unpacked"
            overlay(Path(str(control.call(sock, {"op": "check", "id": lid})["path"])), up, empty)
            mounts.append(up)
            ucold: list[float] = []
            uwarm: list[float] = []
            for _ in range(args.runs):
                if not args.no_drop_caches:
                    drop_caches()
                ucold.append(workload(up)[0])
                uwarm.append(workload(up)[0])
            print(f"same on the unpacked copy of the complete layer: cold {min(ucold):.2f} s = {min(ucold) / nc:.2f}x "
                  f"native, warm {min(uwarm):.2f} s = {min(uwarm) / nwm:.2f}x native")
        return 0
    finally:
        for m in mounts:
            subprocess.run(["umount", str(m)], check=False)
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        remove_tree_quietly(tmp)


if __name__ == "__main__":
    sys.exit(main())
