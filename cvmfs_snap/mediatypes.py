"""Every OCI / Docker media type the project names, spelt once (manifests, indexes, configs, layers)."""

from __future__ import annotations

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_PREFIX = "application/vnd.oci.image.layer."
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_FOREIGN_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_FOREIGN_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_FOREIGN_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_TAR = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
#: the body of docker-registry's webhook notifications (publisher/webhooks.py)
DOCKER_DISTRIBUTION_EVENTS = "application/vnd.docker.distribution.events.v1+json"

CONTAINERD_CHECKPOINT = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
CONTAINERD_CHECKPOINT_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG, CONTAINERD_CHECKPOINT, CONTAINERD_CHECKPOINT_CONFIG})
DOCKER_LAYER_TYPES = frozenset({DOCKER_LAYER_TAR, DOCKER_LAYER_GZIP, DOCKER_FOREIGN_TAR, DOCKER_FOREIGN_GZIP})

#: layer media type -> codec ("gzip", "zstd", "none"); includes Docker's and OCI's non-distributable ("foreign")
#: variants
LAYER_CODECS: dict[str, str] = {
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_FOREIGN_GZIP: "gzip",
    DOCKER_LAYER_TAR: "none",
    OCI_LAYER_TAR: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_FOREIGN_TAR: "none",
    OCI_FOREIGN_GZIP: "gzip",
    OCI_FOREIGN_ZSTD: "zstd",
}
