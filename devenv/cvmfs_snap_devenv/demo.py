"""``cvmfs-snap demo``: the whole data path end to end on an embedded default.

1. build a sample multi-layer image (static busybox, a data layer, a layer that deletes and re-creates files),
2. push it to a local ``docker-registry`` on loopback,
3. publish it with ``cvmfs-snap-publisher convert-single-image --backend local`` into a local directory that stands for
   ``/cvmfs/<repo>``,
4. start a private containerd and ``cvmfs-snap snapshotter`` on private sockets,
5. ``cvmfs-snap pull`` the image (published layers are not downloaded) and run it with runc (``ctr run``),
6. pull the same image natively (containerd's overlayfs snapshotter, second private containerd) and compare,
7. clean up everything it started (by PID) and mounted.

Everything runs as real processes of the real tools; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from cvmfs_snap.errors import CommandError, UnavailableError
from cvmfs_snap.fsutil import remove_tree_quietly
from cvmfs_snap.snapshotter.defaults import PROXY_PLUGIN

from . import images as im
from .containerd import Containerd, start_containerd
from .procs import stop_process
from .registry import Registry, blob_gets, log_mark, start_registry

log = logging.getLogger(__name__)

REPO = "demo.cern.ch"
IMAGE_REPO = "cvmfs-snap/demo"
IMAGE_TAG = "v1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-mib", type=int, default=64, help="size of the sample image's data layer (default 64)")
    p.add_argument("--workdir", help="keep everything in this directory instead of a temporary one")
    p.add_argument("--keep", action="store_true", help="do not clean up (inspect the trees afterwards)")
    p.add_argument("--log-level", default="warning", help="log level of this command (default warning)")


def build_image(data_mib: int) -> im.BuiltImage:
    rnd = random.Random(42)
    base = im.busybox_layer()
    files = max(1, data_mib)
    data = im.layer(
        [im.Entry("data", type="dir"), im.Entry("etc/demo", type="dir")]
        + [im.Entry(f"data/blob{i:03d}", data=rnd.randbytes(1024 * 1024)) for i in range(files)]
        + [im.Entry("etc/demo/deleted-later", data=b"you must not see this\n"),
           im.Entry("etc/demo/old-dir", type="dir"), im.Entry("etc/demo/old-dir/stale", data=b"stale\n")]
    )
    top = im.layer(
        [
            im.Entry("etc", type="dir"),
            im.Entry("etc/demo", type="dir"),
            im.Entry("etc/demo/.wh.deleted-later"),
            im.Entry("etc/demo/old-dir", type="dir"),
            im.Entry("etc/demo/old-dir/.wh..wh..opq"),
            im.Entry("etc/demo/old-dir/fresh", data=b"fresh\n"),
            im.Entry("etc/demo/message", data=b"hello from a layer served by CVMFS\n"),
        ],
        codec="zstd",
    )
    return im.image([base, data, top], cmd=["/bin/sh"])


def _run(cmd: list[str], what: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise CommandError(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stderr.strip()[-3000:]}")
    return r


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], logfile: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise UnavailableError(f"snapshotter exited early: {logfile.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise UnavailableError(f"snapshotter socket {path} did not appear: {logfile.read_text()[-3000:]}")
        time.sleep(0.05)


def _blob_gets(reg: Registry, since: int) -> tuple[int, int]:
    """(count, bytes) of blob GETs in the registry's access log after byte offset ``since``."""
    gets = blob_gets(reg.log, since)
    return len(gets), sum(g.size for g in gets)


