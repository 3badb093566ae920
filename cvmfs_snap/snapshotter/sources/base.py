"""The seam between the snapshot core and the places remote layers come from.

The core calls each source's :meth:`LayerSource.lookup` in order at ``Prepare`` time with the labels containerd sent.
A source that can serve the layer returns a :class:`RemoteLayer`; the core then commits a remote snapshot for it and
answers ``AlreadyExists`` so containerd never downloads the blob. At ``Mounts`` time the core asks the source that
owns a remote snapshot for its lower directories with :meth:`LayerSource.lowerdirs`. The core never looks inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

#: containerd's label with the chain ID a Prepare is unpacking into (the target snapshot name)
LABEL_TARGET_REF = "containerd.io/snapshot.ref"
#: the layer's compressed digest as CRI (and containerd's unpacker with snapshot annotations) sends it
LABEL_CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
#: the label containerd's remote snapshotters put on snapshots they serve remotely
LABEL_REMOTE = "containerd.io/snapshot/remote"
#: our own labels on remote snapshots
LABEL_SOURCE = "cvmfs-snap.io/source"
LABEL_LAYER_DIGEST = "cvmfs-snap.io/layer-digest"


@dataclass(frozen=True)
class RemoteLayer:
    """A layer a source can serve without a download."""

    source: str  # the source's name, stored with the snapshot so Mounts can ask the same source
    digest: str  # compressed layer digest, sha256:...
    labels: Mapping[str, str] = field(default_factory=dict)  # extra labels to store on the snapshot


class LayerSource(Protocol):
    name: str

    def lookup(self, labels: Mapping[str, str]) -> RemoteLayer | None:
        """Return a RemoteLayer if this source serves the layer the labels describe, else None.

        Must not raise for "not here" or "source unavailable" (return None and log); raises InvalidInputError for
        hostile labels (a digest with ``../``, an unknown algorithm)."""
        ...

    def lowerdirs(self, digest: str) -> list[Path]:
        """The directories to stack for this layer as overlay lowerdirs, top-most first (built on first use,
        cached). Raises NotFoundError/UnavailableError if the layer can no longer be served."""
        ...
