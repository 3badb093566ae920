#!/usr/bin/env python3
"""Benchmark: publishes and seconds for one N-layer image through a cvmfs backend into a REAL stratum-0.

Needs ``/usr/bin/cvmfs_server`` and a repository (``/work/shared/tools/real-cvmfs/setup.sh`` makes test.local and
tx.local). The image (N small layers of unique content, so every run publishes N new layers) is pushed to a
loopback docker-registry, then ``publisher.cli convert-single-image`` runs as a child with ``--code``'s copy of
cvmfs-snap on ``PYTHONPATH`` (compare two versions: ``--code /work/main``), through a shim ``cvmfs_server`` that
records every call. Reported: wall seconds of the convert, calls per command, publishes (``publish`` + ``ingest``).

    python bench/cvmfs_publish.py --repo test.local --backend cvmfs-ingest --layers 16
    python bench/cvmfs_publish.py --repo tx.local --backend cvmfs-transaction --layers 16 --code /work/main
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cvmfs_snap_devenv import images as im  # noqa: E402
from cvmfs_snap_devenv.registry import start_registry  # noqa: E402

REAL = "/usr/bin/cvmfs_server"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default="test.local")
    ap.add_argument("--backend", default="cvmfs-ingest", choices=["cvmfs-ingest", "cvmfs-transaction"])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--code", default=str(ROOT), help="cvmfs-snap checkout to measure (PYTHONPATH of the child)")
    args = ap.parse_args()
    if not Path(REAL).is_file():
        print(f"no real cvmfs_server ({REAL}); see /work/shared/tools/real-cvmfs", file=sys.stderr)
        return 2
    marker = uuid.uuid4().hex
    layers = [im.layer([f"d{i}/", (f"d{i}/f", f"{marker} {i}\n".encode() * 100)]) for i in range(args.layers)]
    img = im.image(layers)
    with tempfile.TemporaryDirectory(prefix="bench-cvmfs-") as tmp:
        work = Path(tmp)
        calls = work / "calls.log"
        shim = work / "cvmfs_server"
        shim.write_text(f'#!/bin/sh\nt0=$(date +%s.%N)\n{REAL} "$@"\nrc=$?\n'
                        f'echo "$1 $t0 $(date +%s.%N)" >> {calls}\nexit $rc\n')
        shim.chmod(0o755)
        with start_registry(work / "registry") as reg:
            name = f"bench/cvmfs-{marker[:8]}"
            im.push_image(reg.url, name, "v1", img)
            cmd = [sys.executable, "-m", "publisher.cli", "convert-single-image", reg.ref(name, "v1"),
                   "--backend", args.backend, "--repo", args.repo, "--cvmfs-server", str(shim),
                   "--state-dir", str(work / "state"), "--concurrency", str(args.concurrency)]
            env = {**os.environ, "PYTHONPATH": args.code}
            t0 = time.monotonic()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=args.code, check=False)
            seconds = time.monotonic() - t0
        counts: collections.Counter[str] = collections.Counter()
        spent: collections.Counter[str] = collections.Counter()
        for line in calls.read_text().splitlines() if calls.exists() else []:
            what, start, end = line.split()
            counts[what] += 1
            spent[what] += float(end) - float(start)
    result = {
        "code": args.code, "backend": args.backend, "repo": args.repo, "layers": args.layers,
        "concurrency": args.concurrency, "ok": proc.returncode == 0, "seconds": round(seconds, 1),
        "publishes": counts["publish"] + counts["ingest"], "calls": dict(counts),
        "seconds_in_cvmfs_server": {k: round(v, 1) for k, v in spent.items()},
    }
    print(json.dumps(result))
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
