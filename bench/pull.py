"""Pull with cvmfs-snap (image published in CVMFS) vs a native containerd pull (numbers only, no asserts).

    python bench/pull.py [--sizes 10M,100M,1G] [--layer-mib 128] [--keep-workdir]

For each size an image is built here (static busybox + data layers of about half-compressible data, ``--layer-mib``
per layer), pushed to a private ``docker-registry`` on loopback and published with
``cvmfs-snap-publisher convert-single-image --backend local`` into a directory standing for ``/cvmfs/<repo>``. Then,
each time on a fresh containerd:

* **cvmfs-snap**: ``cvmfs-snap pull`` through ``cvmfs-snap snapshotter`` (layers served from the repository);
* **native**: ``ctr images pull`` with containerd's own overlayfs snapshotter.

Measured: pull wall time, blob requests and bytes the registry served (its access log), the first
``ctr run --rm IMAGE /bin/true`` after the pull, and pull + first run ("time to first run"). The repository is a
local directory here, so the cvmfs-snap numbers leave out what a real CVMFS client adds (its cache misses, fetched on
demand while the container reads files); the registry bytes are what a node no longer downloads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cvmfs_snap.fsutil import remove_tree_quietly
from cvmfs_snap.progressbars import human_bytes as human
from cvmfs_snap.snapshotter.defaults import PROXY_PLUGIN
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.containerd import Containerd, start_containerd
from cvmfs_snap_devenv.registry import Registry, blob_gets, start_registry
from tests.support.snapshotter_daemon import running_daemon

PLUGIN = PROXY_PLUGIN
MiB = 1 << 20


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def build_image(size: int, layer_bytes: int, seed: int) -> im.BuiltImage:
    """busybox + data layers adding up to ``size`` bytes of files (8 MiB each; half random, half zeros)."""
    rnd = random.Random(seed)
    layers = [im.busybox_layer()]
    left, n = size, 0
    while left > 0:
        this = min(left, layer_bytes)
        entries: list[im.Entry | tuple[str, bytes] | str] = ["data/"]
        done = 0
        while done < this:
            f = min(8 * MiB, this - done)
            entries.append((f"data/l{len(layers)}-f{n:04d}", rnd.randbytes(f // 2) + bytes(f - f // 2)))
            done += f
            n += 1
        layers.append(im.layer(entries))
        left -= this
    return im.image(layers, cmd=("/bin/sh",))


def blob_stats(log: Path, mark: int) -> tuple[int, int]:
    """(requests, bytes) of blob GETs in a docker-registry access log after byte offset ``mark``."""
    gets = blob_gets(log, mark)
    return len(gets), sum(g.size for g in gets)


def run(cmd: list[str], what: str, timeout: float = 3600) -> float:
    return run_out(cmd, what, timeout)[0]


def run_out(cmd: list[str], what: str, timeout: float = 3600) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        sys.exit(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t, r.stdout


@dataclass
class Result:
    size: int
    how: str
    pull: float
    pull_inner: float | None  # the pull itself, without the CLI's start-up (cvmfs-snap pull --json "seconds")
    requests: int
    fetched: int
    first_run: float


def ctr(cd: Containerd, *args: str) -> list[str]:
    from cvmfs_snap_devenv.containerd import CTR_BIN

    return [CTR_BIN, "--address", cd.address, "--namespace", "default", *args]


def measure_ours(work: Path, reg: Registry, repo: Path, ref: str, size: int) -> Result:
    snap = work / "snap"
    snap.mkdir()
    cfg = snap / "c.toml"
    cfg.write_text(f'absolute-mountpoint = "{repo}"\n')
    with running_daemon(snap, "--config", str(cfg), "--log-level", "warn", address=snap / "s.sock") as sp, \
            start_containerd(work / "ctd", proxy_plugins={PLUGIN: str(sp.address)}) as cd:
        mark = reg.log.stat().st_size
        t_pull, out = run_out([sys.executable, "-m", "cvmfs_snap.cli", "pull", "--address", cd.address,
                               "--snapshotter", PLUGIN, "--plain-http", "--json", ref], "cvmfs-snap pull")
        inner = float(json.loads(out)["seconds"])
        requests, fetched = blob_stats(reg.log, mark)
        t_run = run(ctr(cd, "run", "--rm", "--snapshotter", PLUGIN, ref, "bench-ours", "/bin/true"),
                    "ctr run (cvmfs-snap)")
    return Result(size, "cvmfs-snap (published)", t_pull, inner, requests, fetched, t_run)


def measure_native(work: Path, reg: Registry, ref: str, size: int) -> Result:
    with start_containerd(work / "nat") as cd:
        mark = reg.log.stat().st_size
        t_pull = run(ctr(cd, "images", "pull", "--plain-http", ref), "ctr images pull")
        requests, fetched = blob_stats(reg.log, mark)
        t_run = run(ctr(cd, "run", "--rm", ref, "bench-native", "/bin/true"), "ctr run (native)")
    return Result(size, "native containerd", t_pull, None, requests, fetched, t_run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10M,100M,1G", help="image data sizes, comma separated (default %(default)s)")
    ap.add_argument("--layer-mib", type=int, default=128, help="data per layer in MiB (default %(default)s)")
    ap.add_argument("--keep-workdir", action="store_true", help="do not delete the working directory")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (containerd, runc, overlay mounts)")
    sizes = [parse_size(s) for s in a.sizes.split(",") if s.strip()]
    results: list[Result] = []
    publish_times: dict[int, float] = {}
    compressed: dict[int, int] = {}
    with ExitStack() as stack:
        base = Path(tempfile.mkdtemp(prefix="cs-bpull-", dir="/tmp"))
        if not a.keep_workdir:
            stack.callback(remove_tree_quietly, base)
        reg = stack.enter_context(start_registry(base / "registry"))
        for i, size in enumerate(sizes):
            work = base / f"s{i}"
            work.mkdir()
            print(f"[bench] {human(size)}: building and pushing the image", file=sys.stderr)
            img = build_image(size, a.layer_mib * MiB, seed=i)
            name = f"bench/pull-{i}"
            im.push_image(reg.url, name, "v1", img)
            ref = reg.ref(name, "v1")
            compressed[size] = sum(len(lay.blob) for lay in img.layers)
            del img
            repo = work / "cvmfs"
            print(f"[bench] {human(size)}: publishing", file=sys.stderr)
            publish_times[size] = run([sys.executable, "-m", "publisher.cli", "convert-single-image", "--backend",
                                       "local", "--root", str(repo), "--insecure-registry", reg.host, "--skip-flat",
                                       "--no-progress", ref], "publishing")
            print(f"[bench] {human(size)}: pulling", file=sys.stderr)
            results.append(measure_ours(work, reg, repo, ref, size))
            results.append(measure_native(work, reg, ref, size))
            remove_tree_quietly(work)

    print(f"\npull benchmark ({os.cpu_count()} CPUs, registry and repository on loopback/local disk)")
    print(f"{'image data':>10} {'compressed':>11} {'how':<24} {'pull s':>7} {'(inner)':>7} {'blob GETs':>9} "
          f"{'fetched':>11} {'1st run s':>9} {'to 1st run s':>12}")
    for r in results:
        inner = f"{r.pull_inner:.2f}" if r.pull_inner is not None else "-"
        print(f"{human(r.size):>10} {human(compressed[r.size]):>11} {r.how:<24} {r.pull:>7.2f} {inner:>7} "
              f"{r.requests:>9} {human(r.fetched):>11} {r.first_run:>9.2f} {r.pull + r.first_run:>12.2f}")
    print("(inner: the pull itself as cvmfs-snap pull reports it, without the Python CLI's start-up)")
    print("\npublish (convert-single-image --backend local --skip-flat), not part of the node's pull:")
    for size, t in publish_times.items():
        print(f"{human(size):>10} {t:>7.2f} s")


if __name__ == "__main__":
    main()
