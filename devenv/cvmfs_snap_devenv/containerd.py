"""A private containerd 1.6 daemon on its own sockets and directories, started by the tests.

Proxy snapshotter plugins and CRI settings are passed in; the daemon is killed by PID at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .procs import stop_process, unmount_below

CONTAINERD_BIN = shutil.which("containerd") or "/usr/bin/containerd"
CTR_BIN = shutil.which("ctr") or "/usr/bin/ctr"


@dataclass
class Containerd:
    root: Path
    address: str  # unix socket path
    proc: subprocess.Popen[bytes]
    log: Path

    def ctr(self, *args: str, namespace: str = "default", check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this daemon."""
        return subprocess.run(
            [CTR_BIN, "--address", self.address, "--namespace", namespace, *args],
            capture_output=True, text=True, check=check, timeout=timeout,
        )


def containerd_config(root: Path, address: str, proxy_plugins: Mapping[str, str],
                      cri_snapshotter: str | None, insecure_registries: list[str]) -> str:
    lines = [
        "version = 2",
        f'root = "{root}/root"',
        f'state = "{root}/state"',
        "[grpc]",
        f'  address = "{address}"',
        "[ttrpc]",
        f'  address = "{address}.ttrpc"',
        "[debug]",
        f'  address = "{address}.debug"',
        '  level = "debug"',
        "[metrics]",
        '  address = ""',
    ]
    for name, sock in proxy_plugins.items():
        lines += [f'[proxy_plugins."{name}"]', '  type = "snapshot"', f'  address = "{sock}"']
    if cri_snapshotter is None:
        lines += ["disabled_plugins = []"]
        # CRI stays enabled with defaults but is not configured for us; keep it quiet.
    else:
        lines += [
            '[plugins."io.containerd.grpc.v1.cri"]',
            '  sandbox_image = "127.0.0.1:1/none:none"',
            '[plugins."io.containerd.grpc.v1.cri".containerd]',
            f'  snapshotter = "{cri_snapshotter}"',
            "  disable_snapshot_annotations = false",
            '[plugins."io.containerd.grpc.v1.cri".cni]',
            f'  bin_dir = "{root}/cni/bin"',
            f'  conf_dir = "{root}/cni/conf"',
        ]
        for host in insecure_registries:
            lines += [
                f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]',
                f'  endpoint = ["http://{host}"]',
            ]
    return "\n".join(lines) + "\n"


@contextmanager
def start_containerd(
    root: Path,
    proxy_plugins: Mapping[str, str] | None = None,
    cri_snapshotter: str | None = None,
    insecure_registries: list[str] | None = None,
) -> Iterator[Containerd]:
    """Start containerd with root/state/sockets under ``root`` (keep it short: socket paths are limited to 108
    bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    address = str(root / "c.sock")
    cfg = root / "config.toml"
    cfg.write_text(containerd_config(root, address, proxy_plugins or {}, cri_snapshotter, insecure_registries or []))
    log = root / "containerd.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen([CONTAINERD_BIN, "--config", str(cfg)], stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    cd = Containerd(root=root, address=address, proc=proc, log=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {log.read_text()[-3000:]}")
            if os.path.exists(address):
                r = cd.ctr("version", check=False, timeout=10)
                if r.returncode == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield cd
    finally:
        # stop running tasks' shims first, then the daemon
        try:
            for ns_line in cd.ctr("namespaces", "ls", "-q", check=False, timeout=20).stdout.split():
                tasks = cd.ctr("tasks", "ls", "-q", namespace=ns_line, check=False, timeout=20).stdout.split()
                for t in tasks:
                    cd.ctr("tasks", "kill", "-s", "SIGKILL", t, namespace=ns_line, check=False, timeout=20)
                    cd.ctr("tasks", "rm", "-f", t, namespace=ns_line, check=False, timeout=20)
        except Exception:
            pass
        stop_process(proc, timeout=15)
        unmount_below(root)
