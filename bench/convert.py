#!/usr/bin/env python3
"""Benchmark: ``cvmfs-snap convert`` (1 and 2 workers; the Go tools' level 9 and our default level) vs
``ctr-remote image convert --estargz`` and ``ctr-remote image optimize --no-optimize`` (stargz-snapshotter 0.12.0
built from Debian's Go packages, ../shared/tools/stargz-peer) on the same generated image: wall time, MB/s of
uncompressed image data, output size, peak RSS.

The image is built here (nothing is downloaded) and pushed to a private loopback registry with gzip level 1. By default
its layers hold this machine's own ``/usr`` files (binaries, libraries, Python sources, docs: what container images are
made of), in sorted order; ``--content synthetic`` generates files of word-like text, random bytes and repetitive
records instead (a text that Go's deflate happens to pack ~3 % tighter than zlib/zlib-ng).
``ctr-remote`` converts from containerd's content store, so the image is pulled into a private containerd first
(not timed) and its push to the registry is timed separately; ours goes registry to registry in one command.
Each command runs as a child; its ``ru_maxrss`` comes from ``wait4`` (for ctr-remote that is the client only: the
containerd daemon's peak is reported too). ``--rss-gib 4`` additionally converts one 4 GiB layer with ours alone.

    python bench/convert.py                        # ~1 GiB image in 4 layers
    python bench/convert.py --size-mib 256 --rss-gib 4
    nice -n -15 python bench/convert.py --size-mib 512 --no-peer --levels 6 --runs 3   # issue 8's x1.8 goal
"""

from __future__ import annotations

import argparse
import io
import os
import random
import stat
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from publish import _GzipSink, _HashingWriter  # type: ignore[import-not-found]  # noqa: E402
from publish import push_image as push_layers  # noqa: E402

from cvmfs_snap.fsutil import remove_tree_quietly, walk  # noqa: E402
from cvmfs_snap.layer.compression import MEDIA_TYPES  # noqa: E402
from cvmfs_snap_devenv.containerd import start_containerd  # noqa: E402
from cvmfs_snap_devenv.images import OCI_MANIFEST  # noqa: E402
from cvmfs_snap_devenv.procs import unmount_below  # noqa: E402
from cvmfs_snap_devenv.registry import start_registry  # noqa: E402

OCI_GZIP = next(mt for mt, c in MEDIA_TYPES.items() if c == "gzip" and ".oci." in mt and "nondistributable" not in mt)
PEER = [os.environ.get("STARGZ_PEER_BIN", ""), "/work/shared/tools/stargz-peer/bin", "/tmp/stargz-peer-bin"]


