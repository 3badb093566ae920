"""Pure parts of the pull: containerd's label conventions and media-type classes (no daemons)."""

from __future__ import annotations

from cvmfs_snap.containerd import labels as L
from cvmfs_snap.containerd.unpack import content_ref, unpack_key
from cvmfs_snap.labelnames import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    MAX_LABEL,
    SNAPSHOT_REF,
)
from cvmfs_snap.mediatypes import DOCKER_LAYER_GZIP, OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST
from cvmfs_snap.oci import Descriptor

D = ["sha256:" + c * 64 for c in "abcdef"]


def test_layer_types_like_containerd() -> None:
    for mt in (OCI_LAYER_GZIP, "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+zstd",
               "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", DOCKER_LAYER_GZIP,
               "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"):
        assert L.is_layer_type(mt), mt
    for mt in (OCI_CONFIG, OCI_MANIFEST, "application/octet-stream", "application/vnd.docker.image.rootfs.other"):
        assert not L.is_layer_type(mt), mt


def test_child_gc_labels_numbering() -> None:
    manifest_children = [Descriptor(OCI_CONFIG, D[0], 1), Descriptor(OCI_LAYER_GZIP, D[1], 1),
                         Descriptor(DOCKER_LAYER_GZIP, D[2], 1), Descriptor("application/x-unknown", D[3], 1),
                         Descriptor("application/x-unknown", D[4], 1)]
    assert L.child_gc_labels(manifest_children) == {
        "containerd.io/gc.ref.content.config": D[0],
        "containerd.io/gc.ref.content.l.0": D[1],
        "containerd.io/gc.ref.content.l.1": D[2],
        # a key ending in '.' always gets the index
        "containerd.io/gc.ref.content.0": D[3],
        "containerd.io/gc.ref.content.1": D[4],
    }
    index_children = [Descriptor(OCI_MANIFEST, D[0], 1), Descriptor(OCI_MANIFEST, D[1], 1)]
    assert L.child_gc_labels(index_children) == {"containerd.io/gc.ref.content.m.0": D[0],
                                                 "containerd.io/gc.ref.content.m.1": D[1]}


def test_image_layers_label_is_cut_at_containerds_limit() -> None:
    many = [Descriptor(OCI_LAYER_GZIP, "sha256:" + f"{i:064x}", 1) for i in range(100)]
    value = L.image_layers_label(many)
    assert len(CRI_IMAGE_LAYERS) + len(value) <= MAX_LABEL
    parts = value.split(",")
    assert parts == [d.digest for d in many[:len(parts)]]
    assert len(parts) == (MAX_LABEL - len(CRI_IMAGE_LAYERS) + 1) // 72  # 71 chars + ',' per digest


def test_snapshot_labels_inherit_only_snapshot_annotations() -> None:
    layers = [Descriptor(OCI_LAYER_GZIP, D[0], 1, {"containerd.io/snapshot/stargz/toc.digest": D[5],
                                             "org.opencontainers.image.title": "x"}),
              Descriptor(OCI_LAYER_GZIP, D[1], 1)]
    labels = L.snapshot_labels("r.example/x:1", D[4], layers, 0, D[3])
    assert labels == {
        "containerd.io/snapshot/stargz/toc.digest": D[5],
        CRI_IMAGE_REF: "r.example/x:1",
        CRI_LAYER_DIGEST: D[0],
        CRI_IMAGE_LAYERS: f"{D[0]},{D[1]}",
        CRI_MANIFEST_DIGEST: D[4],
        SNAPSHOT_REF: D[3],
    }
    assert L.snapshot_labels("r.example/x:1", D[4], layers, 1, D[2], cri_labels=False) == {SNAPSHOT_REF: D[2]}


def test_distribution_source_label_merges_sorted_without_port() -> None:
    assert L.merge_source_label({}, "127.0.0.1:5000", "b/x") == {"containerd.io/distribution.source.127.0.0.1": "b/x"}
    key = "containerd.io/distribution.source.docker.io"
    assert L.merge_source_label({key: "library/z"}, "docker.io", "library/a") == {key: "library/a,library/z"}
    assert L.merge_source_label({key: "library/a,library/z"}, "docker.io", "library/z") == {}


def test_chain_ids() -> None:
    import hashlib
    assert L.chain_ids([]) == []
    assert L.chain_ids([D[0]]) == [D[0]]
    c1 = "sha256:" + hashlib.sha256(f"{D[0]} {D[1]}".encode()).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {D[2]}".encode()).hexdigest()
    assert L.chain_ids(D[:3]) == [D[0], c1, c2]


def test_keys_and_refs_follow_containerd() -> None:
    key = unpack_key(D[0])
    prefix, chain = key.split(" ")
    assert chain == D[0] and prefix.startswith("extract-") and len(prefix.split("-")) >= 3
    assert unpack_key(D[0]) != key
    assert content_ref(Descriptor(OCI_LAYER_GZIP, D[0], 1)) == f"layer-{D[0]}"
    assert content_ref(Descriptor(OCI_MANIFEST, D[0], 1)) == f"manifest-{D[0]}"
    assert content_ref(Descriptor("application/vnd.oci.image.index.v1+json", D[0], 1)) == f"index-{D[0]}"
    assert content_ref(Descriptor(OCI_CONFIG, D[0], 1)) == f"config-{D[0]}"

