"""Publish-on-miss end to end with real processes on loopback: a docker-registry, the publisher daemon
(``python -m publisher.cli loop --backend local``) whose repository directory stands for ``/cvmfs/<repo>``, and a
node (``cvmfs-snap snapshotter`` + containerd) configured with ``publish-on-miss-url``.

Pulling an image the repository lacks downloads it and makes the node report it (once for the image, however many
layers missed); the daemon publishes it; a second pull in a namespace that has none of its snapshots is then served
from CVMFS without a single blob download, and a mounted view of it shows the image's files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from cvmfs_snap.layout import RepositoryLayout
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.containerd import start_containerd
from cvmfs_snap_devenv.procs import stop_process
from cvmfs_snap_devenv.registry import Registry, log_mark
from tests.support.e2e import (
    PLUGIN,
    REPO_NAME,
    blob_gets_after,
    cvmfs_snap_pull,
    mounted_view,
    write_config,
)
from tests.support.snapshotter_daemon import running_daemon
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.timeout(300)]

SECRET = "miss-e2e-shared-secret"


@dataclass
class PublisherDaemon:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def metric(self, name: str, labels: str) -> float:
        """A sample of the daemon's /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        m = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0


def _port_from_log(log: Path, pattern: str, proc: subprocess.Popen[bytes], what: str) -> int:
    found: list[int] = []

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            found.append(int(m.group(1)))
        return bool(found)

    wait_for(listening, f"{what} to log its listening address", timeout=60)
    return found[0]


@contextmanager
def publisher_daemon(tmp: Path, repo: Path, registry: Registry) -> Iterator[PublisherDaemon]:
    """``cvmfs-snap-publisher loop`` with an empty recipe, publish-on-miss allowed for ``<registry>/miss/*``."""
    (tmp / "recipes").mkdir(parents=True)
    recipe = tmp / "recipes" / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "input": []}))
    cfg = tmp / "publisher.yaml"
    cfg.write_text(yaml.safe_dump({
        "backend": "local", "root": str(repo), "repo": REPO_NAME, "state_dir": str(tmp / "state"),
        "skip_flat": True, "insecure_registries": [registry.host],
        "daemon": {"listen": "127.0.0.1:0", "poll_interval": 3600, "debounce": 0,
                   "publish_on_miss_allow": [f"{registry.host}/miss/*"]},
    }))
    log = tmp / "publisher.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "publisher.cli", "loop", str(recipe), "--config", str(cfg), "--log-level", "debug"],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "CVMFS_SNAP_WEBHOOK_SECRET": SECRET},
        )
    try:
        port = _port_from_log(log, r"listening on http://127\.0\.0\.1:(\d+)/", proc, "the publisher daemon")
        yield PublisherDaemon(proc, f"http://127.0.0.1:{port}", log)
    finally:
        stop_process(proc, timeout=60, group=False)


def test_unpublished_image_is_reported_published_and_then_served_from_cvmfs(fresh_registry: Registry,
                                                                           short_tmp: Path) -> None:
    registry = fresh_registry
    img = im.image([
        im.layer(["etc/", ("etc/motd", b"published on demand\n"), "data/", ("data/a", b"a" * 3000)]),
        im.layer(["data/", ("data/b", b"second layer\n"), ("data/.wh.a", b"")], codec="zstd"),
        im.layer(["opt/", ("opt/tool", b"#!/bin/sh\necho tool\n")]),
    ])
    im.push_image(registry.url, "miss/app", "v1", img)
    ref = registry.ref("miss/app", "v1")
    repo = short_tmp / "cvmfs"
    repo.mkdir()
    layout = RepositoryLayout(repo)
    secret_file = short_tmp / "miss-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)

    with publisher_daemon(short_tmp / "pub", repo, registry) as pub:
        node_dir = short_tmp / "n"
        node_dir.mkdir()
        cfg = write_config(node_dir / "snap.toml", repo, (
            "[cvmfs-snap]\n"
            'metrics-address = "127.0.0.1:0"\n'
            f'publish-on-miss-url = "{pub.url}/publish-on-miss"\n'
            f'publish-on-miss-secret-file = "{secret_file}"\n'
        ))
        with running_daemon(node_dir, "--config", str(cfg), "--log-level", "debug") as sp, \
                start_containerd(node_dir / "ctd", proxy_plugins={PLUGIN: str(sp.address)}) as cd:
            metrics_port = _port_from_log(sp.log, r"metrics on http://127\.0\.0\.1:(\d+)/metrics", sp.proc,
                                          "the snapshotter")

            def node_reports(outcome: str) -> float:
                text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
                m = re.search(rf'^cvmfs_snap_snapshotter_miss_reports_total{{outcome="{outcome}"}} ([0-9.]+)$',
                              text, re.M)
                return float(m.group(1)) if m else -1.0

            # 1. nothing published: the first layer is downloaded and the node reports the image. The publisher
            # may be done before the pull reaches the later layers, which are then already served from CVMFS.
            _, first = cvmfs_snap_pull(cd, ref, namespace="first")
            outcomes = [lay["outcome"] for lay in first["layers"]]
            assert outcomes[0] == "pulled" and set(outcomes) <= {"pulled", "remote"}, outcomes

            # 2. the publisher gets one report for the image (three layers missed) and publishes it
            wait_for(lambda: all(layout.is_layer_complete(lay.digest) for lay in img.layers),
                     f"the publisher to publish {ref} after the node's report\n--- publisher log ---\n"
                     f"{pub.log.read_text()[-3000:]}\n--- node log ---\n{sp.log.read_text()[-3000:]}", timeout=120)
            assert node_reports("sent") == 1
            assert node_reports("failed") == 0 and node_reports("dropped") == 0
            queued = 'outcome="queued"'
            assert pub.metric("cvmfs_snap_publisher_publish_on_miss_total", queued) == 1
            for other in ("duplicate", "rate-limited", "forbidden", "invalid"):
                assert pub.metric("cvmfs_snap_publisher_publish_on_miss_total", f'outcome="{other}"') == 0, other
            wait_for(lambda: any(s["image"] == ref and s["source"] == "publish-on-miss" and s["ok"]
                                 for s in httpx.get(f"{pub.url}/status", timeout=10).json()["images"]),
                     f"the publisher's status to show {ref} published on miss", timeout=60)
            assert SECRET not in sp.log.read_text()

            # 3. a namespace without any of its snapshots: everything is served from CVMFS, nothing downloaded
            mark = log_mark(registry.log)
            _, second = cvmfs_snap_pull(cd, ref, namespace="default")  # mounted_view works in "default"
            assert [lay["outcome"] for lay in second["layers"]] == ["remote"] * 3
            for lay in img.layers:
                assert blob_gets_after(registry.log, lay.digest, mark) == 0, f"{lay.digest} was downloaded again"
            with mounted_view(cd, PLUGIN, second["chainID"], "miss-e2e-view") as root:
                assert (root / "etc/motd").read_bytes() == b"published on demand\n"
                assert (root / "data/b").read_bytes() == b"second layer\n"
                assert not (root / "data/a").exists()  # the second layer's whiteout, served from CVMFS
                assert (root / "opt/tool").exists()
            # served, not missed: no new report
            assert node_reports("sent") == 1
            assert pub.metric("cvmfs_snap_publisher_publish_on_miss_total", queued) == 1
            assert "Traceback" not in sp.log.read_text()
