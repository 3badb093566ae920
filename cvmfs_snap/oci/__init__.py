"""OCI registry client: image references, manifests/indexes, auth, blob streams, range reads, tag lists.

Knows nothing of CVMFS or containerd. See docs/ARCHITECTURE.md "OCI client" for the interface.
"""

from cvmfs_snap.oci.auth import Credentials, CredentialStore
from cvmfs_snap.oci.client import BlobStream, RangeSupport, RegistryClient
from cvmfs_snap.oci.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    compute_digest,
    parse_manifest,
)
from cvmfs_snap.oci.reference import ImageReference, validate_digest

__all__ = [
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BlobStream",
    "CredentialStore",
    "Credentials",
    "Descriptor",
    "ImageReference",
    "Index",
    "Manifest",
    "Platform",
    "RangeSupport",
    "RegistryClient",
    "compute_digest",
    "parse_manifest",
    "validate_digest",
]
