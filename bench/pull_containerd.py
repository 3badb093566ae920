"""Time ``cvmfs-snap pull`` against containerd's own pull (``ctr images pull``, the Go ``rpull``) on a loopback
registry, with overlayfs (everything downloaded and unpacked) and with our snapshotter serving the published layers
from a CVMFS-laid-out directory (nothing downloaded).

    python bench/pull_containerd.py [--mib 64] [--layers 1] [--reps 3]

Prints one line per (method, snapshotter, repetition) with wall time and bytes fetched from the registry.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cvmfs_snap.containerd.pull import run_pull
from cvmfs_snap.fsutil import remove_tree_quietly
from cvmfs_snap.layout import RepositoryLayout
from cvmfs_snap_devenv.containerd import start_containerd
from cvmfs_snap_devenv.images import Pusher, image, layer
from cvmfs_snap_devenv.procs import unmount_below
from cvmfs_snap_devenv.registry import blob_gets, start_registry
from tests.support.runnable import busybox_layer, goref_bin
from tests.support.snapshotter_daemon import running_daemon


def registry_bytes(log: Path, since: int) -> int:
    """Sum of response sizes of blob GETs in the access log after byte offset ``since``."""
    return sum(g.size for g in blob_gets(log, since) if g.status == 200)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=1, help="data layers the --mib are split into")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="cs-bench-", dir="/tmp"))
    try:
        per = max(1, args.mib // args.layers)
        layers = [busybox_layer()] + [
            layer([f"data{n}/", *[(f"data{n}/r{i}", os.urandom(1 << 20)) for i in range(per)]])
            for n in range(args.layers)]
        img = image(layers)
        repo = d / "repo"
        lay = RepositoryLayout(repo)
        for bl in layers:
            fs = lay.layerfs(bl.digest)
            fs.mkdir(parents=True)
            with tarfile.open(fileobj=io.BytesIO(bl.tar)) as tf:
                tf.extractall(fs, filter="tar")
        cfg = d / "c.toml"
        cfg.write_text(f'absolute-mountpoint = "{repo}"\n')
        (d / "sn").mkdir()
        with start_registry(d / "reg") as reg, running_daemon(d / "sn", "--config", str(cfg)) as sp:
            Pusher(reg.url).image("bench/pull", "v1", img)
            ref = reg.ref("bench/pull", "v1")
            rpull = goref_bin("rpull")
            runs: list[tuple[str, str]] = [("cvmfs-snap pull", "overlayfs"), ("ctr images pull", "overlayfs"),
                                           ("cvmfs-snap pull", "cvmfs-snapshotter")]
            if rpull:
                runs += [("rpull", "overlayfs"), ("rpull", "cvmfs-snapshotter")]
            print(f"image: {len(layers)} layers, {sum(len(x.blob) for x in layers)} bytes compressed")
            n = 0
            for method, sn in runs:
                for rep in range(args.reps):
                    n += 1  # a fresh containerd each time: empty content store, nothing shared
                    with start_containerd(d / f"c{n}", proxy_plugins={"cvmfs-snapshotter": str(sp.address)}) as cd:
                        ns = f"bench{n}"
                        mark = reg.log.stat().st_size
                        t = time.monotonic()
                        if method == "cvmfs-snap pull":
                            run_pull(ref, address=cd.address, namespace=ns, snapshotter=sn)
                        elif method == "ctr images pull":
                            cd.ctr("images", "pull", "--plain-http", "--snapshotter", sn, ref, namespace=ns)
                        else:
                            assert rpull is not None
                            subprocess.run([rpull, "--address", cd.address, "--namespace", ns, "--snapshotter",
                                            sn, "--plain-http", ref], check=True, capture_output=True)
                        dt = time.monotonic() - t
                        time.sleep(0.2)  # let the registry flush its access log
                        print(f"{method:16} {sn:18} rep {rep}: {dt:6.3f}s  registry blob bytes "
                              f"{registry_bytes(reg.log, mark)}", flush=True)
    finally:
        unmount_below(d)
        remove_tree_quietly(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
