#!/usr/bin/env python3
"""Benchmark: publishing a generated image with cvmfs-snap-publisher vs ``skopeo copy`` + ``umoci unpack`` of the
same image, 1 vs 2 workers, with the CPU time and peak memory of each child.

Two images: ``big`` (default 1 GiB uncompressed in 4 layers of 8 MiB files) and ``files`` (file-heavy: 20,000 small
files, 1-8 KiB, in 4 layers). Everything runs on loopback: a private docker-registry, the images generated here
(half random, half repetitive data, gzip level 1, streamed to disk and pushed in one upload per blob so the
generator's own memory stays small). Each measured command runs as a child; wall time, its user+system CPU time and
its ``ru_maxrss`` (from ``wait4``) are reported, best wall time of ``--runs``.

    python bench/publish.py                          # both images
    python bench/publish.py --image files --runs 3
    python bench/publish.py --image big --size-mib 256 --layers 2 --keep /tmp/bench
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cvmfs_snap.fsutil import remove_tree_quietly  # noqa: E402
from cvmfs_snap_devenv.images import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Pusher  # noqa: E402
from cvmfs_snap_devenv.registry import start_registry  # noqa: E402

FILE_SIZE = 8 << 20
#: the file-heavy image: this many files in total, each 1-8 KiB, 100 per directory
SMALL_FILES = 20_000


class _HashingWriter(io.RawIOBase):
    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.h.update(b)
        self.n += len(b)
        self.f.write(b)
        return len(b)


class _GzipSink(io.RawIOBase):
    """Receives the tar, hashes it (diffID), gzips it to ``out`` (hashing the blob too)."""

    def __init__(self, out: _HashingWriter) -> None:
        self.out = out
        self.diff = hashlib.sha256()
        self.size = 0
        self.z = zlib.compressobj(1, zlib.DEFLATED, 31)

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.diff.update(b)
        self.size += len(b)
        self.out.write(self.z.compress(bytes(b)))
        return len(b)

    def finish(self) -> None:
        self.out.write(self.z.flush())


def make_layer(path: Path, index: int, size: int) -> dict[str, object]:
    with open(path, "wb") as f:
        hw = _HashingWriter(f)
        sink = _GzipSink(hw)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
            d = tarfile.TarInfo(f"data{index}")
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(d)
            written, n = 0, 0
            while written < size:
                chunk = min(FILE_SIZE, size - written)
                half = chunk // 2
                data = os.urandom(half) + (b"cvmfs-snap benchmark line\n" * (chunk // 26 + 1))[: chunk - half]
                ti = tarfile.TarInfo(f"data{index}/f{n:05d}")
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
                written += chunk
                n += 1
        sink.finish()
    return {"mediaType": OCI_LAYER_GZIP, "digest": "sha256:" + hw.h.hexdigest(), "size": hw.n,
            "diff_id": "sha256:" + sink.diff.hexdigest(), "uncompressed": sink.size}


def make_small_files_layer(path: Path, index: int, files: int) -> dict[str, object]:
    """A layer of ``files`` small files (1-8 KiB, 100 per directory), as a package-heavy base layer looks."""
    rnd = random.Random(index)
    text = b"cvmfs-snap small file benchmark line\n" * 256
    with open(path, "wb") as f:
        hw = _HashingWriter(f)
        sink = _GzipSink(hw)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
            made: set[str] = set()
            for n in range(files):
                d = f"usr/share/l{index}/d{n // 1000}/s{(n // 100) % 10}"
                parts = d.split("/")
                for k in range(1, len(parts) + 1):
                    sub = "/".join(parts[:k])
                    if sub not in made:
                        made.add(sub)
                        ti = tarfile.TarInfo(sub)
                        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                        tf.addfile(ti)
                size = rnd.randint(1024, 8192)
                data = os.urandom(size // 4) + text[: size - size // 4]
                ti = tarfile.TarInfo(f"{d}/f{n:05d}.txt")
                ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
                tf.addfile(ti, io.BytesIO(data))
        sink.finish()
    return {"mediaType": OCI_LAYER_GZIP, "digest": "sha256:" + hw.h.hexdigest(), "size": hw.n,
            "diff_id": "sha256:" + sink.diff.hexdigest(), "uncompressed": sink.size}


#: a small launcher: fork+exec the command and report its ru_maxrss and the CPU time of it and every process it
#: started (worker processes too: the launcher is their subreaper, so orphans are reaped and counted here). Measuring
#: from here directly would be wrong: a child's high-water mark starts at the size of the process that forked it
#: (this one holds the registry client).
_LAUNCHER = """
import ctypes, os, resource, sys
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, ru = os.wait4(pid, 0)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
total = resource.getrusage(resource.RUSAGE_CHILDREN)
print(ru.ru_maxrss, os.waitstatus_to_exitcode(status), total.ru_utime + total.ru_stime)
"""


def run_child(cmd: list[str], cwd: Path = ROOT) -> tuple[float, int, int, float]:
    """(seconds, peak RSS in MiB, exit status, user+system CPU seconds of it and its children) of one child."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=cwd, capture_output=True, check=False)
    secs = time.monotonic() - t0
    try:
        a, b, c = proc.stdout.split()
        maxrss_kib, rc, cpu = int(a), int(b), float(c)
    except ValueError:
        maxrss_kib, rc, cpu = 0, proc.returncode or 1, 0.0
    if rc != 0:
        print(f"command failed ({rc}): {' '.join(cmd)}\n{proc.stderr.decode(errors='replace')[-2000:]}",
              file=sys.stderr)
    return secs, maxrss_kib // 1024, rc, cpu


