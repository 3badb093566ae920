"""The Kubernetes path with our snapshotter: containerd's CRI plugin configured with ``cvmfs-snapshotter``, a
kubelet-style ``runtime.v1.ImageService/PullImage``, and layers published DUCC-style (a bare ``layerfs`` tree, no
``layer.json``) in a CVMFS-laid-out directory: the published layers are never downloaded, the image runs; the Go
reference ``rpull`` (containerd's own client + CRI label handler) sees the same."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cvmfs_snap.api.gen.runtime.v1 import api_pb2, api_pb2_grpc
from cvmfs_snap.containerd import labels as L
from cvmfs_snap.containerd.pull import run_pull
from cvmfs_snap.containerd.unpack import Outcome
from cvmfs_snap.layout import RepositoryLayout
from cvmfs_snap_devenv.containerd import Containerd, start_containerd
from cvmfs_snap_devenv.images import BuiltLayer
from cvmfs_snap_devenv.registry import Registry
from tests.support.e2e import PLUGIN
from tests.support.pullcheck import blob_gets, client, committed
from tests.support.runnable import goref_bin, push_runnable, require_busybox
from tests.support.snapshotter_daemon import running_daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
K8S = "k8s.io"


def publish_ducc_style(repo: Path, layers: list[BuiltLayer]) -> None:
    """What DUCC leaves in unpacked.cern.ch: ``.layers/<xx>/<hex>/layerfs`` with the layer's files, nothing else."""
    layout = RepositoryLayout(repo)
    for lay in layers:
        fs = layout.layerfs(lay.digest)
        fs.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(lay.tar)) as tf:
            tf.extractall(fs, filter="tar")


@pytest.fixture
def node(fresh_registry: Registry, short_tmp: Path) -> Iterator[tuple[Registry, Path, Containerd]]:
    require_busybox()
    pytest.importorskip("cvmfs_snap.snapshotter.daemon")
    repo = short_tmp / "repo"
    repo.mkdir()
    cfg = short_tmp / "c.toml"
    cfg.write_text(f'absolute-mountpoint = "{repo}"\n')
    with running_daemon(short_tmp, "--config", str(cfg)) as sp, start_containerd(
            short_tmp / "ctd", proxy_plugins={PLUGIN: str(sp.address)}, cri_snapshotter=PLUGIN,
            insecure_registries=[fresh_registry.host]) as cd:
        yield fresh_registry, repo, cd
        assert "Traceback" not in sp.log.read_text()


def test_cri_pull_serves_published_layers_from_cvmfs(node: tuple[Registry, Path, Containerd]) -> None:
    registry, repo, cd = node
    p = push_runnable(registry.url, registry.host, "cri/cvmfs", extra=2)
    published, local = list(p.img.layers[:2]), list(p.img.layers[2:])
    publish_ducc_style(repo, published)

    with grpc.insecure_channel(f"unix://{cd.address}") as ch:
        svc = api_pb2_grpc.ImageServiceStub(ch)
        resp = svc.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=p.ref)), timeout=120)
        assert resp.image_ref == p.img.config_digest
        st = svc.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=p.ref)), timeout=30)
        assert st.HasField("image") and st.image.id == p.img.config_digest
    with client(cd, K8S) as c:
        for lay in published:
            assert c.content_info(lay.digest) is None
        for lay in local:
            assert c.content_info(lay.digest) is not None
    for lay in published:
        assert blob_gets(registry.log, lay.digest) == 0
    for lay in local:
        assert blob_gets(registry.log, lay.digest) == 1
    chains = L.chain_ids([lay.diff_id for lay in p.img.layers])
    assert set(committed(cd, PLUGIN, K8S)) == set(chains)

    # the image the kubelet pulled runs (from the CVMFS tree plus the one local layer)
    r = cd.ctr("run", "--rm", "--snapshotter", PLUGIN, p.ref, "cri-cvmfs-1", "/bin/sh", "-c",
               "cat /data/file0 /data/file1 | wc -l; cat /etc/hostname", namespace=K8S, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["100", "cvmfs-snap-test"]

    # cvmfs-snap pull into another namespace: the same layers remote; the local layer's blob is shared by
    # containerd across namespaces, so nothing at all is fetched from the registry
    res = run_pull(p.ref, address=cd.address, namespace="viaours", snapshotter=PLUGIN)
    assert [lay.outcome for lay in res.layers] == [Outcome.REMOTE, Outcome.REMOTE, Outcome.CACHED]
    for lay in local:
        assert blob_gets(registry.log, lay.digest) == 1

    rpull = goref_bin("rpull")
    if rpull is None:
        pytest.skip("go-reference rpull not built")
    r = subprocess.run([rpull, "--address", cd.address, "--namespace", "viarpull", "--snapshotter", PLUGIN,
                        "--plain-http", "--json", p.ref], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    theirs = json.loads(r.stdout)
    assert [lay["inContentStore"] for lay in theirs["layers"]] == [False, False, True]
    assert [lay["chainID"] for lay in theirs["layers"]] == chains
