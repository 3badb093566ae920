"""Lazy eStargz pulls: pull time, time to first output and bytes fetched, lazy (ours) vs native containerd, with
stargz-snapshotter's numbers from its peer run beside them (numbers only, no asserts).

    python bench/lazy_pull.py [--files 64] [--reps 3] [--rpull] [--stargz-peer]

The image is the one ``shared/tools/stargz-peer/make-image.py`` builds: a busybox layer and a data layer with
``/data/small.txt`` plus ``--files`` x 1 MiB of random data, here as eStargz made by our writer (the TOC digest
annotation on each layer). Per repetition, on a fresh snapshotter root (cold chunk cache) and containerd:

* **lazy**: ``cvmfs-snap pull`` (or ``rpull`` with ``--rpull``: the CRI code path) with our snapshotter (CVMFS
  empty, so every layer goes to the lazy source; prefetch and background fetch off, as the peer's lazy mode), then
  ``ctr run --rm ... /bin/cat /data/small.txt``; the blob bytes the registry served (its access log);
* **native**: ``ctr images pull`` + ``ctr run`` of the same image with containerd's overlayfs snapshotter.

``--stargz-peer`` also runs ``shared/tools/stargz-peer/run-e2e.sh`` (REPS=1; it builds the peer on first use and
uses 127.0.0.1:5088 and /tmp/stargz-peer) and prints its results table.

Goals (issue 9): pull time and bytes fetched no worse than stargz-snapshotter's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pull import PLUGIN, blob_stats, ctr, run, run_out
from cvmfs_snap.lazyfs.control import PID
from cvmfs_snap.snapshotter.sources.lazy import LazyProcess, LazySettings
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.containerd import start_containerd
from cvmfs_snap_devenv.procs import stop_lazyfs
from cvmfs_snap_devenv.registry import blob_gets, start_registry
from tests.support.snapshotter_daemon import start_daemon, stop_daemon, wait_ready

MiB = 1 << 20
SMALL = b"hello from the small file\n"
PEER = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "stargz-peer"


def build(files: int, extra_layers: int = 0) -> im.BuiltImage:
    data: list[im.Entry | tuple[str, bytes] | str] = ["data/", ("data/small.txt", SMALL)]
    data += [(f"data/big{i:03d}", os.urandom(MiB)) for i in range(files)]
    extra = [im.estargz_layer([f"x{j}/", (f"x{j}/f", os.urandom(64 * 1024))]) for j in range(extra_layers)]
    return im.image([im.estargz_layer(im.busybox_entries()), *extra, im.estargz_layer(data)], cmd=("/bin/sh",))


def rpull_bin() -> str:
    for d in (os.environ.get("GOREF_BIN", ""), "/tmp/go-reference/bin",
              str(PEER.parent / "go-reference" / "bin")):
        if d and os.access(os.path.join(d, "rpull"), os.X_OK):
            return os.path.join(d, "rpull")
    sys.exit("rpull not found: build shared/tools/go-reference (./build.sh) or set GOREF_BIN")


def lazy_once(work: Path, reg_log: Path, ref: str, big: str, use_rpull: bool, idle: float = 0.0) -> dict[str, float]:
    snap = work / "snap"
    repo = work / "cvmfs"
    repo.mkdir(parents=True)
    snap.mkdir(parents=True)
    cfg = snap / "c.toml"
    cfg.write_text(f'absolute-mountpoint = "{repo}"\n[cvmfs-snap.lazy]\nhosts-dir = "{work / "certs.d"}"\n'
                   'prefetch = false\nbackground-fetch = false\n')
    sp = start_daemon(snap, "--config", str(cfg), "--log-level", "warn", address=snap / "s.sock")
    root = sp.root
    try:
        wait_ready(sp)
        # the lazyfs process runs before the pull is timed (as stargz-grpc does in the peer's run); its start-up
        # (the first lazy layer on a node) is reported on its own
        t0 = time.perf_counter()
        LazyProcess(root / "lazy", LazySettings(hosts_dir=str(work / "certs.d"), prefetch=False,
                                                background_fetch=False)).ensure()
        t_start = time.perf_counter() - t0
        with start_containerd(work / "ctd", proxy_plugins={PLUGIN: str(sp.address)}) as cd:
            mark = reg_log.stat().st_size
            daemons = (sp.proc.pid, lazyfs_pid(root / "lazy"))
            cpu0 = sum(cpu_seconds(p) for p in daemons)
            if use_rpull:
                t_pull = run([rpull_bin(), "--address", cd.address, "--snapshotter", PLUGIN, "--plain-http", ref],
                             "rpull")
            else:
                t_pull = run([sys.executable, "-m", "cvmfs_snap.cli", "pull", "--address", cd.address,
                              "--snapshotter", PLUGIN, "--plain-http", "--json", ref], "cvmfs-snap pull")
            cpu_pull = sum(cpu_seconds(p) for p in daemons) - cpu0
            t_run, out = run_out(ctr(cd, "run", "--rm", "--snapshotter", PLUGIN, ref, "bench-lazy", "/bin/cat",
                                     "/data/small.txt"), "ctr run (lazy)")
            if out.encode() != SMALL:
                sys.exit(f"lazy container printed {out!r}")
            n, total = blob_stats(reg_log, mark)
            big_bytes = sum(g.size for g in blob_gets(reg_log, mark) if g.digest == big)
            rss, pss = pid_mem(lazyfs_pid(root / "lazy"))
            snap_rss, snap_pss = pid_mem(sp.proc.pid)
            idle_rss = float("nan")
            if idle:  # the same node left alone: what stays resident while the layers stay mounted
                time.sleep(idle)
                idle_rss = pid_mem(lazyfs_pid(root / "lazy"))[0] + pid_mem(sp.proc.pid)[0]
            if os.environ.get("LAZY_PULL_SMAPS"):
                for what, pid in (("lazyfs", lazyfs_pid(root / "lazy")), ("snapshotter", sp.proc.pid)):
                    print(f"{what}: {top_mappings(pid)}")
    finally:
        stop_daemon(sp)
        stop_lazyfs(root / "lazy")
    return {"pull": t_pull, "cpu": cpu_pull, "run": t_run, "requests": n, "bytes": total, "big": big_bytes, "rss": rss,
            "start": t_start, "snap_rss": snap_rss, "pss": pss, "snap_pss": snap_pss, "idle_rss": idle_rss}


def lazyfs_pid(lazy: Path) -> int | None:
    try:
        return int((lazy / PID).read_text())
    except (OSError, ValueError):
        return None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used (/proc/PID/stat), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pid_mem(pid: int | None) -> tuple[float, float]:
    """(RSS, PSS) of a process in MiB, from its smaps_rollup (PSS shares library pages with other processes)."""
    got = {"Rss": float("nan"), "Pss": float("nan")}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in got:
                got[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return got["Rss"], got["Pss"]


def top_mappings(pid: int | None, n: int = 10) -> str:
    """The ``n`` mappings of a process with the most resident memory (``LAZY_PULL_SMAPS=1``), and its threads."""
    rss: dict[str, int] = {}
    name = "?"
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                name = os.path.basename(head[5]) if len(head) > 5 else "[anon]"
            elif head and head[0] == "Rss:":
                rss[name] = rss.get(name, 0) + int(head[1])
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError as e:
        return str(e)
    top = sorted(rss.items(), key=lambda kv: -kv[1])[:n]
    return f"{threads} threads; " + ", ".join(f"{k} {v / 1024:.1f}" for k, v in top)


def native_once(work: Path, reg_log: Path, ref: str, big: str) -> dict[str, float]:
    with start_containerd(work / "nat") as cd:
        mark = reg_log.stat().st_size
        t_pull = run(ctr(cd, "images", "pull", "--plain-http", ref), "ctr images pull")
        t_run, out = run_out(ctr(cd, "run", "--rm", ref, "bench-native", "/bin/cat", "/data/small.txt"),
                             "ctr run (native)")
        if out.encode() != SMALL:
            sys.exit(f"native container printed {out!r}")
        n, total = blob_stats(reg_log, mark)
        big_bytes = sum(g.size for g in blob_gets(reg_log, mark) if g.digest == big)
    return {"pull": t_pull, "cpu": float("nan"), "run": t_run, "requests": n, "bytes": total, "big": big_bytes,
            "rss": float("nan"),
            "start": float("nan"), "snap_rss": float("nan"), "pss": float("nan"), "snap_pss": float("nan"),
            "idle_rss": float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=64, help="1 MiB files in the data layer (default 64)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--extra-layers", type=int, default=0, help="small eStargz layers between the two (RSS with N "
                    "lazy layers mounted)")
    ap.add_argument("--rpull", action="store_true", help="pull with rpull (CRI's code) instead of cvmfs-snap pull")
    ap.add_argument("--idle", type=float, default=0.0, help="also the total RSS after the node has been idle this "
                    "many seconds with the layers mounted (the processes give free heap back when idle)")
    ap.add_argument("--stargz-peer", action="store_true", help="also run shared/tools/stargz-peer/run-e2e.sh")
    args = ap.parse_args()
    img = build(args.files, args.extra_layers)
    big = img.layers[-1]
    print(f"image: busybox {len(img.layers[0].blob)} B + {args.extra_layers} small layers + data layer "
          f"{len(big.blob)} B (eStargz, ours)")
    results: dict[str, list[dict[str, float]]] = {"lazy": [], "native": []}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lazy-bench-", dir="/tmp")))
        reg = stack.enter_context(start_registry(tmp / "reg"))
        im.push_image(reg.url, "bench/lazy", "v1", img)
        ref = reg.ref("bench/lazy", "v1")
        for r in range(args.reps):
            results["lazy"].append(lazy_once(tmp / f"lazy{r}", reg.log, ref, big.digest, args.rpull, args.idle))
            results["native"].append(native_once(tmp / f"nat{r}", reg.log, ref, big.digest))
    print(f"{'mode':<8} {'pull s (median)':>16} {'run s':>8} {'big-layer B':>12} {'all blobs B':>12} "
          f"{'lazyfs RSS MiB':>15} {'snapshotter RSS':>15} {'lazyfs start s':>15}")
    for mode, rs in results.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        print(f"{mode:<8} {med['pull']:>16.3f} {med['run']:>8.3f} {int(med['big']):>12} {int(med['bytes']):>12} "
              f"{med['rss']:>15.1f} {med['snap_rss']:>15.1f} {med['start']:>15.3f}")
        pulls = ", ".join(f"{x['pull']:.3f}" for x in rs)
        print(f"         pulls: {pulls} (range {min(x['pull'] for x in rs):.3f}-{max(x['pull'] for x in rs):.3f})")
        if mode == "lazy":
            cpus = ", ".join(f"{x['cpu']:.2f}" for x in rs)
            print(f"         snapshotter + lazyfs CPU s during the pull: {cpus} (median {med['cpu']:.2f})")
        if mode == "lazy":
            print(f"         PSS MiB: lazyfs {med['pss']:.1f}, snapshotter {med['snap_pss']:.1f}; RSS total "
                  f"{med['rss'] + med['snap_rss']:.1f} MiB (PSS {med['pss'] + med['snap_pss']:.1f})"
                  + (f"; after {args.idle:g} s idle: RSS total {med['idle_rss']:.1f} MiB" if args.idle else ""))
    lazy_big = statistics.median(x["big"] for x in results["lazy"])
    print(f"bytes of the data layer fetched to read one small file: {int(lazy_big)} = "
          f"{100 * lazy_big / len(big.blob):.2f} % of it")
    if args.stargz_peer:
        peer = subprocess.run(["bash", str(PEER / "run-e2e.sh")], env={**os.environ, "REPS": "1",
                              "NFILES": str(args.files)}, capture_output=True, text=True, timeout=3600)
        print("== stargz-snapshotter peer (shared/tools/stargz-peer/run-e2e.sh, REPS=1):")
        print(peer.stdout[-3000:] if peer.returncode == 0 else
              f"failed (exit {peer.returncode}): {peer.stderr[-2000:]}")


if __name__ == "__main__":
    main()
