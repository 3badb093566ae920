#!/usr/bin/env python3
"""Benchmark: publishing a generated image (default 1 GiB uncompressed) with cvmfs-snap-publisher vs
``skopeo copy`` + ``umoci unpack`` of the same image, 1 vs 2 workers, with the peak memory of each child.

Everything runs on loopback: a private docker-registry, the image generated here (files of half random, half
repetitive data, gzip level 1, streamed to disk and pushed in one upload per blob so the generator's own memory stays
small). Each measured command runs as a child; wall time and its ``ru_maxrss`` (from ``wait4``) are reported.

    python bench/publish.py                 # 1 GiB in 4 layers
    python bench/publish.py --size-mib 256 --layers 2 --keep /tmp/bench
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
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

from cvmfs_snap.devenv.images import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Pusher  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402

FILE_SIZE = 8 << 20


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


#: a small launcher: fork+exec the command and report its ru_maxrss. Measuring from here directly would be wrong:
#: a child's high-water mark starts at the size of the process that forked it (this one holds the registry client).
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, ru = os.wait4(pid, 0)
print(ru.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run_child(cmd: list[str], cwd: Path = ROOT) -> tuple[float, int, int]:
    """(seconds, peak RSS in MiB, exit status) of one child."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=cwd, capture_output=True, check=False)
    secs = time.monotonic() - t0
    try:
        maxrss_kib, rc = (int(x) for x in proc.stdout.split())
    except ValueError:
        maxrss_kib, rc = 0, proc.returncode or 1
    if rc != 0:
        print(f"command failed ({rc}): {' '.join(cmd)}\n{proc.stderr.decode(errors='replace')[-2000:]}",
              file=sys.stderr)
    return secs, maxrss_kib // 1024, rc


def drop_caches_hint() -> None:
    os.sync()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="uncompressed image size (default 1024)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-publish-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, object]] = []
    try:
        with start_registry(work / "registry") as reg:
            t0 = time.monotonic()
            per = (args.size_mib << 20) // args.layers
            layers = [make_layer(work / f"layer{i}.tar.gz", i, per) for i in range(args.layers)]
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
            pusher = Pusher(reg.url)
            pusher.client.timeout = httpx.Timeout(600)
            try:
                for i, lay in enumerate(layers):
                    pusher.upload("bench/big", str(lay["digest"]), work / f"layer{i}.tar.gz")
                pusher.upload("bench/big", cfg_digest, config)
                pusher.manifest("bench/big", "v1", manifest, OCI_MANIFEST)
            finally:
                pusher.close()
            for i in range(args.layers):
                (work / f"layer{i}.tar.gz").unlink()
            compressed = sum(int(str(lay["size"])) for lay in layers)
            print(f"image: {args.size_mib} MiB uncompressed in {args.layers} layers, "
                  f"{compressed / 2**20:.0f} MiB gzip; generated and pushed in {time.monotonic() - t0:.1f}s")
            ref = reg.ref("bench/big", "v1")

            def ours(label: str, *extra: str) -> None:
                root = work / "repo"
                shutil.rmtree(root, ignore_errors=True)
                drop_caches_hint()
                secs, rss, rc = run_child([sys.executable, "-m", "publisher.cli", "convert-single-image", ref,
                                           "--root", str(root), "--no-progress", "--log-level", "warning", *extra])
                results.append({"what": label, "seconds": round(secs, 1), "peak_rss_mib": rss, "ok": rc == 0})
                shutil.rmtree(root, ignore_errors=True)

            ours("cvmfs-snap-publisher, 1 worker, layers only (--skip-flat)", "--concurrency", "1", "--skip-flat")
            ours("cvmfs-snap-publisher, 2 workers, layers only (--skip-flat)", "--concurrency", "2", "--skip-flat")
            ours("cvmfs-snap-publisher, 1 worker, layers + flat tree", "--concurrency", "1")
            ours("cvmfs-snap-publisher, 2 workers, layers + flat tree", "--concurrency", "2")

            oci = work / "oci"
            bundle = work / "bundle"
            shutil.rmtree(oci, ignore_errors=True)
            drop_caches_hint()
            s1, r1, rc1 = run_child(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{oci}:v1"])
            results.append({"what": "skopeo copy (download to OCI layout)", "seconds": round(s1, 1),
                            "peak_rss_mib": r1, "ok": rc1 == 0})
            s2, r2, rc2 = run_child(["umoci", "unpack", "--image", f"{oci}:v1", str(bundle)])
            results.append({"what": "umoci unpack (flat rootfs from the layout)", "seconds": round(s2, 1),
                            "peak_rss_mib": r2, "ok": rc2 == 0})
            results.append({"what": "skopeo copy + umoci unpack", "seconds": round(s1 + s2, 1),
                            "peak_rss_mib": max(r1, r2), "ok": rc1 == 0 and rc2 == 0})
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    width = max(len(str(r["what"])) for r in results)
    print(f"{'what':<{width}}  {'seconds':>8}  {'peak RSS MiB':>12}  ok")
    for r in results:
        print(f"{r['what']!s:<{width}}  {r['seconds']!s:>8}  {r['peak_rss_mib']!s:>12}  {r['ok']}")
    print(f"(self: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB; {os.cpu_count()} CPUs)")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
