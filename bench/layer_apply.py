#!/usr/bin/env python3
"""Benchmark: our apply_layer against GNU ``tar -x`` and ``umoci unpack`` on the same generated layer.

    python bench/layer_apply.py [--size-mib 200] [--files 5000] [--codec gzip|plain] [--runs 1]

The layer is made here (no download): ``--files`` regular files in nested directories whose sizes add up to
``--size-mib``, half random and half compressible content, plus some symlinks and hardlinks. Each tool unpacks it
into a fresh directory on the same filesystem; the page cache is warm for all (the blob is read once first). Prints
wall-clock seconds and the ratio to GNU tar. umoci also writes an mtree manifest of the whole rootfs, which is part
of its cost.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cvmfs_snap.fsutil import remove_tree_quietly
from cvmfs_snap.layer import apply_layer, open_layer
from cvmfs_snap.mediatypes import OCI_CONFIG, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_MANIFEST

MEDIA = {"gzip": OCI_LAYER_GZIP, "plain": OCI_LAYER_TAR}


def make_layer(path: Path, size: int, files: int, seed: int = 1) -> bytes:
    """Write an uncompressed layer tar to ``path`` and return its sha256 hex (the diffID)."""
    rnd = random.Random(seed)
    weights = [rnd.paretovariate(1.2) for _ in range(files)]
    total = sum(weights)
    sizes = [max(0, int(size * w / total)) for w in weights]
    h = hashlib.sha256()
    text = (b"lorem ipsum dolor sit amet, consectetur adipiscing elit " * 4096)
    with open(path, "wb") as raw:
        class Tee(io.RawIOBase):
            def writable(self) -> bool:
                return True

            def write(self, b) -> int:  # type: ignore[no-untyped-def]
                h.update(b)
                return raw.write(b)

        with tarfile.open(fileobj=Tee(), mode="w|", format=tarfile.PAX_FORMAT) as tf:
            dirs = set()
            per_dir = max(1, files // 400)  # grouped by directory, as tar writers walking a tree emit them
            for i, sz in enumerate(sizes):
                d = f"usr/share/d{i // (per_dir * 7)}/s{(i // per_dir) % 7}"
                for k in range(1, d.count("/") + 2):
                    sub = "/".join(d.split("/")[:k])
                    if sub not in dirs:
                        dirs.add(sub)
                        ti = tarfile.TarInfo(sub)
                        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                        tf.addfile(ti)
                ti = tarfile.TarInfo(f"{d}/file{i}")
                ti.size, ti.mode, ti.mtime = sz, 0o644, 1_700_000_000
                data = os.urandom(sz // 2) + (text * (sz // len(text) + 1))[: sz - sz // 2]
                tf.addfile(ti, io.BytesIO(data))
                if i % 50 == 0:
                    ln = tarfile.TarInfo(f"{d}/link{i}")
                    ln.type, ln.linkname = tarfile.SYMTYPE, f"file{i}"
                    tf.addfile(ln)
                if i % 70 == 0:
                    hl = tarfile.TarInfo(f"{d}/hard{i}")
                    hl.type, hl.linkname = tarfile.LNKTYPE, f"{d}/file{i}"
                    tf.addfile(hl)
    return h.digest()


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=200)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--codec", choices=sorted(MEDIA), default="gzip")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where to unpack (default: a temp dir under /tmp)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cs-bench-", dir=args.workdir))
    try:
        tar_path = work / "layer.tar"
        t = timed(lambda: make_layer(tar_path, args.size_mib << 20, args.files))
        print(f"generated {tar_path.stat().st_size >> 20} MiB tar with {args.files} files in {t:.1f}s")
        blob_path = tar_path
        if args.codec == "gzip":
            blob_path = work / "layer.tar.gz"
            with open(tar_path, "rb") as src, open(blob_path, "wb") as f, \
                    gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1, mtime=0) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        blob = blob_path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()

        # OCI layout for umoci
        oci = work / "oci"
        (oci / "blobs/sha256").mkdir(parents=True)
        (oci / "blobs/sha256" / digest).write_bytes(blob)
        diff_id = "sha256:" + hashlib.sha256(tar_path.read_bytes()).hexdigest()
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG,
                       "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
            "layers": [{"mediaType": MEDIA[args.codec], "digest": "sha256:" + digest, "size": len(blob)}],
        }).encode()
        for b in (config, manifest):
            (oci / "blobs/sha256" / hashlib.sha256(b).hexdigest()).write_bytes(b)
        (oci / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (oci / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(), "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}))
        del blob

        results: dict[str, list[float]] = {"cvmfs-snap apply_layer": [], "GNU tar -x": [], "umoci unpack": []}
        for run in range(args.runs):
            out = work / f"ours{run}"
            out.mkdir()

            def ours(out: Path = out) -> None:
                with open(blob_path, "rb") as raw, open_layer(raw, MEDIA[args.codec]) as s:
                    res = apply_layer(s, out)
                assert res.diff_id == diff_id, (res.diff_id, diff_id)

            results["cvmfs-snap apply_layer"].append(timed(ours))
            out = work / f"tar{run}"
            out.mkdir()
            cmd = ["tar", "-x", "--same-owner", "--xattrs", "-f", str(blob_path), "-C", str(out)]
            if args.codec == "gzip":
                cmd.insert(2, "-z")
            results["GNU tar -x"].append(timed(lambda cmd=cmd: subprocess.run(cmd, check=True)))
            if shutil.which("umoci"):
                bundle = work / f"umoci{run}"
                results["umoci unpack"].append(timed(lambda bundle=bundle: subprocess.run(
                    ["umoci", "unpack", "--image", f"{oci}:bench", str(bundle)], check=True,
                    stdout=subprocess.DEVNULL)))
            for d in (work / f"ours{run}", work / f"tar{run}", work / f"umoci{run}"):
                remove_tree_quietly(d)
        best = {k: min(v) for k, v in results.items() if v}
        ref = best["GNU tar -x"]
        print(f"layer: {args.size_mib} MiB, {args.files} files, codec {args.codec}, best of {args.runs}")
        for k, v in best.items():
            print(f"  {k:24s} {v:7.2f}s   x{v / ref:5.2f} of GNU tar")
    finally:
        remove_tree_quietly(work)


if __name__ == "__main__":
    main()
