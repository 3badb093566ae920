"""Start-up and exit cost of ``cvmfs-snap pull`` for a small published image (numbers only, no asserts).

    python bench/pull_startup.py [--mib 10] [--reps 7]

Goal (issue 7 item 18): the whole ``cvmfs-snap pull --json`` command, process start to exit, under 0.25 s for a
published 10 MiB image on the 2-core development VM, so that it beats a native ``ctr images pull`` at every size.

An image of ``--mib`` MiB is built, pushed to a loopback ``docker-registry`` and published with the local backend
(as ``bench/pull.py`` does); one ``cvmfs-snap snapshotter`` and one containerd serve every repetition. Each
repetition pulls into a fresh containerd namespace, so every pull takes the whole path (resolve, content writes,
Prepare -> AlreadyExists per layer, image record). Measured per repetition, as the process runs it:

* ``python -c pass``: the interpreter alone (the floor);
* ``pull --help``: the interpreter plus the pull's imports;
* ``pull``: the whole command (wall), and the pull itself as it reports it (``seconds`` in its JSON);
* ``ctr images pull``: containerd's own pull of the same image into a fresh namespace (overlayfs).

Best and median of ``--reps`` are printed; CPU time (user+sys) too, which load on a shared machine disturbs less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pull import PLUGIN, build_image, ctr, run
from cvmfs_snap.fsutil import remove_tree_quietly
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.containerd import start_containerd
from cvmfs_snap_devenv.registry import start_registry
from tests.support.snapshotter_daemon import running_daemon

MiB = 1 << 20


def timed(cmd: list[str], what: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=10, help="image data in MiB (default %(default)s)")
    ap.add_argument("--reps", type=int, default=7, help="repetitions (default %(default)s)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (containerd, runc, overlay mounts)")
    py = sys.executable
    rows: dict[str, list[tuple[float, float]]] = {}
    inner: list[float] = []
    with ExitStack() as stack:
        base = Path(tempfile.mkdtemp(prefix="cs-bstart-", dir="/tmp"))
        stack.callback(remove_tree_quietly, base)
        reg = stack.enter_context(start_registry(base / "registry"))
        img = build_image(a.mib * MiB, 128 * MiB, seed=1)
        im.push_image(reg.url, "bench/startup", "v1", img)
        ref = reg.ref("bench/startup", "v1")
        repo = base / "cvmfs"
        run([py, "-m", "publisher.cli", "convert-single-image", "--backend", "local", "--root", str(repo),
             "--insecure-registry", reg.host, "--skip-flat", "--no-progress", ref], "publishing")
        snap = base / "snap"
        snap.mkdir()
        (snap / "c.toml").write_text(f'absolute-mountpoint = "{repo}"\n')
        sp = stack.enter_context(running_daemon(snap, "--config", str(snap / "c.toml"), "--log-level", "warn",
                                                address=snap / "s.sock"))
        cd = stack.enter_context(start_containerd(base / "ctd", proxy_plugins={PLUGIN: str(sp.address)}))
        pull = [py, "-m", "cvmfs_snap.cli", "pull", "--address", cd.address, "--snapshotter", PLUGIN, "--json"]
        for i in range(a.reps):
            rows.setdefault("python -c pass", []).append(timed([py, "-c", "pass"], "python")[:2])
            rows.setdefault("cvmfs-snap pull --help", []).append(timed([*pull, "--help"], "pull --help")[:2])
            wall, cpu, out = timed([*pull, "--namespace", f"bench{i}", ref], "cvmfs-snap pull")
            rows.setdefault("cvmfs-snap pull (whole command)", []).append((wall, cpu))
            inner.append(float(json.loads(out)["seconds"]))
            nat = ctr(cd, "images", "pull", "--plain-http", ref)
            nat[nat.index("--namespace") + 1] = f"native{i}"
            rows.setdefault("ctr images pull (native)", []).append(timed(nat, "ctr images pull")[:2])

    print(f"\ncvmfs-snap pull start-up, {a.mib} MiB published image, {a.reps} reps, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'':34} {'wall best':>9} {'median':>7} {'cpu best':>9} {'median':>7}")
    for name, vals in rows.items():
        walls, cpus = [v[0] for v in vals], [v[1] for v in vals]
        print(f"{name:34} {min(walls):>9.3f} {statistics.median(walls):>7.3f} {min(cpus):>9.3f} "
              f"{statistics.median(cpus):>7.3f}")
    print(f"{'  of which the pull itself':34} {min(inner):>9.3f} {statistics.median(inner):>7.3f}")
    print("goal: whole command < 0.25 s wall")


if __name__ == "__main__":
    main()