class _Content:
    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.words = [bytes(self.rnd.choice(b"abcdefghijklmnopqrstuvwxyz_./") for _ in range(self.rnd.randint(2, 11)))
                      for _ in range(8000)]

    def file(self, i: int, n: int) -> bytes:
        kind = i % 4
        if kind == 2:
            return self.rnd.randbytes(n)
        if kind == 3:
            rec = b"%08d;cvmfs-snap;record;" % i
            return (rec * (n // len(rec) + 1))[:n]
        out = bytearray()
        while len(out) < n:
            out += b" ".join(self.rnd.choices(self.words, k=400)) + b"\n"
        return bytes(out[:n])


def system_files(top: str = "/usr") -> list[tuple[str, int]]:
    """Regular files and symlinks under ``top`` in sorted order, with their sizes."""
    out: list[tuple[str, int]] = []
    for dirpath, dirs, files in walk(top):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                out.append((p, st.st_size if stat.S_ISREG(st.st_mode) else 0))
    return out


def make_layer(path: Path, index: int, size: int, files: list[tuple[str, int]] | None = None) -> dict[str, object]:
    content = _Content(index)
    with open(path, "wb") as f:
        hw = _HashingWriter(f)
        sink = _GzipSink(hw)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
            written, n = 0, 0
            if files is not None:  # system content: files is a stack, the next one on top
                while written < size and files:
                    p, fsize = files.pop()
                    try:
                        tf.add(p, arcname=p.lstrip("/"), recursive=False)
                    except OSError:
                        continue
                    written += fsize
                written = size
            while written < size:
                chunk = min(int(content.rnd.expovariate(1 / 300_000)) + 1, size - written, 64 << 20)
                ti = tarfile.TarInfo(f"layer{index}/d{n % 97:02d}/f{n:06d}")
                ti.size, ti.mode, ti.mtime = chunk, 0o644, 1_700_000_000
                tf.addfile(ti, io.BytesIO(content.file(n, chunk)))
                written += chunk
                n += 1
        sink.finish()
    return {"mediaType": OCI_GZIP, "digest": "sha256:" + hw.h.hexdigest(), "size": hw.n,
            "diff_id": "sha256:" + sink.diff.hexdigest(), "uncompressed": sink.size}


#: fork+exec the command, report its peak RSS and CPU seconds (user+sys) from wait4: on a shared machine the CPU
#: time says more about the work done than the wall time does
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, ru = os.wait4(pid, 0)
print(ru.ru_maxrss, ru.ru_utime + ru.ru_stime, os.waitstatus_to_exitcode(status))
"""


def run_child(cmd: list[str]) -> tuple[float, int, int, float]:
    """(wall seconds, peak RSS MiB, exit status, CPU seconds) of one child."""
    import subprocess

    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=ROOT, capture_output=True, check=False)
    secs = time.monotonic() - t0
    try:
        rss_s, cpu_s, rc_s = proc.stdout.split()
        rss, cpu, rc = int(rss_s) // 1024, float(cpu_s), int(rc_s)
    except ValueError:
        rss, cpu, rc = 0, 0.0, proc.returncode or 1
    if rc != 0:
        print(f"command failed ({rc}): {' '.join(cmd)}\n{proc.stderr.decode(errors='replace')[-2000:]}",
              file=sys.stderr)
    return secs, rss, rc, cpu


def push_image(url: str, repo: str, work: Path, layer_sizes: list[int], system: bool = False) -> tuple[int, int]:
    """Build and push the image; (compressed, uncompressed) bytes of its layers."""
    pool = list(reversed(system_files())) if system else None
    layers = [make_layer(work / f"layer{i}.tar.gz", i, s, pool) for i, s in enumerate(layer_sizes)]
    push_layers(url, work, repo, layers, timeout=900)
    return sum(int(str(lay["size"])) for lay in layers), sum(int(str(lay["uncompressed"])) for lay in layers)


def image_size(url: str, repo: str, tag: str) -> int:
    r = httpx.get(f"{url}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}, timeout=60)
    r.raise_for_status()
    return sum(int(lay["size"]) for lay in r.json()["layers"])


def peer_bin() -> str | None:
    for d in PEER:
        if d and os.access(os.path.join(d, "ctr-remote"), os.X_OK):
            return os.path.join(d, "ctr-remote")
    return None


def vm_hwm_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="uncompressed image size (default 1024)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rss-gib", type=float, default=0, help="also convert one layer of this many GiB (ours only)")
    ap.add_argument("--content", choices=("system", "synthetic"), default="system",
                    help="layer contents: this machine's /usr files (default) or generated data")
    ap.add_argument("--no-peer", action="store_true", help="measure cvmfs-snap convert only")
    ap.add_argument("--levels", default="9,6", help="compression levels to run ours at (default 9,6; the peer runs "
                    "at the same ones)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each of ours, best wall time reported (default 1)")
    ap.add_argument("--keep", type=Path, default=None)
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-convert-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    try:
        with start_registry(work / "registry") as reg:
            t0 = time.monotonic()
            per = (args.size_mib << 20) // args.layers
            gz, usize = push_image(reg.url, "bench/src", work, [per] * args.layers, system=args.content == "system")
            print(f"image: {usize / 2**20:.0f} MiB uncompressed ({args.content}) in {args.layers} layers, "
                  f"{gz / 2**20:.0f} MiB gzip; "
                  f"generated and pushed in {time.monotonic() - t0:.0f}s; load average {os.getloadavg()[0]:.1f}")
            src = reg.ref("bench/src", "v1")

            def row(what: str, secs: float, rss: int, ok: bool, tag: str, cpu: float, extra: str = "") -> None:
                size = image_size(reg.url, "bench/" + tag.split(":")[0], tag.split(":")[1]) if ok else 0
                rows.append({"what": what, "seconds": round(secs, 2), "MB/s": round(usize / secs / 1e6, 1),
                             "cpu s": round(cpu, 1), "output MiB": round(size / 2**20, 1), "peak RSS MiB": rss,
                             "ok": ok, "note": extra, "load": round(os.getloadavg()[0], 1)})
                print(rows[-1], flush=True)

            levels = [int(x) for x in args.levels.split(",")]
            for level in levels:
                best: dict[int, float] = {}
                for workers in (1, 2):
                    tag = f"ours-l{level}-w{workers}:v1"
                    runs = [run_child([sys.executable, "-m", "cvmfs_snap.cli", "convert", src,
                                       reg.ref("bench/" + tag.split(":")[0], "v1"), "--progress", "plain",
                                       "--log-level", "warning", "--workers", str(workers),
                                       "--compression-level", str(level)]) for _ in range(args.runs)]
                    secs, rss, rc, cpu = min(runs)
                    best[workers] = secs
                    note = f"x{best[1] / secs:.2f} from the second worker" if workers == 2 else ""
                    row(f"cvmfs-snap convert, level {level}, {workers} worker(s)", secs, rss,
                        all(r[2] == 0 for r in runs), tag, cpu, note)

            cr = None if args.no_peer else peer_bin()
            if cr is None:
                if not args.no_peer:
                    print("ctr-remote not built: run ../shared/tools/stargz-peer/build.sh; skipping the Go peer")
            else:
                d = Path(tempfile.mkdtemp(prefix="bc-", dir="/tmp"))
                try:
                    with start_containerd(d / "c", proxy_plugins={}, cri_snapshotter=None,
                                          insecure_registries=[reg.host]) as cd:
                        base = [cr, "-a", cd.address]
                        run_child([*base, "image", "pull", "--plain-http", src])
                        for level in levels:
                            for cmd, label in ((["image", "convert", "--estargz", "--oci"], "convert --estargz"),
                                               (["image", "optimize", "--no-optimize", "--oci"],
                                                "optimize --no-optimize")):
                                tag = f"go-{label.split()[0]}-l{level}:v1"
                                dst = reg.ref("bench/" + tag.split(":")[0], "v1")
                                lvl = ["--estargz-compression-level", str(level)]
                                secs, rss, rc, cpu = run_child([*base, *cmd, *lvl, src, dst])
                                psecs, _, prc, pcpu = run_child([*base, "image", "push", "--plain-http", dst])
                                row(f"ctr-remote {label}, level {level} (+ push {psecs:.1f}s)", secs + psecs, rss,
                                    rc == 0 and prc == 0, tag, cpu + pcpu, f"convert alone {secs:.1f}s")
                        rows.append({"what": "containerd daemon peak (VmHWM) during ctr-remote",
                                     "peak RSS MiB": vm_hwm_mib(cd.proc.pid)})
                finally:
                    unmount_below(d)
                    remove_tree_quietly(d)

            if args.rss_gib:
                n = int(args.rss_gib * (1 << 30))
                _, n = push_image(reg.url, "bench/huge", work, [n], system=args.content == "system")
                secs, rss, rc, cpu = run_child([sys.executable, "-m", "cvmfs_snap.cli", "convert",
                                                reg.ref("bench/huge", "v1"), reg.ref("bench/huge-esgz", "v1"),
                                                "--progress", "plain", "--log-level", "warning"])
                rows.append({"what": f"cvmfs-snap convert, one {args.rss_gib:g} GiB layer, default options",
                             "seconds": round(secs, 1), "MB/s": round(n / secs / 1e6, 1), "cpu s": round(cpu, 1),
                             "peak RSS MiB": rss, "ok": rc == 0})
                print(rows[-1], flush=True)
    finally:
        if args.keep is None:
            remove_tree_quietly(work)
    print()
    print("| what | wall s | MB/s | CPU s | output MiB | peak RSS MiB | load avg | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['what']} | {r.get('seconds', '')} | {r.get('MB/s', '')} | {r.get('cpu s', '')} | "
              f"{r.get('output MiB', '')} | {r.get('peak RSS MiB', '')} | {r.get('load', '')} | {r.get('note', '')} |")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