#: publishes in-process, as the daemon (``loop``) does: the Publisher lives on, so its worker processes are started
#: before (by a warm-up image) and interpreter start-up is not part of the time. Prints publish_image's seconds.
_INNER = """
import sys, time
from cvmfs_snap.oci import ImageReference, RegistryClient
from publisher.backends.local import LocalBackend
from publisher.pipeline import Publisher

def main():
    ref, warm, root, conc, flat = sys.argv[1:6]
    host = ImageReference.parse(ref).registry
    with RegistryClient(insecure_registries=[host]) as client, \\
            Publisher(LocalBackend(root), client, concurrency=int(conc), skip_flat=flat != "1") as pub:
        assert pub.publish_image(warm).ok
        result = pub.publish_image(ref)
    print(result.seconds if result.ok else -1)

if __name__ == "__main__":
    main()
"""


def run_inner(ref: str, warm: str, root: Path, concurrency: int, flat: bool) -> float:
    proc = subprocess.run([sys.executable, "-c", _INNER, ref, warm, str(root), str(concurrency), "1" if flat else "0"],
                          cwd=ROOT, capture_output=True, check=False, text=True)
    try:
        secs = float(proc.stdout.split()[-1])
    except (ValueError, IndexError):
        secs = -1.0
    if secs < 0:
        print(f"in-process publish failed: {proc.stderr[-2000:]}", file=sys.stderr)
    return secs


def push_image(reg_url: str, work: Path, repo: str, layers: list[dict[str, object]], timeout: float = 600) -> None:
    """Push ``work/layer<i>.tar.gz`` (removed once uploaded) with a config and a manifest as ``repo:v1``."""
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [lay["diff_id"] for lay in layers]},
    }).encode()
    cfg_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": len(config)},
        "layers": [{k: lay[k] for k in ("mediaType", "digest", "size")} for lay in layers],
    }).encode()
    pusher = Pusher(reg_url)
    pusher.client.timeout = httpx.Timeout(timeout)
    try:
        for i, lay in enumerate(layers):
            pusher.upload(repo, str(lay["digest"]), work / f"layer{i}.tar.gz")
            (work / f"layer{i}.tar.gz").unlink()
        pusher.upload(repo, cfg_digest, config)
        pusher.manifest(repo, "v1", manifest, OCI_MANIFEST)
    finally:
        pusher.close()


