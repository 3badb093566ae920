"""Every containerd label and image annotation name the project names, spelt once (imports nothing).

containerd 1.6's names (``images.ChildGCLabels``, ``unpacker.go``, ``pkg/snapshotters``, ``leases``), eStargz's
layer annotations (stargz-snapshotter's names), and our own labels on the snapshots we serve remotely. The
semantics live with their users: :mod:`cvmfs_snap.containerd.labels` (pull side), :mod:`cvmfs_snap.snapshotter.sources
.base` (snapshotter side), :mod:`cvmfs_snap.estargz` and :mod:`cvmfs_snap.convert` (annotations).
"""

from __future__ import annotations

#: on every snapshot containerd's unpacker prepares: the chain ID it will be committed as (the target snapshot name)
SNAPSHOT_REF = "containerd.io/snapshot.ref"
#: layer-descriptor annotations with this prefix are passed on to the snapshotter as Prepare labels (containerd's
#: ``unpacker.go`` copies every one, e.g. :data:`TOC_DIGEST`)
SNAPSHOT_PREFIX = "containerd.io/snapshot/"
#: the CRI labels (containerd pkg/snapshotters): what a remote snapshotter uses to find the layer
CRI_PREFIX = "containerd.io/snapshot/cri."
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
#: the layer's compressed digest as CRI (and containerd's unpacker with snapshot annotations) sends it
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
#: the label containerd's remote snapshotters put on snapshots they serve remotely
SNAPSHOT_REMOTE = "containerd.io/snapshot/remote"

#: the eStargz TOC digest annotation of a layer; it arrives at a snapshotter as a Prepare label of the same name
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
#: the eStargz layer annotation with the size of the uncompressed tar
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"

#: containerd refuses a label whose key plus value is longer than this (bytes; labels.Validate)
MAX_LABEL = 4096

#: content GC references
GC_REF_CONTENT_CONFIG = "containerd.io/gc.ref.content.config"
GC_REF_CONTENT_MANIFEST = "containerd.io/gc.ref.content.m."
GC_REF_CONTENT_LAYER = "containerd.io/gc.ref.content.l."
GC_REF_CONTENT_OTHER = "containerd.io/gc.ref.content."
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
#: when containerd's GC may drop a lease
GC_EXPIRE = "containerd.io/gc.expire"
#: a compressed blob's diff ID (uncompressed digest), on its content
UNCOMPRESSED = "containerd.io/uncompressed"
#: ``<prefix><registry host>``: the repositories a blob can be fetched from
DISTRIBUTION_SOURCE = "containerd.io/distribution.source."

#: our own labels on the snapshots a source serves: which source, and the layer digest (also accepted on a Prepare
#: instead of :data:`CRI_LAYER_DIGEST`)
SNAPSHOT_SOURCE = "cvmfs-snap.io/source"
SNAPSHOT_LAYER_DIGEST = "cvmfs-snap.io/layer-digest"
