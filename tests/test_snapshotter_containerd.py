"""Our snapshotter daemon as a proxy plugin of a real containerd 1.6: ``ctr images pull`` + ``ctr run`` with local
layers, and ``cvmfs-snap pull`` with layers served from a CVMFS-laid-out repository directory (no blob download)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cvmfs_snap.layout import LayerRecord, RepositoryLayout
from cvmfs_snap_devenv.containerd import start_containerd
from cvmfs_snap_devenv.images import BuiltLayer
from cvmfs_snap_devenv.registry import Registry
from tests.support.e2e import PLUGIN, snapshotter_status
from tests.support.pullcheck import blob_gets
from tests.support.runnable import push_runnable, require_busybox
from tests.support.snapshotter_daemon import running_daemon
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]



def test_ctr_pull_and_run_with_local_layers(registry: Registry, short_tmp: Path) -> None:
    require_busybox()
    p = push_runnable(registry.url, registry.host, "snap/local", extra=2)
    (short_tmp / "repo").mkdir()
    cfg = short_tmp / "c.toml"
    cfg.write_text(f'absolute-mountpoint = "{short_tmp}/repo"\n')
    with running_daemon(short_tmp, "--config", str(cfg), "--log-level", "debug") as sp, \
            start_containerd(short_tmp / "ctd", proxy_plugins={PLUGIN: str(sp.address)}) as cd:
        cd.ctr("images", "pull", "--plain-http", "--snapshotter", PLUGIN, p.ref)
        r = cd.ctr("run", "--rm", "--snapshotter", PLUGIN, p.ref, "snap-local-1", "/bin/cat", "/data/file1",
                   "/etc/hostname", check=False)
        assert r.returncode == 0, r.stderr + sp.log.read_text()[-3000:]
        assert r.stdout.startswith("content 1 of snap/local\n") and r.stdout.endswith("cvmfs-snap-test\n")
        # the container wrote into its upper dir; a second container sees the image as it was
        r = cd.ctr("run", "--rm", "--snapshotter", PLUGIN, p.ref, "snap-local-2", "/bin/sh", "-c",
                   "echo changed > /data/file0 && cat /data/file0", check=False)
        assert r.returncode == 0 and r.stdout == "changed\n", r.stderr
        r = cd.ctr("run", "--rm", "--snapshotter", PLUGIN, p.ref, "snap-local-3", "/bin/sh", "-c",
                   "cat /data/file0 | wc -l", check=False)
        assert r.returncode == 0 and r.stdout.strip() == "50", r.stderr

        def snaps() -> list[dict[str, object]]:
            found = snapshotter_status(sp.root)["snapshots"]
            assert isinstance(found, list)
            return found

        committed = [s for s in snaps() if s["kind"] == "committed"]
        assert len(committed) == 3 and all(s["source"] == "local" for s in committed)
        # containerd removes the containers' active snapshots after --rm, asynchronously (its garbage collector)
        wait_for(lambda: not [s for s in snaps() if s["kind"] == "active"], "containerd to remove active snapshots")
        assert "Traceback" not in sp.log.read_text()


def publish_layers(repo: Path, layers: list[BuiltLayer]) -> None:
    """Lay layers out as the publisher does (layerfs + layer.json written last), from the test's own tars."""
    lay_out = RepositoryLayout(repo)
    for lay in layers:
        digest, tar_bytes = lay.digest, lay.tar
        fs = lay_out.layerfs(digest)
        fs.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
            tf.extractall(fs, filter="tar")
        lay_out.layer_metadata_dir(digest).mkdir(parents=True)
        rec = LayerRecord(digest=digest, diff_id=lay.diff_id, media_type=lay.media_type,
                          compressed_size=len(lay.blob), uncompressed_size=len(tar_bytes), entries=0)
        lay_out.layer_json(digest).write_text(rec.to_json())


def test_cvmfs_snap_pull_serves_published_layers_without_download(fresh_registry: Registry,
                                                                  short_tmp: Path) -> None:
    registry = fresh_registry  # its own access log: blob GETs of other tests must not count
    require_busybox()
    pytest.importorskip("cvmfs_snap.snapshotter.sources.cvmfs")
    pytest.importorskip("cvmfs_snap.containerd.pull")
    p = push_runnable(registry.url, registry.host, "snap/remote", extra=2)
    repo = short_tmp / "repo"
    repo.mkdir()
    published, downloaded = p.img.layers[:2], p.img.layers[2:]
    publish_layers(repo, list(published))
    cfg = short_tmp / "c.toml"
    cfg.write_text(f'absolute-mountpoint = "{repo}"\n')
    with running_daemon(short_tmp, "--config", str(cfg), "--log-level", "debug") as sp, \
            start_containerd(short_tmp / "ctd", proxy_plugins={PLUGIN: str(sp.address)}) as cd:
        r = subprocess.run([sys.executable, "-m", "cvmfs_snap.cli", "pull", "--address", cd.address,
                            "--snapshotter", PLUGIN, "--plain-http", "--json", p.ref],
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr + sp.log.read_text()[-3000:]
        out = json.loads(r.stdout)
        assert [lay["outcome"] for lay in out["layers"]] == ["remote", "remote", "pulled"], out
        for lay in published:
            assert blob_gets(registry.log, lay.digest) == 0
        for lay in downloaded:
            assert blob_gets(registry.log, lay.digest) >= 1

        r2 = cd.ctr("run", "--rm", "--snapshotter", PLUGIN, p.ref, "snap-remote-1", "/bin/sh", "-c",
                    "cat /data/file0 /data/file1 | wc -l; cat /etc/hostname", check=False)
        assert r2.returncode == 0, r2.stderr + sp.log.read_text()[-3000:]
        assert r2.stdout.split() == ["100", "cvmfs-snap-test"]

        st = snapshotter_status(sp.root)
        snaps = st["snapshots"]
        assert isinstance(snaps, list)
        by_source = sorted((s["source"], s["digest"]) for s in snaps if s["kind"] == "committed")
        assert by_source == sorted([("cvmfs", lay.digest) for lay in published] + [("local", "")])
        counts = st["counts"]
        assert isinstance(counts, dict) and counts["committed_by_source"] == {"cvmfs": 2, "local": 1}
        assert "Traceback" not in sp.log.read_text()
        # the repository was never written to
        assert sorted(p.name for p in repo.iterdir()) == [".layers"]