def bench_image(label: str, ref: str, warm: str, work: Path, runs: int) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []

    def best(what: str, cmd: list[str], before: object = None) -> tuple[float, float, int, bool]:
        tries = []
        for _ in range(runs):
            if callable(before):
                before()
            os.sync()
            tries.append(run_child(cmd))
        secs, rss, _rc, cpu = min(tries, key=lambda t: t[0])
        ok = all(t[2] == 0 for t in tries)
        results.append({"image": label, "what": what, "seconds": round(secs, 2), "cpu_seconds": round(cpu, 1),
                        "peak_rss_mib": rss, "ok": ok})
        return secs, cpu, rss, ok

    root = work / "repo"

    def clean_root() -> None:
        remove_tree_quietly(root)

    def ours(what: str, *extra: str) -> None:
        best(what, [sys.executable, "-m", "publisher.cli", "convert-single-image", ref, "--root", str(root),
                    "--no-progress", "--log-level", "warning", *extra], clean_root)
        clean_root()

    ours("cvmfs-snap-publisher, 1 worker, layers only (--skip-flat)", "--concurrency", "1", "--skip-flat")
    ours("cvmfs-snap-publisher, 2 workers, layers only (--skip-flat)", "--concurrency", "2", "--skip-flat")
    ours("cvmfs-snap-publisher, 1 worker, layers + flat tree", "--concurrency", "1")
    ours("cvmfs-snap-publisher, 2 workers, layers + flat tree", "--concurrency", "2")
    for flat in (False, True):
        for conc in (1, 2):
            tries = []
            for _ in range(runs):
                clean_root()
                os.sync()
                tries.append(run_inner(ref, warm, root, conc, flat))
            clean_root()
            results.append({"image": label, "what": f"in-process (daemon), {conc} worker{'s' * (conc > 1)}, "
                            f"{'layers + flat tree' if flat else 'layers only'}", "seconds": round(min(tries), 2),
                            "cpu_seconds": "", "peak_rss_mib": "", "ok": min(tries) >= 0})

    oci = work / "oci"
    bundle = work / "bundle"
    s1, c1, r1, ok1 = best("skopeo copy (download to OCI layout)",
                           ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{oci}:v1"],
                           lambda: remove_tree_quietly(oci))
    s2, c2, r2, ok2 = best("umoci unpack (flat rootfs from the layout)",
                           ["umoci", "unpack", "--image", f"{oci}:v1", str(bundle)],
                           lambda: remove_tree_quietly(bundle))
    results.append({"image": label, "what": "skopeo copy + umoci unpack", "seconds": round(s1 + s2, 2),
                    "cpu_seconds": round(c1 + c2, 1), "peak_rss_mib": max(r1, r2), "ok": ok1 and ok2})
    remove_tree_quietly(oci)
    remove_tree_quietly(bundle)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", choices=["big", "files", "both"], default="both")
    ap.add_argument("--size-mib", type=int, default=1024, help="big image: uncompressed size (default 1024)")
    ap.add_argument("--files", type=int, default=SMALL_FILES, help=f"files image: files (default {SMALL_FILES})")
    ap.add_argument("--layers", type=int, default=4, help="layers per image (default 4)")
    ap.add_argument("--runs", type=int, default=1, help="runs per measurement, best wall time kept (default 1)")
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the temp dir goes (registry storage, repository, OCI layout, bundle); e.g. /dev/shm "
                         "to measure the programs rather than a shared disk's journal")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-publish-", dir=args.workdir))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, object]] = []
    try:
        with start_registry(work / "registry") as reg:
            images: list[tuple[str, str]] = []
            if args.image in ("big", "both"):
                t0 = time.monotonic()
                per = (args.size_mib << 20) // args.layers
                layers = [make_layer(work / f"layer{i}.tar.gz", i, per) for i in range(args.layers)]
                push_image(reg.url, work, "bench/big", layers)
                compressed = sum(int(str(lay["size"])) for lay in layers)
                print(f"image big: {args.size_mib} MiB uncompressed in {args.layers} layers, "
                      f"{compressed / 2**20:.0f} MiB gzip; generated and pushed in {time.monotonic() - t0:.1f}s")
                images.append((f"big ({args.size_mib} MiB)", reg.ref("bench/big", "v1")))
            if args.image in ("files", "both"):
                t0 = time.monotonic()
                per_layer = args.files // args.layers
                layers = [make_small_files_layer(work / f"layer{i}.tar.gz", i, per_layer) for i in range(args.layers)]
                push_image(reg.url, work, "bench/files", layers)
                unc = sum(int(str(lay["uncompressed"])) for lay in layers)
                print(f"image files: {per_layer * args.layers} files, {unc / 2**20:.0f} MiB tar in {args.layers} "
                      f"layers; generated and pushed in {time.monotonic() - t0:.1f}s")
                images.append((f"files ({per_layer * args.layers})", reg.ref("bench/files", "v1")))
            tiny = [make_small_files_layer(work / "layer0.tar.gz", 99, 10)]
            push_image(reg.url, work, "bench/warm-up", tiny)
            for label, ref in images:
                results += bench_image(label, ref, reg.ref("bench/warm-up", "v1"), work, args.runs)
    finally:
        if args.keep is None:
            remove_tree_quietly(work)
    width = max(len(str(r["what"])) for r in results)
    iw = max(len(str(r["image"])) for r in results)
    print(f"{'image':<{iw}}  {'what':<{width}}  {'seconds':>8}  {'CPU s':>6}  {'peak RSS MiB':>12}  ok")
    for r in results:
        print(f"{r['image']!s:<{iw}}  {r['what']!s:<{width}}  {r['seconds']!s:>8}  {r['cpu_seconds']!s:>6}  "
              f"{r['peak_rss_mib']!s:>12}  {r['ok']}")
    for label, _ref in images:
        sec = {str(r["what"]): float(str(r["seconds"])) for r in results if r["image"] == label}
        one = sec["cvmfs-snap-publisher, 1 worker, layers only (--skip-flat)"]
        two = sec["cvmfs-snap-publisher, 2 workers, layers only (--skip-flat)"]
        one_f = sec["cvmfs-snap-publisher, 1 worker, layers + flat tree"]
        two_f = sec["cvmfs-snap-publisher, 2 workers, layers + flat tree"]
        native = sec["skopeo copy + umoci unpack"]
        i1, i2 = sec["in-process (daemon), 1 worker, layers only"], sec["in-process (daemon), 2 workers, layers only"]
        i1f = sec["in-process (daemon), 1 worker, layers + flat tree"]
        i2f = sec["in-process (daemon), 2 workers, layers + flat tree"]
        print(f"{label}: second worker x{one / two:.2f} (layers only), x{one_f / two_f:.2f} (with flat); in-process "
              f"x{i1 / i2:.2f} (layers only), x{i1f / i2f:.2f} (with flat); skopeo+umoci / ours (2 workers, with "
              f"flat) x{native / two_f:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"(self: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB; {os.cpu_count()} CPUs)")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