def main(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(getattr(logging, str(args.log_level).upper(), logging.WARNING))
    if os.geteuid() != 0:
        print("cvmfs-snap demo must run as root (containerd, runc and overlay mounts)", file=sys.stderr)
        return 2
    py = sys.executable
    with ExitStack() as stack:
        if args.workdir:
            work = Path(args.workdir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(tempfile.mkdtemp(prefix="csd-", dir="/tmp"))
            if not args.keep:
                stack.callback(remove_tree_quietly, work)
        print(f"[demo] working in {work}")

        reg = stack.enter_context(start_registry(work / "registry"))
        img = build_image(args.data_mib)
        im.push_image(reg.url, IMAGE_REPO, IMAGE_TAG, img)
        ref = reg.ref(IMAGE_REPO, IMAGE_TAG)
        total = sum(len(lay.blob) for lay in img.layers)
        print(f"[demo] built and pushed {ref}: {len(img.layers)} layers, {total / 2**20:.1f} MiB compressed")

        cvmfs_root = work / "cvmfs" / REPO
        t0 = time.monotonic()
        _run([py, "-m", "publisher.cli", "convert-single-image", "--backend", "local", "--root", str(cvmfs_root),
              "--repo", REPO, ref], "publishing")
        print(f"[demo] published into {cvmfs_root} (stands for /cvmfs/{REPO}) in {time.monotonic() - t0:.2f}s")

        snap_dir = work / "snap"
        snap_dir.mkdir(exist_ok=True)
        sock = snap_dir / "snap.sock"
        cfg = snap_dir / "config.toml"
        cfg.write_text(f'repository = "{REPO}"\nabsolute-mountpoint = "{cvmfs_root}"\n')
        snap_log = snap_dir / "snapshotter.log"
        with open(snap_log, "ab") as lf:
            snap = subprocess.Popen(
                [py, "-m", "cvmfs_snap.cli", "snapshotter", "--config", str(cfg), "--address", str(sock),
                 "--root", str(snap_dir / "root"), "--log-level", "info"],
                stdout=lf, stderr=subprocess.STDOUT, start_new_session=True,
            )

        stack.callback(stop_process, snap, timeout=15)
        _wait_socket(sock, snap, snap_log)

        ctd: Containerd = stack.enter_context(
            start_containerd(work / "ctd", proxy_plugins={PROXY_PLUGIN: str(sock)}))
        native: Containerd = stack.enter_context(start_containerd(work / "nat"))

        mark = log_mark(reg.log)
        t0 = time.monotonic()
        _run([py, "-m", "cvmfs_snap.cli", "pull", "--address", ctd.address, "--snapshotter", PROXY_PLUGIN,
              ref], "cvmfs-snap pull")
        t_cvmfs = time.monotonic() - t0
        n_cvmfs, b_cvmfs = _blob_gets(reg, mark)

        script = ("cat /etc/demo/message; ls /data | wc -l; "
                  "test ! -e /etc/demo/deleted-later && echo 'deleted file: gone'; "
                  "ls /etc/demo/old-dir")
        out = ctd.ctr("run", "--rm", "--snapshotter", PROXY_PLUGIN, ref, "demo-cvmfs", "/bin/sh", "-c",
                      script).stdout
        print("[demo] container on CVMFS layers says:")
        for line in out.strip().splitlines():
            print(f"         {line}")

        mark = log_mark(reg.log)
        t0 = time.monotonic()
        native.ctr("images", "pull", "--plain-http", ref)
        t_native = time.monotonic() - t0
        n_native, b_native = _blob_gets(reg, mark)
        out_native = native.ctr("run", "--rm", ref, "demo-native", "/bin/sh", "-c", script).stdout
        same = out_native == out

        print(f"[demo] pull with cvmfs-snap:        {t_cvmfs:6.2f}s, {n_cvmfs} blobs / {b_cvmfs / 2**20:.2f} MiB "
              "from the registry")
        print(f"[demo] native containerd pull:      {t_native:6.2f}s, {n_native} blobs / {b_native / 2**20:.2f} MiB "
              "from the registry")
        print(f"[demo] container output identical to the native pull: {'yes' if same else 'NO'}")
        if not same:
            print(out_native)
            return 1
        if args.keep:
            print(f"[demo] kept {work}; services stopped")
    return 0
