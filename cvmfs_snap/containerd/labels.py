"""The labels containerd's pull/unpack path puts on content and snapshots, and the chain-ID arithmetic.

Names and semantics follow containerd 1.6 (``images.ChildGCLabels``, ``unpacker.go``, ``pkg/snapshotters``) so that
images pulled by ``cvmfs-snap pull`` are indistinguishable from images pulled by containerd itself (``ctr``, CRI)
for the garbage collector, for ``ctr run`` and for remote snapshotters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from cvmfs_snap.labelnames import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    DISTRIBUTION_SOURCE,
    GC_REF_CONTENT_CONFIG,
    GC_REF_CONTENT_LAYER,
    GC_REF_CONTENT_MANIFEST,
    GC_REF_CONTENT_OTHER,
    MAX_LABEL,
    SNAPSHOT_PREFIX,
    SNAPSHOT_REF,
)
from cvmfs_snap.mediatypes import CONFIG_TYPES, DOCKER_LAYER_TYPES, MANIFEST_TYPES, OCI_LAYER_PREFIX
from cvmfs_snap.oci import Descriptor


def is_layer_type(media_type: str) -> bool:
    """containerd's images.IsLayerType: OCI/Docker layer media types (any compression, incl. foreign layers)."""
    if media_type.startswith(OCI_LAYER_PREFIX):
        return True
    return media_type.split("+", 1)[0] in DOCKER_LAYER_TYPES


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def child_gc_labels(children: Sequence[Descriptor]) -> dict[str, str]:
    """The GC reference labels a parent blob gets for its children (images.SetChildrenMappedLabels): the first
    child of a kind gets ``...config`` / ``...m.0`` / ``...l.0``; a key that does not end in '.' gets an index only
    from the second occurrence on."""
    labels: dict[str, str] = {}
    counts: dict[str, int] = {}
    for ch in children:
        if ch.media_type in CONFIG_TYPES:
            key = GC_REF_CONTENT_CONFIG
        elif ch.media_type in MANIFEST_TYPES:
            key = GC_REF_CONTENT_MANIFEST
        elif is_layer_type(ch.media_type):
            key = GC_REF_CONTENT_LAYER
        else:
            key = GC_REF_CONTENT_OTHER
        idx = counts.get(key, 0)
        counts[key] = idx + 1
        labels[f"{key}{idx}" if idx > 0 or key.endswith(".") else key] = ch.digest
    return labels


def image_layers_label(layers: Sequence[Descriptor]) -> str:
    """Comma-separated digests of ``layers`` (this layer and those after it), cut where the label would exceed
    containerd's size limit, as pkg/snapshotters does."""
    value = ""
    for lay in layers:
        if not is_layer_type(lay.media_type):
            continue
        item = lay.digest if not value else "," + lay.digest
        if len(CRI_IMAGE_LAYERS) + len(value) + len(item) > MAX_LABEL:
            break
        value += item
    return value


def snapshot_labels(ref: str, manifest_digest: str, layers: Sequence[Descriptor], i: int, chain_id: str,
                    cri_labels: bool = True) -> dict[str, str]:
    """Labels for the Prepare (and Commit) of layer ``i``: inherited ``containerd.io/snapshot/*`` annotations of
    the layer descriptor, the CRI labels a remote snapshotter needs, and ``containerd.io/snapshot.ref``."""
    layer = layers[i]
    labels = {k: v for k, v in layer.annotations.items() if k == SNAPSHOT_REF or k.startswith(SNAPSHOT_PREFIX)}
    if cri_labels:
        labels[CRI_IMAGE_REF] = ref
        labels[CRI_LAYER_DIGEST] = layer.digest
        labels[CRI_IMAGE_LAYERS] = image_layers_label(layers[i:])
        labels[CRI_MANIFEST_DIGEST] = manifest_digest
    labels[SNAPSHOT_REF] = chain_id
    return labels


def merge_source_label(existing: Mapping[str, str], registry: str, repository: str) -> dict[str, str]:
    """The ``containerd.io/distribution.source.<host>`` label (host without port) with ``repository`` added to the
    sorted list it holds (docker.AppendDistributionSourceLabel); empty if it is there already or would be too long."""
    host = registry[1:].split("]", 1)[0] if registry.startswith("[") else registry.rsplit(":", 1)[0]
    key = DISTRIBUTION_SOURCE + host
    repos = [r for r in existing.get(key, "").split(",") if r]
    if repository in repos:
        return {}
    value = ",".join(sorted({*repos, repository}))
    return {key: value} if len(key) + len(value) <= MAX_LABEL else {}
