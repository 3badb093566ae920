"""The Kubernetes path: the kubelet's CRI ``runtime.v1.ImageService`` calls on containerd's own CRI plugin (with our
generated stubs), with overlayfs and with a remote-serving proxy snapshotter (go-reference ``fakeremote``): the image
is there afterwards, and the layers a remote snapshotter serves are not downloaded."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from cvmfs_snap.api.gen.runtime.v1 import api_pb2, api_pb2_grpc
from cvmfs_snap.containerd import labels as L
from cvmfs_snap.containerd.pull import run_pull
from cvmfs_snap.labelnames import CRI_LAYER_DIGEST
from cvmfs_snap_devenv.containerd import Containerd
from cvmfs_snap_devenv.images import BuiltImage, Pusher, image, layer
from cvmfs_snap_devenv.registry import Registry
from tests.support.pullcheck import blob_gets, client, committed, containerd_in_tmp, fakeremote
from tests.support.runnable import goref_bin

pytestmark = pytest.mark.timeout(300)
K8S = "k8s.io"


def image_service(cd: Containerd) -> Iterator[api_pb2_grpc.ImageServiceStub]:
    with grpc.insecure_channel(f"unix://{cd.address}") as ch:
        yield api_pb2_grpc.ImageServiceStub(ch)


def _push(reg: Registry, repo: str, n: int = 2) -> tuple[str, BuiltImage]:
    img = image([layer([(f"f{i}", f"{repo} layer {i}".encode() * 200)]) for i in range(n)])
    Pusher(reg.url).image(repo, "v1", img)
    return reg.ref(repo, "v1"), img


@pytest.fixture(scope="module")
def cri_overlayfs(registry: Registry) -> Iterator[Containerd]:
    with containerd_in_tmp(cri_snapshotter="overlayfs", insecure_registries=[registry.host]) as cd:
        yield cd


def test_cri_pull_image_status_remove(registry: Registry, cri_overlayfs: Containerd) -> None:
    ref, img = _push(registry, "cri/plain")
    for svc in image_service(cri_overlayfs):
        resp = svc.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=120)
        assert resp.image_ref == img.config_digest  # containerd's CRI image ID is the config digest
        st = svc.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)), timeout=30)
        assert st.HasField("image")
        assert st.image.id == img.config_digest
        assert ref in st.image.repo_tags
        assert f"{registry.host}/cri/plain@{img.manifest_digest}" in st.image.repo_digests
        assert st.image.size > 0
        listed = svc.ListImages(api_pb2.ListImagesRequest(), timeout=30)
        assert img.config_digest in [i.id for i in listed.images]
        # overlayfs downloads every layer; the snapshots carry CRI's labels
        with client(cri_overlayfs, K8S) as c:
            for lay in img.layers:
                assert c.content_info(lay.digest) is not None
        snaps = committed(cri_overlayfs, "overlayfs", K8S)
        chains = L.chain_ids([lay.diff_id for lay in img.layers])
        for i, chain in enumerate(chains):
            assert snaps[chain].labels[CRI_LAYER_DIGEST] == img.layers[i].digest
        svc.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=30)
        gone = svc.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)), timeout=30)
        assert not gone.HasField("image")


def test_cvmfs_snap_pull_into_k8s_namespace_is_seen_by_cri(registry: Registry, cri_overlayfs: Containerd) -> None:
    """An image pre-pulled with ``cvmfs-snap pull --namespace k8s.io`` is found by the kubelet via CRI under all
    its names, with the same image records and snapshot labels as CRI's own pull."""
    ref, img = _push(registry, "cri/prepulled")
    ref_cri, img_cri = _push(registry, "cri/bycri")
    for svc in image_service(cri_overlayfs):
        svc.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref_cri)), timeout=120)
    res = run_pull(ref, address=cri_overlayfs.address, namespace=K8S, snapshotter="overlayfs")
    assert res.manifest_digest == img.manifest_digest

    def records(ref: str, img: BuiltImage) -> set[tuple[str, str, tuple[tuple[str, str], ...]]]:
        name = ref.rsplit(":", 1)[0]
        with client(cri_overlayfs, K8S) as c:
            recs = [r for r in c.list_images() if r.target.digest == img.manifest_digest]
        # normalise the names to compare the shape of CRI's records with ours
        shape = {ref: "TAG", f"{name}@{img.manifest_digest}": "DIGEST", img.config_digest: "ID"}
        return {(shape.get(r.name, r.name), r.target.media_type, tuple(sorted(r.labels.items()))) for r in recs}

    assert records(ref, img) == records(ref_cri, img_cri)
    assert len(records(ref, img)) == 3
    theirs = committed(cri_overlayfs, "overlayfs", K8S)[L.chain_ids([x.diff_id for x in img_cri.layers])[-1]]
    ours = committed(cri_overlayfs, "overlayfs", K8S)[res.chain_id]
    assert set(theirs.labels) == set(ours.labels)
    for svc in image_service(cri_overlayfs):
        # CRI learns about images created by other clients from containerd's ImageCreate event (asynchronously)
        deadline = time.monotonic() + 30
        while True:
            st = svc.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)), timeout=30)
            if st.HasField("image") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert st.HasField("image"), "CRI does not see the image pulled into k8s.io"
        assert st.image.id == img.config_digest
        assert f"{registry.host}/cri/prepulled@{img.manifest_digest}" in st.image.repo_digests
        assert ref in st.image.repo_tags
        by_digest = svc.ImageStatus(api_pb2.ImageStatusRequest(
            image=api_pb2.ImageSpec(image=f"{registry.host}/cri/prepulled@{img.manifest_digest}")), timeout=30)
        assert by_digest.image.id == img.config_digest


def test_cri_pull_with_remote_snapshotter_downloads_no_layer(fresh_registry: Registry) -> None:
    binary = goref_bin("fakeremote")
    if binary is None:
        pytest.skip("go-reference fakeremote not built (run /work/shared/tools/go-reference/build.sh)")
    ref, img = _push(fresh_registry, "cri/remote", 3)
    with fakeremote(binary) as (sock, log), containerd_in_tmp(
            proxy_plugins={"fakeremote": sock}, cri_snapshotter="fakeremote",
            insecure_registries=[fresh_registry.host]) as cd:
        for svc in image_service(cd):
            resp = svc.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=120)
            assert resp.image_ref == img.config_digest
            st = svc.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)), timeout=30)
            assert st.HasField("image")
        with client(cd, K8S) as c:
            for lay in img.layers:
                assert c.content_info(lay.digest) is None
            assert c.content_info(img.config_digest) is not None
        assert set(committed(cd, "fakeremote", K8S)) == set(L.chain_ids([x.diff_id for x in img.layers]))
        # the kubelet-visible labels reached the snapshotter
        assert all(lay.digest in log.read_text() for lay in img.layers)
    for lay in img.layers:
        assert blob_gets(fresh_registry.log, lay.digest) == 0
    assert blob_gets(fresh_registry.log, img.config_digest) == 1
